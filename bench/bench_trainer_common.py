"""Shared pieces of the trainer benchmarks: a single-process training step on the debug_cpu model
fed by either the live-stream loader (with mixer) or a static in-memory batch list."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from trainer import cpu_compat

cpu_compat.install()

from trainer.data import IGNORE_INDEX, LiveStreamDataLoader
from trainer.mixing import Mixer
from trainer.models import build_model

VOCAB, SEQ, BATCH = 512, 128, 4
DOMAINS = {"noise": "noise", "markov": "markov", "counting": "counting"}


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("debug_cpu", vocab_size=VOCAB).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    return model, opt


def token_losses(model, inputs, positions, labels) -> torch.Tensor:
    logits = model(inputs, positions=positions)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(labels.shape)


def train_step(model, opt, batch, labels) -> torch.Tensor:
    per_token = token_losses(model, batch["input"], batch["positions"], labels)
    valid = labels != IGNORE_INDEX
    loss = per_token.sum() / valid.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return per_token.detach()


def observe(mixer: Mixer, meta, per_token: torch.Tensor, labels: torch.Tensor, available: dict) -> None:
    """The trainer's per-domain reduction + mixer update (single rank)."""
    loss_sum, tokens = meta.domain_sums(per_token, labels)
    mixer.observe(loss_sum, tokens, dict(Counter(meta.doc_domains)), dict(available))


def live_loader(roots: list[str], policy: str, **mix) -> LiveStreamDataLoader:
    cfg = LiveStreamDataLoader.Config(stream_roots=roots, mixing=Mixer.Config(policy=policy, **mix))
    return LiveStreamDataLoader(cfg, dp_world_size=1, dp_rank=0, seq_len=SEQ, local_batch_size=BATCH,
                                vocab_size=VOCAB)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median(xs) -> float:
    return float(np.median(np.asarray(xs)))
