"""Attention backend selection and the varlen cu_seqlens from document boundaries (CPU)."""

from __future__ import annotations

import importlib.util
import itertools
import logging

import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import FlexAttention, VarlenMetadata

from trainer.models.attention_select import (
    FlashKernel,
    FlashVarlenAttention,
    attention_backend_for,
    document_varlen_metadata,
    find_flash_kernel,
    resolve_auto_backend,
)
from trainer.models.dense_attention import DenseMaskAttention, document_causal_mask
from trainer.models.qwen import qwen_config

# row 1 starts inside a document (a carried remainder): it must still start a segment
POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [3, 4, 0, 1, 2, 3, 0, 1, 2]])


def test_cu_seqlens_follow_document_starts_and_row_starts():
    meta = document_varlen_metadata(POSITIONS)
    assert meta.cu_seq_q.dtype == torch.int32
    assert meta.cu_seq_q.tolist() == [0, 3, 5, 9, 11, 15, 18]
    assert meta.cu_seq_k is meta.cu_seq_q
    assert meta.max_q == meta.max_k == 9  # the row length bounds every segment


def _reference_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """What a flash varlen kernel computes: causal attention inside each [cu[i], cu[i+1]) segment."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    for start, end in itertools.pairwise(bounds):
        assert end - start <= max_seqlen_q
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale
                                                        ).transpose(0, 1).to(q.dtype)
    return out, None  # flash-attn-4 style (out, lse)


def test_flash_varlen_attention_equals_the_dense_document_mask_path():
    torch.manual_seed(0)
    b, length, heads, kv_heads, dim = *POSITIONS.shape, 4, 2, 16
    q = torch.randn(b, length, heads, dim)
    k, v = torch.randn(b, length, kv_heads, dim), torch.randn(b, length, kv_heads, dim)
    flash = FlashVarlenAttention(FlashVarlenAttention.Config(), kernel=FlashKernel("reference", _reference_varlen))
    got = flash(q, k, v, attention_masks=document_varlen_metadata(POSITIONS), scale=0.25, enable_gqa=True)
    dense = DenseMaskAttention(DenseMaskAttention.Config())
    want = dense(q, k, v, attention_masks=document_causal_mask(POSITIONS), scale=0.25, enable_gqa=True)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # the kernel path runs in bf16


def test_auto_picks_flash_varlen_only_on_cuda_with_a_kernel():
    kernel = FlashKernel("flash-attn-4", _reference_varlen)
    assert attention_backend_for(cuda=True, kernel=kernel) == "flash_varlen"
    assert attention_backend_for(cuda=True, kernel=None) == "flex"
    assert attention_backend_for(cuda=False, kernel=kernel) == "flex"
    assert attention_backend_for(cuda=False, kernel=None) == "flex"


def test_this_cpu_machine_resolves_auto_to_flex_and_logs_it(caplog):
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    assert (find_flash_kernel(include_torch=False) is not None) == has_flash_attn
    if not has_flash_attn:  # torch's own varlen kernel is found, but only used on CUDA
        assert find_flash_kernel().name == "torch varlen_attn"
    resolve_auto_backend.cache_clear()
    logger = logging.getLogger()
    with caplog.at_level(logging.INFO, logger=logger.name):
        assert resolve_auto_backend() == "flex"
    assert "attention: FlexAttention" in caplog.text and "no CUDA device" in caplog.text
    inner = qwen_config("1b", vocab_size=200_808, attn_backend="auto").first_attention.inner_attention
    assert type(inner) is FlexAttention.Config


def test_flash_varlen_config_builds_varlen_masks():
    config = qwen_config("debug_cpu", vocab_size=500, attn_backend="flash_varlen")
    assert isinstance(config.first_attention.inner_attention, FlashVarlenAttention.Config)
    cpu_model = qwen_config("debug_cpu", vocab_size=500, attn_backend="cpu").build()
    cpu_model.config = config  # masks depend on the config's attention type only
    assert isinstance(cpu_model.get_attention_masks(POSITIONS), VarlenMetadata)
