"""Load a trainer checkpoint (RUN/checkpoints/step-N) into a plain CPU model, no process group needed."""

from __future__ import annotations

import json
import os
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.models import build_model

__all__ = ["load_model", "read_checkpoint_info"]


def read_checkpoint_info(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``headwater.json`` beside a DCP checkpoint (config name, step, vocab size, cursor...)."""
    path = os.path.join(os.fspath(step_dir), "headwater.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing: not a complete headwater trainer checkpoint") from None


def load_model(step_dir: str | os.PathLike, *, attn_backend: str = "cpu") -> nn.Module:
    """Build the checkpoint's model (from headwater.json) and load its DCP weights; CPU, fp32, eval()."""
    info = read_checkpoint_info(step_dir)
    model = build_model(info["config"], vocab_size=int(info["vocab_size"]), attn_backend=attn_backend)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=os.fspath(step_dir))
    model.load_state_dict(state)
    return model.eval()
