"""Memory model (meta tensors): 1b at seq 8192 fits one 80 GB GPU only with the chunked loss; 10b on 8 GPUs."""

from __future__ import annotations

import pytest
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from trainer.config_registry import one_b, ten_b
from trainer.memory_model import GiB, StepShape, estimate_step_memory
from trainer.vocab_info import unified_vocab

CARD = 80 * 10**9  # an H100's 80 GB


def _shape(config, *, dp_ranks: int, loss_chunks: int | None = None) -> StepShape:
    ac = config.activation_checkpoint
    mode = "full" if isinstance(ac, FullAC.Config) else "selective" if isinstance(ac, SelectiveAC.Config) else "none"
    return StepShape(flavor=config.headwater.config_name, vocab_size=unified_vocab().size,
                     local_batch_size=config.training.local_batch_size, seq_len=config.training.seq_len,
                     dp_ranks=dp_ranks, ac=mode,
                     loss_chunks=config.loss.num_chunks if loss_chunks is None else loss_chunks)


def test_1b_fits_one_80gb_gpu_with_the_chunked_loss_and_did_not_with_eager_fp32():
    config = one_b()
    assert config.training.seq_len == 8192
    chunked = estimate_step_memory(_shape(config, dp_ranks=1))
    eager = estimate_step_memory(_shape(config, dp_ranks=1, loss_chunks=1))
    assert chunked.total <= 0.9 * CARD, chunked.as_gib()
    assert chunked.loss < 8 * GiB, chunked.as_gib()
    # the figures for 4 x 8192 tokens over the 200,808-id vocabulary: ~61 GiB forward, ~74 GiB backward
    assert 70 * GiB < eager.loss < 78 * GiB, eager.as_gib()
    assert eager.total > CARD, eager.as_gib()


def test_10b_fits_8_gpus_with_fsdp():
    config = ten_b()
    est = estimate_step_memory(_shape(config, dp_ranks=8))
    assert est.total <= 0.9 * CARD, est.as_gib()
    one_gpu = estimate_step_memory(_shape(config, dp_ranks=1))
    assert one_gpu.total > CARD  # 16 bytes of fp32 state per parameter: 10b needs the sharding


def test_activation_checkpointing_orders_the_activation_memory():
    base = {"flavor": "1b", "vocab_size": 200_808, "local_batch_size": 4, "seq_len": 8192}
    acts = {ac: estimate_step_memory(StepShape(**base, ac=ac)).activations for ac in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"]
    with pytest.raises(ValueError, match="unknown activation checkpointing"):
        estimate_step_memory(StepShape(**base, ac="some"))
