"""Reading and launching runs: metrics.jsonl records and the ``headwater train`` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

__all__ = ["read_metrics", "step_losses", "train_argv"]


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of RUN/metrics.jsonl (step records and events such as rollbacks), in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(run_dir: str) -> dict[int, float]:
    """Loss per step; steps re-trained after a resume or rollback keep their latest record."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def train_argv(stream_roots: list[str], run_dir: str, *extra: str) -> list[str]:
    """``headwater train`` as a subprocess command line (same interpreter, no console script needed)."""
    cmd = [sys.executable, "-c", "import sys; from trainer.launch import main; sys.exit(main(sys.argv[1:]))"]
    for root in stream_roots:
        cmd += ["--stream-root", root]
    return cmd + ["--run-dir", run_dir, *extra]
