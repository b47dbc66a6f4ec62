"""Peak GPU memory of one training step, estimated with meta tensors (no GPU, no allocation).

Method. Activations are measured, not guessed: one transformer block of the flavor runs forward
on the meta device with the real modules (fused QKV, QK-norm, RoPE, SwiGLU) at the configured
batch and sequence length; a ``saved_tensors_hooks`` pair sums the distinct storages autograd
keeps for backward, and a dispatch mode records the matmul outputs. Attention is a
flash-equivalent stand-in that keeps what flash/flex kernels keep (q, k, v, output and the fp32
log-sum-exp; no ``L x L`` scores). Per activation-checkpointing mode, the layer's saved bytes are:
``none``: everything autograd saves; ``full``: the block input (plus one block's full set while it
is recomputed in backward); ``selective`` (torchtitan's op SAC): the block input, every second
matmul output and the attention output/LSE. The loss is measured the same way on one chunk of
logits (its saved tensors plus the fp32 gradient of the chunk), against the unchunked fp32 path.
The rest is arithmetic on the parameter count read from the model built on the meta device:
FSDP2 shards fp32 parameters, fp32 gradients and AdamW's two fp32 states over the data-parallel
ranks; bf16 compute copies of the root group (embeddings, final norm, lm_head) stay gathered and
two blocks' are gathered at a time (one prefetched), and a block's bf16 gradients live until
reduce-scattered. Fragmentation, NCCL buffers and the CUDA context are not modelled: keep a
margin (the tests ask for <= 90% of the card).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.models.lm_head import padded_vocab_size
from trainer.models.qwen import FLAVORS, qwen_config

__all__ = ["GiB", "MemoryEstimate", "StepShape", "estimate_step_memory"]

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step of one rank looks like."""

    flavor: str
    vocab_size: int
    local_batch_size: int
    seq_len: int
    dp_ranks: int = 1
    ac: str = "selective"  # "none" | "selective" | "full"
    loss_chunks: int = 16  # 1: the unchunked fp32 path


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes per GPU at the step's peak, by component."""

    params: int
    grads: int
    optimizer: int
    gathered_params: int
    block_grads: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.gathered_params + self.block_grads
                + self.activations + self.loss)

    def as_gib(self) -> dict[str, float]:
        names = ("params", "grads", "optimizer", "gathered_params", "block_grads", "activations", "loss", "total")
        return {n: round(getattr(self, n) / GiB, 2) for n in names}


class _FlashLikeAttention(torch.autograd.Function):
    """Keeps what a flash kernel keeps: q, k, v, the output and the fp32 LSE ``[B, H, L]``."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashLikeInner(torch.nn.Module):
    def forward(self, q, k, v, **kwargs):
        return _FlashLikeAttention.apply(q, k, v)


class _MatmulOutputs(TorchDispatchMode):
    """Records the byte size of every matmul output, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.sizes.append(out.numel() * out.element_size())
        return out


def _saved_bytes(fn) -> tuple[int, object]:
    """Distinct storage bytes autograd saves while running ``fn()`` (on meta tensors)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _block_activation_bytes(shape: StepShape) -> dict[str, int]:
    config = qwen_config(shape.flavor, vocab_size=shape.vocab_size, attn_backend="cpu")
    with torch.device("meta"):
        block = config.layers[0].build().to(torch.bfloat16)
        for attn in block.modules():
            if hasattr(attn, "inner_attention"):
                attn.inner_attention = _FlashLikeInner()
        x = torch.empty(shape.local_batch_size, shape.seq_len, FLAVORS[shape.flavor].dim,
                        dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(shape.seq_len).expand(shape.local_batch_size, -1)
    mm = _MatmulOutputs()
    with mm:
        saved, _ = _saved_bytes(lambda: block(x, None, positions))
    s = FLAVORS[shape.flavor]
    tokens = shape.local_batch_size * shape.seq_len
    block_input = tokens * s.dim * 2
    attention_out = tokens * s.n_heads * s.head_dim * 2 + tokens * s.n_heads * 4  # output + fp32 LSE
    selective = block_input + sum(mm.sizes[::2]) + attention_out  # torchtitan saves every second mm
    return {"none": saved, "full": block_input, "selective": min(selective, saved)}


def _loss_bytes(shape: StepShape) -> int:
    """Peak bytes of the loss: one chunk's saved tensors and fp32 logit gradient, plus chunk plumbing."""
    from trainer.loss import TokenLossCrossEntropy, chunk_count

    chunks = chunk_count(shape.seq_len, shape.loss_chunks)
    rows = shape.local_batch_size * (shape.seq_len // chunks)
    vocab = padded_vocab_size(shape.vocab_size)
    loss = TokenLossCrossEntropy.Config().build()
    with torch.device("meta"):
        logits = torch.empty(shape.local_batch_size, rows // shape.local_batch_size, vocab,
                             dtype=torch.bfloat16, requires_grad=True)
        labels = torch.zeros(shape.local_batch_size, rows // shape.local_batch_size, dtype=torch.long)
    saved, _ = _saved_bytes(lambda: loss(logits, labels))
    # backward of one chunk: fp32 grad of the log-softmax input and the bf16 grad of the logits
    # exist together with the saved tensors and the bf16 logits themselves
    chunk_peak = saved + rows * vocab * (4 + 2) + logits.numel() * 2
    if chunks == 1:
        return chunk_peak
    tokens = shape.local_batch_size * shape.seq_len
    dim = FLAVORS[shape.flavor].dim
    return chunk_peak + tokens * dim * (4 + 2)  # fp32 hidden-grad accumulator + detached bf16 chunks


def _param_counts(shape: StepShape) -> tuple[int, int, int]:
    """(all parameters, one block's, the root group's: embeddings + final norm + lm_head)."""
    config = qwen_config(shape.flavor, vocab_size=shape.vocab_size, attn_backend="cpu")
    with torch.device("meta"):
        model = config.build()
    total = sum(p.numel() for p in model.parameters())  # tied weights count once
    block = sum(p.numel() for p in model.layers["0"].parameters())
    return total, block, total - block * len(model.layers)


def estimate_step_memory(shape: StepShape) -> MemoryEstimate:
    """Peak bytes per GPU of one forward+backward+AdamW step of ``shape`` (see the module docstring)."""
    total, block, root = _param_counts(shape)
    n_layers = FLAVORS[shape.flavor].n_layers
    w = shape.dp_ranks
    per_layer = _block_activation_bytes(shape)
    one_block_full = per_layer["none"]
    if shape.ac == "full":
        activations = n_layers * per_layer["full"] + one_block_full
    elif shape.ac == "selective":
        activations = n_layers * per_layer["selective"] + one_block_full
    elif shape.ac == "none":
        activations = n_layers * per_layer["none"]
    else:
        raise ValueError(f"unknown activation checkpointing {shape.ac!r}")
    tokens = shape.local_batch_size * shape.seq_len
    activations += 2 * tokens * FLAVORS[shape.flavor].dim * 2  # embedding output, final-norm output
    return MemoryEstimate(
        params=4 * total // w,
        grads=4 * total // w,
        optimizer=8 * total // w,
        gathered_params=2 * (root + 2 * block),
        block_grads=2 * block + 4 * block // w,
        activations=activations,
        loss=_loss_bytes(shape),
    )
