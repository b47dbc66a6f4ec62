"""CPU attention path: SDPA with a dense same-document causal mask.

FlexAttention has no CPU backward, and torchtitan only builds packed-document
masks for Flex/Varlen configs. :class:`DenseMaskAttention` keeps the Flex config
type (so the Trainer still passes positions-derived masks) but receives a dense
boolean mask ``[B, 1, L, L]`` (built by :func:`document_causal_mask`) and runs
``F.scaled_dot_product_attention``. Same numerics as flex up to fp rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import FlexAttention

__all__ = ["DenseMaskAttention", "document_causal_mask"]


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, L, L]``: query i sees key j iff j <= i and both are in the same document.

    ``positions`` ``[B, L]`` restart at 0 at every packed document start.
    """
    doc = torch.cumsum((positions == 0).to(torch.int32), dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    length = positions.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril_()
    return (same_doc & causal).unsqueeze(1)


class DenseMaskAttention(FlexAttention):
    """Inner attention taking a dense boolean mask; selected by ``attn_backend="cpu"``."""

    @dataclass(kw_only=True, slots=True)
    class Config(FlexAttention.Config):
        pass

    def forward(  # type: ignore[override]
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: torch.Tensor,
        scale: float | None = None,
        enable_gqa: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        if not isinstance(attention_masks, torch.Tensor) or attention_masks.dtype != torch.bool:
            raise TypeError("DenseMaskAttention needs a bool mask from document_causal_mask()")
        out = F.scaled_dot_product_attention(
            q_BLNH.transpose(1, 2),
            k_BLNH.transpose(1, 2),
            v_BLNH.transpose(1, 2),
            attn_mask=attention_masks,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        return out.transpose(1, 2)
