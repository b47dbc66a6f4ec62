"""Parallelize the Headwater decoder with torchtitan's Qwen3 plan (TP, AC, compile, FSDP2)."""

from __future__ import annotations

from torch.distributed.fsdp import FSDPModule
from torchtitan.models.qwen3.parallelize import parallelize_qwen3

from trainer.cpu_compat import on_cpu

__all__ = ["parallelize_headwater"]


def parallelize_headwater(model, **kwargs):
    """torchtitan's ``parallelize_qwen3``; on CPU/gloo FSDP reduces with SUM (gloo has no PREMUL_SUM)."""
    model = parallelize_qwen3(model, **kwargs)
    if on_cpu():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model
