"""Chunked cross-entropy against eager CE, vocabulary padding, and the loss compile hook (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import CompileConfig

from trainer.loss import ChunkedTokenLoss, TokenLossCrossEntropy, chunk_count
from trainer.models import build_model
from trainer.models.lm_head import PaddedLMHead, padded_vocab_size

VOCAB = 300  # padded to 384: 84 padding ids


def _head(seed: int = 0) -> PaddedLMHead:
    torch.manual_seed(seed)
    head = PaddedLMHead.Config(in_features=16, out_features=padded_vocab_size(VOCAB), real_vocab_size=VOCAB).build()
    torch.nn.init.normal_(head.weight, std=0.5)
    with torch.no_grad():  # padding rows that would win every argmax if they were not masked
        head.weight[VOCAB:] = 5.0
    return head


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 40, 16, generator=g)
    labels = torch.randint(0, VOCAB, (3, 40), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[2, 17] = IGNORE_INDEX
    return hidden, labels


def test_padded_vocab_size_rounds_up_to_128():
    assert padded_vocab_size(200_808) == 200_832
    assert padded_vocab_size(512) == 512
    assert padded_vocab_size(1) == 128


def test_chunk_count_is_the_largest_divisor_not_above_the_bound():
    assert chunk_count(8192, 16) == 16
    assert chunk_count(40, 16) == 10
    assert chunk_count(7, 4) == 1
    assert chunk_count(4, 16) == 4


def test_chunked_loss_matches_eager_cross_entropy_in_value_and_gradient():
    hidden, labels = _batch()
    valid = (labels != IGNORE_INDEX).sum().float()

    head = _head()
    h = hidden.clone().requires_grad_(True)
    loss_fn = ChunkedTokenLoss.Config(num_chunks=8).build()
    loss_fn.set_lm_head(head)
    loss, _ = loss_fn(h, labels, valid)
    loss.backward()
    assert loss_fn.num_chunks == 8

    # eager reference over the real vocabulary only: padding must not change anything
    ref_head = _head()
    h_ref = hidden.clone().requires_grad_(True)
    logits = F.linear(h_ref, ref_head.weight[:VOCAB]).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    ref = per_token.sum() / valid
    ref.backward()

    assert abs(loss.item() - ref.item()) < 1e-6
    torch.testing.assert_close(loss_fn.last_token_losses, per_token.view(labels.shape).detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(head.weight.grad[VOCAB:]) == 0, "padding rows got a gradient"


def test_padding_ids_get_zero_probability_and_never_win():
    hidden = _batch()[0].abs()  # positive features: the all-5 padding rows dominate
    logits = _head()(hidden)
    raw = hidden @ _head().weight.T
    assert (raw[..., VOCAB:].max(-1).values > raw[..., :VOCAB].max(-1).values).all()  # they would win unmasked
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.count_nonzero(probs[..., VOCAB:]) == 0
    assert (logits.argmax(-1) < VOCAB).all()
    assert torch.allclose(probs[..., :VOCAB].sum(-1), torch.ones(3, 40))


def test_model_tables_are_padded_and_its_logits_mask_the_padding():
    model = build_model("debug_cpu", vocab_size=500)
    assert model.tok_embeddings.weight.shape[0] == 512 and model.lm_head.weight.shape[0] == 512
    assert model.config.vocab_size == 500
    logits = model(torch.randint(0, 500, (2, 12)))
    assert logits.shape[-1] == 512
    assert torch.count_nonzero(torch.softmax(logits, -1)[..., 500:]) == 0


def test_loss_goes_through_the_compile_config():
    plain = TokenLossCrossEntropy.Config().build(compile_config=CompileConfig(enable=False))
    assert plain.fn == plain._token_losses
    compiled = TokenLossCrossEntropy.Config().build(
        compile_config=CompileConfig(enable=True, components=["loss"], backend="eager"))
    assert compiled.fn != compiled._token_losses
    hidden, labels = _batch()
    logits = _head()(hidden)
    got, _ = compiled(logits, labels)
    want, _ = plain(logits, labels)
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_tp2_trains_with_a_padded_vocabulary(tmp_path):
    """vocab 500 -> 512 rows: under TP=2 rank 1's logit shard holds the padding ids (column offset 256)."""
    import os
    import subprocess

    from trainer.runs import step_losses, train_argv
    from trainer.synthetic import write_stream

    root, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(root, domains={"markov": "markov", "counting": "counting"}, shards=2, per_shard=40, vocab=500, seed=3)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    argv = train_argv([root], run, "--nproc", "2", "--tp", "2", "--vocab-size", "500", "--no-wandb",
                      "--steps", "6", "--checkpoint-every", "100")
    assert subprocess.run(argv, env=env, cwd=repo, timeout=500, check=False).returncode == 0
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] < 6.3  # near ln(500) = 6.21 at the start, then falling
