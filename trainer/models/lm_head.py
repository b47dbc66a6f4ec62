"""Vocabulary padding: tables sized to a multiple of 128, padding ids masked out of the logits.

A vocabulary of 200,808 ids gives matmuls whose vocab dimension no tensor-core tile divides;
:func:`padded_vocab_size` rounds it up (200,832). The embedding and the output projection are
built with the padded size; :class:`PaddedLMHead` sets the logits of the padding ids to the
dtype's lowest value, so they get zero probability (and zero gradient) and never win an argmax.
Labels never reference them: the loader rejects token ids >= the real vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchtitan.models.common import Linear

__all__ = ["VOCAB_MULTIPLE", "PaddedLMHead", "padded_vocab_size"]

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return -(-vocab_size // multiple) * multiple


class PaddedLMHead(Linear):
    """Output projection over the padded vocabulary that masks the padding ids' logits.

    Under tensor parallelism the output is vocab-sharded (each rank holds
    ``out_features / tp`` columns); the mask is placed from this rank's column offset.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        real_vocab_size: int
        """ids >= this are padding"""

    def __init__(self, config: Config):
        super().__init__(config)
        if not 0 < config.real_vocab_size <= config.out_features:
            raise ValueError(f"real_vocab_size {config.real_vocab_size} not in (0, {config.out_features}]")
        self.real_vocab_size = config.real_vocab_size
        self.tp_group: dist.ProcessGroup | None = None

    def parallelize(self, parallel_dims) -> None:
        tp_mesh = parallel_dims.get_optional_mesh("tp")
        if tp_mesh is not None:
            self.tp_group = tp_mesh.get_group("tp")
        super().parallelize(parallel_dims)

    def _column_offset(self, width: int) -> int:
        if width == self.out_features:
            return 0
        if self.tp_group is None:
            raise RuntimeError(f"lm_head produced {width} of {self.out_features} columns without a TP group")
        return dist.get_rank(self.tp_group) * width

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().forward(input)
        if self.real_vocab_size == self.out_features:
            return logits
        width = logits.shape[-1]
        first_pad = self.real_vocab_size - self._column_offset(width)  # local index of the first padding id
        if first_pad >= width:
            return logits
        is_pad = torch.arange(width, device=logits.device) >= first_pad
        return logits.masked_fill(is_pad, torch.finfo(logits.dtype).min)
