"""A bounded record of alert ids kept in a JSON-lines file: survives restarts, never grows unbounded.

The sentinel keeps two: the alerts its rule engine raised (``<lineage>.raised.jsonl``, with
each alert's content digest, so only those exact alerts get their rule's route) and the alerts
whose hooks all succeeded (``<lineage>.done.jsonl``, so a restart does not run hooks again for
an alert whose offset was not committed yet). Each line is ``{"id", "at", **fields}``.

Bounds: an entry is forgotten once older than ``max_age_s`` (default 7 days, the retention of
``alerts``: an older alert can no longer be delivered) or when more than ``max_entries``
(default 100,000) newer ones exist. The file is appended to, and rewritten atomically with
only the live entries when it holds more than twice as many lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["IdJournal"]

log = logging.getLogger(__name__)


class IdJournal:
    """Ids with a few fields each, in insertion order, persisted to ``path``."""

    def __init__(self, path: str | Path, *, max_entries: int = 100_000, max_age_s: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time):
        self.path, self.max_entries, self.max_age_s, self.clock = Path(path), max_entries, max_age_s, clock
        self.entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lines = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    key, at = str(entry["id"]), float(entry["at"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash
                self._lines += 1
                self.entries[key] = entry | {"at": at}
                self.entries.move_to_end(key)
        self._prune()
        if self._lines > len(self.entries):
            self._rewrite()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry recorded for ``key``, or None."""
        return self.entries.get(key)

    def add(self, key: str, **fields: Any) -> None:
        """Record ``key`` (appended and flushed before returning)."""
        entry = {"id": key, "at": self.clock(), **fields}
        self.entries[key] = entry
        self.entries.move_to_end(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        self._lines += 1
        self._prune()
        if self._lines > 2 * max(len(self.entries), 1000):
            self._rewrite()

    def _prune(self) -> None:
        horizon = self.clock() - self.max_age_s
        while self.entries and (len(self.entries) > self.max_entries
                                or next(iter(self.entries.values()))["at"] < horizon):
            self.entries.popitem(last=False)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in self.entries.values())
        os.replace(tmp, self.path)
        self._lines = len(self.entries)
        log.info("%s compacted to %d entries", self.path, self._lines)
