"""Rank 0 completes each checkpoint once DCP has finished writing it.

A save returns before an asynchronous DCP save is on disk. The checkpoint's facts
(``headwater.json``: step, cursor, mixer weights...) are captured when the save is issued;
once ``.metadata`` exists (DCP's coordinator writes it last) the finisher writes
``headwater.json``, then the signed manifest (streams/checkpoint_manifest.py) over every file,
and only then publishes CheckpointSaved. An event therefore always names a complete, signed
checkpoint; a checkpoint that never completes is never announced.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from streams.checkpoint_manifest import dcp_complete, write_manifest
from streams.events import CheckpointSaved
from streams.signing import SigningKey
from trainer.events_out import EventSink

__all__ = ["CheckpointFinisher"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    path: str
    info: dict[str, Any]
    event: CheckpointSaved
    seen: bool = False  # its directory existed once (an async save creates it later)


class CheckpointFinisher:
    """Writes headwater.json + the signed manifest of completed saves, then announces them."""

    def __init__(self, events: EventSink, *, key: SigningKey | None):
        self.events, self.key = events, key
        self.pending: list[_Pending] = []
        if key is None:
            log.warning("no trainer signing key (HEADWATER_TRAINER_KEY_FILE): checkpoint manifests are "
                        "unsigned and evaluators will refuse to load these checkpoints")

    def add(self, path: str, info: dict[str, Any], event: CheckpointSaved) -> None:
        """A save was issued for ``path``; finish it when DCP has."""
        self.pending.append(_Pending(path, info, event))

    def poll(self) -> list[int]:
        """Finish every pending checkpoint whose DCP save completed; returns their steps."""
        done, waiting = [], []
        for p in self.pending:
            if not os.path.isdir(p.path):
                if p.seen:  # purged (keep_latest_k) or moved aside by a rollback
                    log.warning("checkpoint %s vanished before its save completed; not announced", p.path)
                else:  # an async save has not created it yet
                    waiting.append(p)
            elif dcp_complete(p.path):
                self._finish(p)
                done.append(p.event.step)
            else:
                p.seen = True
                waiting.append(p)
        self.pending = waiting
        return done

    def flush(self, *, timeout_s: float = 600.0) -> None:
        """Wait (up to ``timeout_s``) until every pending checkpoint is finished."""
        deadline = time.monotonic() + timeout_s
        self.poll()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.2)
            self.poll()
        for p in self.pending:
            log.error("checkpoint %s: DCP save not complete after %.0fs; not announced", p.path, timeout_s)

    def _finish(self, p: _Pending) -> None:
        tmp = os.path.join(p.path, "headwater.json.tmp")
        with open(tmp, "w") as f:
            json.dump(p.info, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(p.path, "headwater.json"))
        write_manifest(p.path, run_id=p.event.run_id, step=p.event.step, key=self.key)
        self.events.checkpoint(p.event)
