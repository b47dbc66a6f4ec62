"""Qwen-like dense decoder (RoPE, RMSNorm, SwiGLU, GQA, QK-norm) on torchtitan's building blocks.

Flavors: ``debug_cpu`` (tiny, for CPU/gloo tests), ``1b`` and ``10b`` (H100 sizes).
``attn_backend`` picks the inner attention: ``"cpu"`` (SDPA with a dense
document mask, CPU-trainable), ``"auto"`` (a flash-attention varlen kernel on CUDA when one
is installed, else FlexAttention; see attention_select.py), ``"flash_varlen"``, or torchtitan's
``"flex"``, ``"flex_flash"``, ``"varlen"``. The vocabulary is padded to a multiple of 128
(lm_head.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchtitan.models.common import CosSinRoPE, Embedding
from torchtitan.models.common.config_utils import (
    get_attention_config,
    make_ffn_config,
    make_gqa_config,
)
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.common.param_init import skip_param_init
from torchtitan.models.qwen3.model import Qwen3Model, Qwen3TransformerBlock

from trainer.models.attention_select import (
    FlashVarlenAttention,
    document_varlen_metadata,
    resolve_auto_backend,
)
from trainer.models.dense_attention import DenseMaskAttention, document_causal_mask
from trainer.models.lm_head import PaddedLMHead, padded_vocab_size

__all__ = ["FLAVORS", "HeadwaterQwen", "Shape", "qwen_config"]


@dataclass(frozen=True, slots=True)
class Shape:
    """Architecture numbers of one flavor."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    max_seq_len: int
    tied_embeddings: bool
    rope_theta: float = 1_000_000.0


FLAVORS: dict[str, Shape] = {
    "debug_cpu": Shape(64, 2, 4, 2, 16, 192, 1024, True),
    "1b": Shape(2048, 16, 16, 8, 128, 6144, 8192, True),
    "10b": Shape(4096, 42, 32, 8, 128, 14336, 8192, False),
}


class HeadwaterQwen(Qwen3Model):
    """Qwen3 decoder that also builds dense document masks for the CPU attention path."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen3Model.Config):
        pass

    def _dense_attention(self) -> bool:
        attn = self.config.first_attention
        return attn is not None and isinstance(attn.inner_attention, DenseMaskAttention.Config)

    def get_attention_masks(self, positions: torch.Tensor):
        if self._dense_attention():
            return document_causal_mask(positions)
        attn = self.config.first_attention
        if attn is not None and isinstance(attn.inner_attention, FlashVarlenAttention.Config):
            return document_varlen_metadata(positions)
        return super().get_attention_masks(positions)

    def forward(self, tokens, positions=None, attention_masks=None):
        """``tokens`` [B, L] -> logits [B, L, V]; positions restart at 0 per packed document."""
        if attention_masks is None and self._dense_attention():
            if positions is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            attention_masks = document_causal_mask(positions)
        return super().forward(tokens, positions=positions, attention_masks=attention_masks)


def _linear_init(std: float) -> dict[str, Callable]:
    return {"weight": partial(nn.init.normal_, std=std), "bias": nn.init.zeros_}


def _norm(dim: int) -> RMSNorm.Config:
    return RMSNorm.Config(normalized_shape=dim, eps=1e-6, param_init={"weight": nn.init.ones_})


def _inner_attention(attn_backend: str):
    if attn_backend == "cpu":
        return DenseMaskAttention.Config()
    if attn_backend == "auto":
        attn_backend = resolve_auto_backend()
    if attn_backend == "flash_varlen":
        return FlashVarlenAttention.Config()
    return get_attention_config(attn_backend)


def qwen_config(flavor: str, *, vocab_size: int, attn_backend: str) -> HeadwaterQwen.Config:
    """The model config of ``flavor`` with the given vocabulary size and attention backend."""
    if flavor not in FLAVORS:
        raise KeyError(f"unknown model flavor {flavor!r}; known: {sorted(FLAVORS)}")
    s = FLAVORS[flavor]
    linear = _linear_init(0.02)
    out_proj = _linear_init(0.02 / (2 * s.n_layers) ** 0.5)
    rope = CosSinRoPE.Config(dim=s.head_dim, max_seq_len=s.max_seq_len, theta=s.rope_theta)
    layers = [
        Qwen3TransformerBlock.Config(
            attention_norm=_norm(s.dim),
            ffn_norm=_norm(s.dim),
            attention=make_gqa_config(
                dim=s.dim,
                n_heads=s.n_heads,
                n_kv_heads=s.n_kv_heads,
                head_dim=s.head_dim,
                wqkv_param_init=linear,
                wo_param_init=out_proj,
                inner_attention=_inner_attention(attn_backend),
                fuse_qkv=True,
                rope=rope,
                qk_norm=_norm(s.head_dim),
            ),
            feed_forward=make_ffn_config(
                dim=s.dim, hidden_dim=s.hidden_dim, w1_param_init=linear, w2w3_param_init=out_proj
            ),
        )
        for _ in range(s.n_layers)
    ]
    embed_init = {"weight": skip_param_init} if s.tied_embeddings else {"weight": partial(nn.init.normal_, std=0.02)}
    table = padded_vocab_size(vocab_size)  # embedding/output rows; ids >= vocab_size are masked padding
    return HeadwaterQwen.Config(
        vocab_size=vocab_size,
        dim=s.dim,
        norm=_norm(s.dim),
        enable_weight_tying=s.tied_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=table, embedding_dim=s.dim, param_init=embed_init),
        lm_head=PaddedLMHead.Config(in_features=s.dim, out_features=table, real_vocab_size=vocab_size,
                                    param_init=linear),
        layers=layers,
    )
