"""Memory-safe cross-entropy that also keeps the per-token losses of the step (per-domain statistics).

:class:`ChunkedTokenLoss` is torchtitan's :class:`ChunkedLossWrapper`: the model stops before
``lm_head`` and the loss applies ``lm_head`` to one slice of the sequence at a time, computes
its fp32 cross-entropy and runs its backward at once, so only one chunk's logits ever exist
(``B * L / num_chunks * V`` instead of ``B * L * V``; at 1b, 4 x 8192 tokens and a 200,832-id
vocabulary that is 6 GiB per chunk of 2,048 rows instead of ~61 GiB of fp32 logits). The
per-chunk loss (:class:`TokenLossCrossEntropy`) goes through torchtitan's ``_maybe_compile``, so
the ``loss`` compile component fuses the fp32 upcast into the log-softmax on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.components.loss import (
    IGNORE_INDEX,
    BaseLoss,
    ChunkedLossWrapper,
    _LossParallelCrossEntropy,
)
from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
from torchtitan.distributed.utils import get_spmd_backend

__all__ = ["ChunkedTokenLoss", "TokenLossCrossEntropy", "chunk_count"]


def chunk_count(seq_len: int, max_chunks: int) -> int:
    """The number of equal sequence chunks used: the largest divisor of ``seq_len`` <= ``max_chunks``."""
    for n in range(max(1, min(max_chunks, seq_len)), 0, -1):
        if seq_len % n == 0:
            return n
    return 1


class TokenLossCrossEntropy(BaseLoss):
    """Sum-reduced CE (torchtitan's token normalisation) that records detached per-token NLL.

    Called once per chunk by :class:`ChunkedTokenLoss` (or once per step on its own); the
    per-token losses of the calls since :meth:`start` are returned by :meth:`token_losses`.
    Under tensor parallelism with the spmd_types backend the logits are vocab-sharded: it uses
    torchtitan's vocab-parallel CE with ``reduction="none"``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        pass

    def __init__(self, config: Config, *, compile_config=None):
        self.fn = self._token_losses
        self._maybe_compile(compile_config)
        self._parts: list[torch.Tensor] = []
        self.last_token_losses: torch.Tensor | None = None

    def _token_losses(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
            return _LossParallelCrossEntropy.apply(
                pred.flatten(0, 1).float(),
                labels.flatten(0, 1),
                current_spmd_mesh().get_group("tp"),
                pred.shape[-1] * spmd_mesh_size("tp"),  # the padded vocabulary shards evenly
                "none",
            )
        return F.cross_entropy(
            pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="none", ignore_index=IGNORE_INDEX
        )

    def start(self) -> None:
        """Forget the per-token losses of earlier calls."""
        self._parts = []

    def token_losses(self) -> torch.Tensor:
        """Per-token NLL ``[B, L]`` of the calls since :meth:`start`, concatenated along the sequence."""
        return self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts, dim=1)

    def __call__(self, pred, labels, global_valid_tokens=None, **kwargs: Any):
        per_token = self.fn(pred, labels)
        self._parts.append(per_token.detach().view(labels.shape))
        self.last_token_losses = self._parts[-1]
        loss = per_token.sum()
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}


class ChunkedTokenLoss(ChunkedLossWrapper):
    """torchtitan's chunked loss around :class:`TokenLossCrossEntropy`, keeping the step's per-token NLL.

    ``num_chunks`` is an upper bound: each call uses :func:`chunk_count` of the local sequence
    length (torchtitan's wrapper needs equal chunks). The Trainer sets ``lm_head`` and makes the
    model return hidden states (``_skip_lm_head``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ChunkedLossWrapper.Config):
        num_chunks: int = 16
        loss_fn: TokenLossCrossEntropy.Config = field(default_factory=TokenLossCrossEntropy.Config)

    def __init__(self, config: Config, *, compile_config=None):
        super().__init__(config, compile_config=compile_config)
        self.max_chunks = config.num_chunks
        self.last_token_losses: torch.Tensor | None = None

    def __call__(self, pred, labels, global_valid_tokens=None, **loss_inputs: Any):
        self.num_chunks = chunk_count(labels.shape[1], self.max_chunks)
        self.loss_fn.start()
        loss, metrics = super().__call__(pred, labels, global_valid_tokens, **loss_inputs)
        self.last_token_losses = self.loss_fn.token_losses()
        return loss, metrics

