"""Per-item scoring of a causal LM on eval items and the report metrics built from it.

Every token after an item's first is predicted exactly once (items longer than ``seq_len`` are
cut into windows overlapping by one token). Per item we keep the summed NLL (nats) and the
normalisers, so metrics aggregate as ratios of sums (token-weighted) and the regression test
can resample items.

Metric names (all computed over items not flagged as leaked):

* ``ppl``, ``nll_per_token``: all modalities; ``<modality>/ppl`` per token.
* ``domain/<d>/ppl``, ``lang/<l>/ppl``: per domain / language, any modality.
* text: ``text/bpb`` and ``domain/<d>/bpb``, ``lang/<l>/bpb`` = NLL / ln 2 / UTF-8 bytes of the
  decoded text (tokenizer-independent).
* audio, video: ``<m>/bits_per_second`` and ``<m>/log_ppl_per_second`` = NLL / seconds of media.
  The perplexity per second is ``exp(log_ppl_per_second)``; it is reported in log form because
  it overflows float64 for real clips. Video tokens are spatio-temporal (RVQ codes of keyframe
  patches interleaved with the audio track), so per-token perplexity normalises per
  patch-level-frame code and per-second normalises the whole audio-visual stream by duration.
* image: ``image/bits_per_image`` and ``image/log_ppl_per_image`` (NLL per image), plus per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluators.evalsets import EvalItem

__all__ = ["item_table", "score_items", "summarize", "text_bytes"]

LN2 = math.log(2.0)


def text_bytes(decode: Callable[[list[int]], str], tokens: np.ndarray, text_size: int) -> int:
    """UTF-8 bytes of an item's text tokens (special/media ids excluded)."""
    ids = [int(t) for t in tokens if t < text_size]
    return len(decode(ids).encode("utf-8")) if ids else 0


@torch.no_grad()
def score_items(model: torch.nn.Module, items: Sequence[EvalItem], *, seq_len: int,
                batch_size: int = 4, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and predicted-token count per item."""
    windows: list[tuple[int, np.ndarray]] = []
    for i, item in enumerate(items):
        toks = item.tokens
        for start in range(0, max(len(toks) - 1, 0), seq_len):
            windows.append((i, toks[start:start + seq_len + 1]))
    windows.sort(key=lambda w: len(w[1]))
    nll = np.zeros(len(items))
    count = np.zeros(len(items), dtype=np.int64)
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        width = max(len(w) for _, w in batch)
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for row, (_, w) in enumerate(batch):
            x[row, :len(w)] = torch.from_numpy(w.astype(np.int64))
            mask[row, :len(w) - 1] = True
        logits = model(x[:, :-1]).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="none").view(len(batch), -1)
        losses = (losses * mask).sum(1).double().numpy()
        for row, (i, w) in enumerate(batch):
            nll[i] += losses[row]
            count[i] += len(w) - 1
    return nll, count


def item_table(items: Sequence[EvalItem], nll: np.ndarray, count: np.ndarray, nbytes: Sequence[int]) -> dict[str, list]:
    """Column table of per-item results (stored in ``EvalReport.details['items']``)."""
    return {
        "id": [it.id for it in items], "nll": [round(float(v), 6) for v in nll],
        "tokens": [int(c) for c in count], "modality": [it.modality for it in items],
        "domain": [it.domain for it in items], "language": [it.language for it in items],
        "bytes": [int(b) for b in nbytes], "seconds": [float(it.seconds) for it in items],
        "images": [int(it.images) for it in items],
    }


def summarize(table: dict[str, list]) -> dict[str, float]:
    """Report metrics from an item table (see the module docstring for names)."""
    nll = np.asarray(table["nll"], float)
    tok = np.asarray(table["tokens"], float)
    cols = {k: np.asarray(table[k], dtype=object) for k in ("modality", "domain", "language")}
    nbytes, secs, imgs = (np.asarray(table[k], float) for k in ("bytes", "seconds", "images"))
    out: dict[str, float] = {}

    def per_token(prefix: str, m: np.ndarray) -> None:
        if tok[m].sum() > 0:
            lp = nll[m].sum() / tok[m].sum()
            out[f"{prefix}ppl"] = float(math.exp(min(lp, 700.0)))
            if not prefix:
                out["nll_per_token"] = float(lp)

    def per_unit(name: str, m: np.ndarray, unit: np.ndarray) -> None:
        if unit[m].sum() > 0:
            out[name] = float(nll[m].sum() / LN2 / unit[m].sum())

    every = np.ones(len(nll), bool)
    per_token("", every)
    is_text = cols["modality"] == "text"
    per_unit("text/bpb", is_text, nbytes)
    for modality in sorted(set(cols["modality"])):
        m = cols["modality"] == modality
        per_token(f"{modality}/", m)
        if modality in ("audio", "video"):
            per_unit(f"{modality}/bits_per_second", m, secs)
            if f"{modality}/bits_per_second" in out:
                out[f"{modality}/log_ppl_per_second"] = out[f"{modality}/bits_per_second"] * LN2
        if modality == "image":
            per_unit("image/bits_per_image", m, imgs)
            if "image/bits_per_image" in out:
                out["image/log_ppl_per_image"] = out["image/bits_per_image"] * LN2
    for key, label in (("domain", "domain"), ("language", "lang")):
        for value in sorted(v for v in set(cols[key]) if v):
            m = cols[key] == value
            per_token(f"{label}/{value}/", m)
            per_unit(f"{label}/{value}/bpb", m & is_text, nbytes)
    return out
