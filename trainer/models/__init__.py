"""Model registry of the trainer: flavor -> torchtitan ModelSpec, and plain model builders."""

from __future__ import annotations

import torch
from torch import nn
from torchtitan.protocols.model_spec import ModelSpec

from trainer.models.parallelize import parallelize_headwater
from trainer.models.qwen import FLAVORS, HeadwaterQwen, qwen_config

__all__ = ["FLAVORS", "HeadwaterQwen", "build_model", "model_registry"]


def model_registry(flavor: str, *, vocab_size: int, attn_backend: str = "auto") -> ModelSpec:
    """torchtitan ModelSpec for ``flavor`` (``debug_cpu``, ``1b``, ``10b``)."""
    from torchtitan.distributed.pipeline_parallel import pipeline_llm
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    return ModelSpec(
        name="headwater_qwen",
        flavor=flavor,
        model=qwen_config(flavor, vocab_size=vocab_size, attn_backend=attn_backend),
        parallelize_fn=parallelize_headwater,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=Qwen3StateDictAdapter,
    )


def build_model(config_name: str, *, vocab_size: int | None = None, attn_backend: str = "cpu") -> nn.Module:
    """A freshly initialised, unsharded model of ``config_name`` on CPU (fp32, eval mode).

    ``vocab_size`` defaults to the unified vocabulary (streams.vocab); pass the one
    recorded in a checkpoint's ``headwater.json`` to match it.
    """
    if vocab_size is None:
        from trainer.vocab_info import unified_vocab

        vocab_size = unified_vocab().size
    config = qwen_config(config_name, vocab_size=vocab_size, attn_backend=attn_backend)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.eval()
