"""Takedown purges of a stream root's dedup indexes; on a local root made idempotent by an intent file.

The takedown's sample predicate (:meth:`PurgeIntent.recording`) appends the id of every matching
sample to ``<root>/_governance/dedup_purge.pending`` (flushed before the shard rewrite commits),
so a purge that fails afterwards (``SnapshotBusy``, kill -9, a disk error) is redone by the next
takedown of the root, which finds the samples already gone. Purging an id early is harmless: it
only leaves the indexes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["PENDING", "PurgeIntent", "purge_dedup"]

PENDING = "dedup_purge.pending"  # one JSON id per line, under <root>/_governance/


def purge_dedup(root: str, ids: list[str]) -> dict[str, int]:
    """Put ``ids`` on the purge lists of the root's text, semantic and media (image/video) dedup
    indexes (a local root: those it has; an object-store root: all three, since the machines
    whose caches read them are not known here); the ids newly purged from each, in that order."""
    from beam_jobs.dedup import semantic_settled, settled
    from beam_jobs.media import dedup_settled
    from streams.storage import is_remote

    indexes = {"text": settled, "semantic": semantic_settled, "media": dedup_settled}
    every = is_remote(root)
    return {name: index.purge(root, ids) if ids and (every or os.path.isdir(os.path.join(root, index.DIRNAME)))
            else 0 for name, index in indexes.items()}


class PurgeIntent:
    """The ids a takedown of ``root`` must purge, recorded before their samples are removed."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "_governance", PENDING)
        self.root = root

    def recording(self, match: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
        """``match``, appending each matching sample's id to the intent file first."""
        def drop(sample: dict[str, Any]) -> bool:
            if not match(sample):
                return False
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(str(sample["id"])) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return True
        return drop

    def pending(self) -> list[str]:
        """Ids recorded and not purged yet (this takedown's and any failed earlier one's)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return sorted({json.loads(line) for line in f if line.strip()})

    def purge(self, ids: list[str]) -> dict[str, int]:
        """Purge ``ids`` and every pending id from the dedup indexes, then clear the intent file."""
        counts = purge_dedup(self.root, sorted({*ids, *self.pending()}))
        if os.path.exists(self.path):
            os.remove(self.path)
        return counts
