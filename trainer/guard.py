"""Loss guard: NaN/inf and z-score spike detection over a window of recent step losses."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["LossGuard"]


class LossGuard:
    """Decides whether a step's loss is acceptable; counts spikes for auto-rollback."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        window: int = 50
        z_threshold: float = 6.0
        min_history: int = 10
        max_spikes: int = 3
        """spikes (within the current run segment) that trigger an automatic rollback"""

        def build(self) -> LossGuard:
            return LossGuard(self)

    def __init__(self, config: Config):
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)
        self.spikes = 0
        self.trips_since_checkpoint = 0

    def check(self, loss: float) -> str | None:
        """None if ``loss`` is fine (and record it), else the reason to skip the batch."""
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        else:
            reason = self._spike(loss)
        if reason is None:
            self.history.append(loss)
            return None
        self.spikes += 1
        self.trips_since_checkpoint += 1
        return reason

    def limit(self) -> float:
        """The highest loss :meth:`check` accepts now (inf until ``min_history`` losses are known):
        the trainer compares on the device against it, so the host never waits for the loss."""
        h = self.history
        if len(h) < self.config.min_history:
            return math.inf
        mean = sum(h) / len(h)
        std = math.sqrt(sum((x - mean) ** 2 for x in h) / len(h))
        return mean + self.config.z_threshold * max(std, 1e-3 * max(abs(mean), 1e-6))

    def record(self, loss: float, *, accepted: bool) -> str | None:
        """Book a decision taken on the device against :meth:`limit`; the reason if it was refused."""
        if accepted:
            self.history.append(loss)
            return None
        reason = (f"non-finite loss or gradient (loss {loss})" if not math.isfinite(loss)
                  else self._spike(loss) or f"loss {loss:.4f} above the guard limit")
        self.spikes += 1
        self.trips_since_checkpoint += 1
        return reason

    def _spike(self, loss: float) -> str | None:
        h = self.history
        if len(h) < self.config.min_history:
            return None
        mean = sum(h) / len(h)
        std = math.sqrt(sum((x - mean) ** 2 for x in h) / len(h))
        z = (loss - mean) / max(std, 1e-3 * max(abs(mean), 1e-6))
        return f"loss spike z={z:.1f} (loss {loss:.4f}, window mean {mean:.4f})" if z > self.config.z_threshold else None

    def should_roll_back(self) -> bool:
        return self.spikes >= self.config.max_spikes

    def reset_spikes(self) -> None:
        self.spikes = 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "spikes": self.spikes, "trips": self.trips_since_checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.config.window)
        self.spikes = int(state["spikes"])
        self.trips_since_checkpoint = int(state["trips"])
