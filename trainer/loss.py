"""Cross-entropy that also keeps the per-token losses of the step (for per-domain statistics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, _LossParallelCrossEntropy
from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
from torchtitan.distributed.utils import get_spmd_backend

__all__ = ["TokenLossCrossEntropy"]


class TokenLossCrossEntropy(BaseLoss):
    """Sum-reduced CE (torchtitan's token normalisation) that stores detached per-token NLL.

    Under tensor parallelism with the spmd_types backend the logits are vocab-sharded:
    it uses torchtitan's vocab-parallel CE with ``reduction="none"``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None

    def __init__(self, config: Config, *, compile_config=None):
        self.global_vocab_size = config.global_vocab_size
        self.fn = self._token_losses
        self.last_token_losses: torch.Tensor | None = None

    def _token_losses(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
            return _LossParallelCrossEntropy.apply(
                pred.flatten(0, 1).float(),
                labels.flatten(0, 1),
                current_spmd_mesh().get_group("tp"),
                self.global_vocab_size,
                "none",
            )
        return F.cross_entropy(
            pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="none", ignore_index=IGNORE_INDEX
        )

    def __call__(self, pred, labels, global_valid_tokens=None, **kwargs: Any):
        per_token = self._token_losses(pred, labels)
        self.last_token_losses = per_token.detach().view(labels.shape)
        loss = per_token.sum()
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}
