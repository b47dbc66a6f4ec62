"""Synthetic multi-domain live streams for tests and benchmarks (written with streams.mds).

Three kinds of domain over a small vocabulary:
- ``noise``: uniform random tokens — nothing to learn (loss stays ~ln V);
- ``markov``: a fixed sparse random Markov chain — learnable, loss falls with training;
- ``counting``: t_{i+1} = t_i + 1 (mod V) — learned within a few steps, then flat and low;
- ``countdown``: t_{i+1} = t_i - 1 (mod V) — labels that contradict ``counting`` (a poison for it);
- ``noisy_markov``: the ``markov`` chain with 30% of tokens replaced by random ones — lower-quality
  text of the same "language" (partly learnable, and what it teaches transfers to ``markov``);
- ``wide_markov``: another chain with 8 successors per token — a harder language, more to learn;
- ``boilerplate``: one of 16 fixed documents (templated pages) — memorised early, then redundant.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from streams.events import ShardPublished
from streams.mds import LiveStreamWriter

__all__ = ["KINDS", "synthetic_docs", "write_stream"]

KINDS = ("noise", "markov", "counting", "countdown", "noisy_markov", "wide_markov", "boilerplate")
NOISY_MARKOV_P = 0.3


def _markov_table(vocab: int, branching: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(vocab, branching))


def synthetic_docs(kind: str, *, n: int, vocab: int, seed: int, min_len: int = 24, max_len: int = 160,
                   branching: int = 2) -> Iterator[np.ndarray]:
    """``n`` token arrays (int32) of domain ``kind``; deterministic in ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic domain kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng(seed)
    table = _markov_table(vocab, branching, seed=12345)
    wide = _markov_table(vocab, 8, seed=54321)
    templates = np.random.default_rng(777).integers(0, vocab, size=(16, max_len))
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        if kind == "noise":
            doc = rng.integers(0, vocab, size=length)
        elif kind in ("counting", "countdown"):
            step = 1 if kind == "counting" else -1
            doc = (int(rng.integers(0, vocab)) + step * np.arange(length)) % vocab
        elif kind == "boilerplate":
            doc = templates[int(rng.integers(0, len(templates)))][:length]
        elif kind == "wide_markov":
            doc = _walk(wide, rng, length, vocab)
        else:
            doc = _walk(table, rng, length, vocab)
            if kind == "noisy_markov":
                hit = rng.random(length) < NOISY_MARKOV_P
                doc[hit] = rng.integers(0, vocab, size=int(hit.sum()))
        yield doc.astype(np.int32)


def _walk(table: np.ndarray, rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    doc = np.empty(length, dtype=np.int64)
    doc[0] = rng.integers(0, vocab)
    choices = rng.integers(0, table.shape[1], size=length)
    for i in range(1, length):
        doc[i] = table[doc[i - 1], choices[i]]
    return doc


def write_stream(root: str, *, domains: dict[str, str], shards: int, per_shard: int, vocab: int,
                 seed: int = 0, interval_s: float = 0.0, writer_id: str = "synthetic",
                 start_shard: int = 0, source: str | None = None,
                 publisher: Callable[[ShardPublished], None] | None = None) -> list[str]:
    """Publish ``shards`` shards per domain (round-robin over domains) of ``per_shard`` docs each.

    ``domains`` maps domain name -> kind. ``interval_s`` sleeps between shards (a live, growing
    stream). ``source`` overrides the samples' source column (default ``synthetic:<kind>``);
    ``publisher`` receives each ShardPublished (e.g. to the ``shards`` topic). Returns the
    published shard names in publish order.
    """
    names = []
    with LiveStreamWriter(root, writer_id=writer_id, manifest={"vocab_version": f"synthetic-{vocab}"},
                          vocab_size=vocab, durable=False, publisher=publisher) as writer:
        for s in range(start_shard, start_shard + shards):
            for j, (domain, kind) in enumerate(sorted(domains.items())):
                docs = synthetic_docs(kind, n=per_shard, vocab=vocab, seed=seed * 1_000_003 + s * 101 + j)
                samples = [
                    {"id": f"{domain}-{s}-{i}", "domain": domain, "modality": "text", "tokens": t,
                     "source": source or f"synthetic:{kind}", "license": "cc0", "pipeline_version": "synthetic",
                     "produced_at": time.time()}
                    for i, t in enumerate(docs)
                ]
                names.append(writer.write_shard(samples, domain=domain).shard)
                if interval_s:
                    time.sleep(interval_s)
    return names
