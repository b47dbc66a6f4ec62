"""CUDA attention over packed documents: a flash-attention varlen kernel when one is installed, else Flex.

``attn_backend="auto"`` resolves, once per process and logged, to

- ``"flash_varlen"`` on CUDA when a flash-attention kernel imports: flash-attn-4
  (``flash_attn.cute``, CuTe DSL, Hopper/Blackwell; the ``gpu`` extra), flash-attn 2
  (``flash_attn.flash_attn_varlen_func``), or torch's own ``varlen_attn`` (the flash kernel
  bundled with CUDA builds of torch, nothing to install). :class:`FlashVarlenAttention` packs the batch into
  one ``[B*L, heads, head_dim]`` sequence and passes ``cu_seqlens`` from the document
  boundaries (:func:`document_varlen_metadata`), so no document attends to another;
- ``"flex"`` otherwise (torch's FlexAttention with torchtitan's document block mask).

The CPU path (``"cpu"``: SDPA with a dense document mask) is chosen explicitly by CPU configs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchtitan.models.common.attention import VarlenAttention, VarlenMetadata
from torchtitan.tools.logging import logger

__all__ = [
    "FlashKernel",
    "FlashVarlenAttention",
    "attention_backend_for",
    "document_varlen_metadata",
    "find_flash_kernel",
    "resolve_auto_backend",
]


@dataclass(frozen=True, slots=True)
class FlashKernel:
    """An importable flash-attention varlen function and the package it came from."""

    name: str
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def _torch_varlen() -> Callable | None:
    """torch's own varlen flash kernel (``torch.nn.attention.varlen``) behind flash-attn's keywords.

    Its signature moved between releases (``is_causal`` then ``window_size``; ``enable_gqa``
    later): the adapter reads it once.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal_kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params

    def run(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        if not causal:
            raise ValueError("only causal attention is adapted")
        extra = dict(causal_kw)
        if q.shape[1] != k.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           scale=softmax_scale, **extra)

    return run


def _load(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, OSError, RuntimeError) as e:  # CuTe DSL may fail to load CUDA libs
        logger.debug(f"attention: {module}.{name} unavailable: {e}")
        return None


def find_flash_kernel(*, include_torch: bool = True) -> FlashKernel | None:
    """flash-attn-4's varlen function if it imports, else flash-attn 2's, else torch's own (CUDA), else None."""
    fa4 = _load("flash_attn.cute", "flash_attn_varlen_func")
    if fa4 is not None:
        return FlashKernel("flash-attn-4", torch.compiler.disable(fa4))  # CuTe JIT: not traceable
    fa2 = _load("flash_attn", "flash_attn_varlen_func")
    if fa2 is not None:
        return FlashKernel("flash-attn-2", fa2)
    torch_fn = _torch_varlen() if include_torch else None
    return FlashKernel("torch varlen_attn", torch_fn) if torch_fn is not None else None


def attention_backend_for(*, cuda: bool, kernel: FlashKernel | None) -> str:
    """The inner attention ``"auto"`` stands for: flash varlen on CUDA with a kernel, else flex."""
    return "flash_varlen" if cuda and kernel is not None else "flex"


@functools.cache
def resolve_auto_backend() -> str:
    """``attention_backend_for`` this process's device and installed kernels; logs the choice once."""
    cuda = torch.cuda.is_available()
    kernel = find_flash_kernel() if cuda else None
    backend = attention_backend_for(cuda=cuda, kernel=kernel)
    if backend == "flash_varlen":
        logger.info(f"attention: {kernel.name} varlen kernel, cu_seqlens from document boundaries")
    else:
        why = "no CUDA device" if not cuda else "no flash-attention kernel importable (flash_attn.cute / flash_attn)"
        logger.info(f"attention: FlexAttention with document block mask ({why})")
    return backend


def document_varlen_metadata(positions: torch.Tensor) -> VarlenMetadata:
    """``cu_seqlens`` over the flattened batch: a document starts where ``positions`` is 0 and at every row.

    ``positions`` ``[B, L]`` restart at 0 at each packed document. A row that starts inside a
    document (a carried remainder) still starts a new segment, so no segment crosses rows.
    ``max_q``/``max_k`` are the row length, an upper bound that avoids a host sync.
    """
    batch, length = positions.shape
    starts = positions == 0
    starts[:, 0] = True
    first = torch.nonzero(starts.flatten()).flatten().to(torch.int32)
    end = torch.tensor([batch * length], dtype=torch.int32, device=positions.device)
    cu_seqlens = torch.cat([first, end])
    return VarlenMetadata(cu_seq_q=cu_seqlens, cu_seq_k=cu_seqlens, max_q=length, max_k=length)


class FlashVarlenAttention(VarlenAttention):
    """Causal attention within documents through an installed flash-attention varlen kernel.

    Keeps torchtitan's ``VarlenAttention.Config`` type, so models pass ``VarlenMetadata``;
    unlike torchtitan's module it calls the flash-attn package directly (torch's own varlen op
    and its FA3/FA4 registry are newer than the torch 2.11 of the GPU machines).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(VarlenAttention.Config):
        pass

    def __init__(self, config: Config, kernel: FlashKernel | None = None) -> None:
        super(VarlenAttention, self).__init__()  # skip torch's flash-impl activation
        self.window_size = config.window_size
        kernel = kernel or find_flash_kernel()
        if kernel is None:
            raise RuntimeError("FlashVarlenAttention needs a flash-attention varlen kernel "
                               "(flash-attn-4, flash-attn 2 or torch's)")
        self.kernel = kernel

    def forward(  # type: ignore[override]
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: VarlenMetadata,
        scale: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not isinstance(attention_masks, VarlenMetadata):
            raise TypeError(f"FlashVarlenAttention needs VarlenMetadata, not {type(attention_masks).__name__}")
        batch, length = q_BLNH.shape[:2]
        tokens = batch * length
        q, k, v = (t.reshape(tokens, -1, t.shape[-1]).to(torch.bfloat16) for t in (q_BLNH, k_BLNH, v_BLNH))
        out = self.kernel.fn(
            q, k, v,
            cu_seqlens_q=attention_masks.cu_seq_q,
            cu_seqlens_k=attention_masks.cu_seq_k,
            max_seqlen_q=attention_masks.max_q,
            max_seqlen_k=attention_masks.max_k,
            softmax_scale=scale,
            causal=True,
        )
        if isinstance(out, tuple):  # flash-attn-4 returns (out, lse)
            out = out[0]
        return out.view(batch, length, -1, v_BLNH.shape[-1]).to(q_BLNH.dtype)
