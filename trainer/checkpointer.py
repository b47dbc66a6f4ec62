"""torchtitan's DCP CheckpointManager with the hooks the Headwater trainer needs around it.

torchtitan's ``Trainer.train()`` loads at start and saves after every step on its own; this
subclass lets the trainer act around those calls without rewriting the loop:

- ``before_save(step)`` runs when a save is due, before any state is collected (the trainer
  reads the step's pending statistics there, so the mixer and guard in the checkpoint have
  seen the step they are saved at);
- ``after_save(step)`` runs once the save was issued (rank 0 then finishes it when DCP has:
  trainer/checkpoint_out.py);
- :meth:`mark_loaded` records that the trainer already restored a checkpoint of its choosing
  (trainer/resume.py: the newest intact one, chosen by rank 0), so the load at the top of
  torchtitan's ``train()`` does not load a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchtitan.components.checkpoint import CheckpointManager

__all__ = ["HeadwaterCheckpointManager"]


class HeadwaterCheckpointManager(CheckpointManager):
    """CheckpointManager with save hooks and a one-shot "already loaded" start."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self.before_save: Callable[[int], None] | None = None
        self.after_save: Callable[[int], None] | None = None
        self._loaded = False

    def mark_loaded(self) -> None:
        """The next ``load()`` is torchtitan's start-up load of a checkpoint already restored: skip it."""
        self._loaded = True

    def _load(self, step: int = -1) -> bool:
        if self._loaded:
            self._loaded = False
            return True
        return super()._load(step)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if self.before_save is not None and self._should_save(curr_step, last_step):
            self.before_save(curr_step)
        saved = super()._save(curr_step, last_step)
        if saved and self.after_save is not None:
            self.after_save(curr_step)
        return saved
