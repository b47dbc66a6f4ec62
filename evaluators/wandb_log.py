"""Mirror EvalReports to Weights & Biases (offline by default: no network needed)."""

from __future__ import annotations

from streams.events import EvalReport

__all__ = ["WandbLogger"]


class WandbLogger:
    """One wandb run per evaluator instance; metrics keyed by the trainer step (``trainer_step``)."""

    def __init__(self, *, mode: str = "offline", dir: str | None = None, name: str = "evaluator",
                 project: str = "headwater-evals"):
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb mode must be disabled|offline|online, got {mode!r}")
        self.run = None
        if mode != "disabled":
            import wandb

            self.run = wandb.init(project=project, name=name, mode=mode, dir=dir, reinit="create_new")
            self.run.define_metric("*", step_metric="trainer_step")

    def log(self, report: EvalReport) -> None:
        if self.run is None:
            return
        values = {f"{report.suite}/{k}": v for k, v in report.metrics.items()}
        self.run.log({"trainer_step": report.step, f"{report.suite}/passed": float(report.passed), **values})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
