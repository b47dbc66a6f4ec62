"""Load a trainer DCP checkpoint for evaluation (CPU here, GPU when one is present).

The trainer's contract (docs/TEAM_CONTRACTS.md, "trainer checkpoints"): ``step-N/`` holds a
torch DCP checkpoint whose model parameters sit under plain FQNs at the top level, and
``headwater.json`` (written last) with the model config name, vocab size/version and seq_len.
The model is built with ``trainer.models.build_model`` and filled by
``torch.distributed.checkpoint.load`` (no process group needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint"]

META = "headwater.json"


class CheckpointError(RuntimeError):
    """The checkpoint is incomplete, unreadable, or does not match its metadata."""


@dataclass(slots=True)
class LoadedCheckpoint:
    model: torch.nn.Module
    meta: dict[str, Any]


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> LoadedCheckpoint:
    """Build the checkpoint's model and load its weights (eval mode, fp32)."""
    from trainer.models import build_model

    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META} (checkpoint incomplete or not a headwater checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
        model = build_model(meta["config"], vocab_size=int(meta["vocab_size"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: bad {META}: {type(e).__name__}: {e}") from None
    state = model.state_dict()
    try:
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any DCP failure becomes an EvalReport error
        raise CheckpointError(f"{path}: DCP load failed: {type(e).__name__}: {e}") from None
    return LoadedCheckpoint(model=model.to(device).eval(), meta=meta)
