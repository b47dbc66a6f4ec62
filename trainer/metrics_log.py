"""Per-step metrics: RUN/metrics.jsonl (always) and wandb (offline by default)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["MetricsLog"]


class MetricsLog:
    """Appends one JSON object per step; mirrors flat numeric values to wandb when enabled."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        wandb: bool = True
        wandb_project: str = "headwater"
        wandb_mode: str = "offline"

    def __init__(self, config: Config, *, run_dir: str, run_id: str, run_config: dict[str, Any] | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the run, closed in close()
        self._wandb = None
        if config.wandb:
            import wandb

            self._wandb = wandb.init(
                project=config.wandb_project, name=run_id, id=run_id, resume="allow",
                dir=run_dir, mode=config.wandb_mode, config=run_config or {},
            )

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log(_flatten(record), step=int(record["step"]))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
