"""What control did to a run that checkpoints do not hold, kept in RUN/control.json.

Checkpoints restore weights, cursor and mixer, not the operator's decisions: the paused domains
and the ids of the controls applied live beside them (like RUN/quarantine.json) so a restarted
trainer keeps its pauses and still refuses a replay of a control it already applied (the
verifier's seen-id cache is memory only). Applied ids are kept while their ``issued_at`` is
inside the verifier's window: older ones are refused as stale anyway, so the file stays small.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

__all__ = ["ControlState"]


class ControlState:
    """Paused domains and applied control ids (-> issued_at); rank 0 persists, every rank reads."""

    def __init__(self, run_dir: str, *, writer: bool, window_s: float = 300.0):
        self.path = os.path.join(run_dir, "control.json")
        self.writer, self.window_s = writer, window_s
        self.paused: set[str] = set()
        self.applied: dict[str, float] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                state = json.load(f)
            self.paused = set(map(str, state.get("paused", [])))
            self.applied = {str(k): float(v) for k, v in state.get("applied", {}).items()}

    def record(self, *, paused: Iterable[str], applied: dict[str, float]) -> None:
        """Remember the paused domains now and the controls just applied (their id -> issued_at)."""
        horizon = time.time() - self.window_s
        self.paused = set(paused)
        self.applied = {k: t for k, t in {**self.applied, **applied}.items() if t >= horizon}
        if not self.writer:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"paused": sorted(self.paused), "applied": self.applied}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
