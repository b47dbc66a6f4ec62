"""Lineage log: every rollback, quarantine and pause with its reason, as JSON lines."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from streams.events import Alert, Control

__all__ = ["LineageLog"]


class LineageLog:
    """Append-only JSONL file; one line per control decision (issued or skipped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, *, action: str, reason: str, alert: Alert | None = None,
               control: Control | None = None, **extra: Any) -> dict:
        """Append one entry (flushed and fsynced) and return it."""
        entry: dict[str, Any] = {"at": time.time(), "action": action, "reason": reason, **extra}
        if control is not None:
            entry.update(command=control.command, args=control.args, control_id=control.control_id,
                         issued_by=control.issued_by)
        if alert is not None:
            entry.update(alert_id=alert.alert_id, rule=alert.rule, dedup_key=alert.dedup_key,
                         evidence=alert.evidence)
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return entry

    def entries(self) -> list[dict]:
        """All entries, oldest first."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
