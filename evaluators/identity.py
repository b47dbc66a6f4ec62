"""Identity of a saved checkpoint: its path *and* its save time.

After a rollback the trainer saves ``step-N`` again at the same path; that is a different
model, to be evaluated and judged on its own.
"""

from __future__ import annotations

from streams.events import CheckpointSaved, EvalReport

__all__ = ["CheckpointKey", "checkpoint_key", "report_key"]

CheckpointKey = tuple[str, float | None]


def checkpoint_key(ckpt: CheckpointSaved) -> CheckpointKey:
    """Identity of a saved checkpoint: (path, wall time of the save)."""
    return ckpt.path, round(float(ckpt.wall_time), 6)


def report_key(report: EvalReport) -> CheckpointKey:
    """The :func:`checkpoint_key` of the checkpoint a report evaluated (None time: legacy report)."""
    wall = report.details.get("checkpoint_wall_time")
    return report.checkpoint_path, None if wall is None else round(float(wall), 6)
