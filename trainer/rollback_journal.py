"""The run's rollback journal, RUN/rollbacks.json: which rollbacks were applied, and the one in flight.

A rollback writes its intent here first (target step, the shards it quarantines, the
checkpoints it moves aside and where to), then acts, then records itself as applied. A run
killed in between finds the intent at start-up and completes it (quarantine and moves are
idempotent) before it loads a checkpoint, so it resumes on the rolled-back branch. Control ids
of applied rollbacks make a redelivered control a no-op. Like the quarantine, it lives beside
the checkpoints, not inside them: a checkpoint load must not forget what was applied.

Durability: the journal is replaced atomically and its directory fsynced after each rename (a
power loss must not bring back an older journal); before a rollback is recorded as applied, the
directories its checkpoint moves renamed entries in (the checkpoint folder, ``abandoned/`` and
the intent's ``dest``) are fsynced, so "applied" never survives a crash that the moves did not.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from streams.manifest import atomic_write_json, fsync_dir

__all__ = ["RollbackJournal"]


class RollbackJournal:
    """Applied rollbacks (by control id) and the pending intent; rank 0 persists, every rank reads."""

    def __init__(self, run_dir: str, *, writer: bool):
        self.path = os.path.join(run_dir, "rollbacks.json")
        self.writer = writer
        self.applied: dict[str, dict[str, Any]] = {}
        self.intent: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None  # the last applied rollback: control_id, to_step, ...
        if os.path.exists(self.path):
            with open(self.path) as f:
                state = json.load(f)
            self.applied, self.intent, self.last = state["applied"], state.get("intent"), state.get("last")

    def is_applied(self, control_id: str) -> bool:
        return control_id in self.applied

    def begin(self, intent: dict[str, Any]) -> None:
        """Record what a rollback is about to do (``control_id``, ``to_step``, ``moves``, ...)."""
        self.intent = dict(intent)
        self._save()

    def finish(self) -> dict[str, Any]:
        """Mark the intent applied (after syncing the directories its moves renamed in); returns it."""
        if self.writer and self.intent.get("dest"):
            abandoned = os.path.dirname(self.intent["dest"])
            for folder in (self.intent["dest"], abandoned, os.path.dirname(abandoned)):
                if os.path.isdir(folder):
                    fsync_dir(folder)
        done = {**self.intent, "applied_at": time.time()}
        self.applied[done["control_id"]] = {k: done[k] for k in ("from_step", "to_step", "applied_at")}
        self.intent, self.last = None, done
        self._save()
        return done

    def skip(self, control_id: str, *, to_step: int, from_step: int) -> None:
        """Record a control id as applied without acting (a no-op repeat of the last rollback)."""
        self.applied[control_id] = {"from_step": from_step, "to_step": to_step, "applied_at": time.time(),
                                    "noop": True}
        self._save()

    def _save(self) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path, {"applied": self.applied, "intent": self.intent, "last": self.last})
