"""Semantic dedup restart-to-first-lookup with and without the persisted FAISS index.

A stream root is filled the way ingest fills it (per batch a pending side file, then the
published text shard, then a settlement-point ``sync``), all documents under one shard key.
Then, each in a fresh process:

- **before** (no persisted index, as before this change): restart = ``sync`` + ``open`` + the
  first lookup, which builds the key's HNSW index over every held vector (and now persists it);
- a tail of ``--tail`` documents is published without a snapshot (a kill -9 after a publish);
- **after**: restart = ``sync`` (folds the tail) + ``open`` + the first lookup, which loads the
  persisted index, checks it against the snapshot (digest of id hashes and codes) and adds only
  the tail's vectors.

Then, in that warm process, one more settlement point with ``--batch`` new documents: the cost of
extending the built index and persisting it again (what each micro-batch now pays between
compactions; the horizon of that one sync is raised to hold them, so that it is not a compaction).
Embeddings are synthetic unit vectors (384-d, MiniLM's size); the model is not run.
Usage: .venv/bin/python bench/bench_semantic_ann_restart.py [--sizes 10000,100000] [--kind hnsw]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from beam_jobs.dedup.semantic import model_identity
from beam_jobs.dedup.semantic_settled import ANN, DIRNAME, sync, write_pending
from beam_jobs.dedup.sketch import coords_hash
from beam_jobs.sink import offsets_to_ranges

_RESTART = r"""
import json, os, sys, time
import numpy as np
from beam_jobs.dedup.semantic_settled import sync
import faiss, streams.mds  # noqa: F401 - imported before timing
sys.path.insert(0, os.path.dirname(sys.argv[5]))
from bench_semantic_ann_restart import publish, unit
root, kind, horizon, probe, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[6])
t0 = time.perf_counter()
index = sync(root, horizon=horizon, kind=kind).open()
t1 = time.perf_counter()
hit = index.lookup("en", np.asarray(probe, dtype=np.float32), idh=1, coordh=1, threshold=0.95)
t2 = time.perf_counter()
out = {"sync_s": t1 - t0, "first_lookup_s": t2 - t1, "docs": len(index), "hit": hit}
if batch:  # one more settlement point in this warm process: extend the built index, persist it
    from streams.mds import LiveStreamWriter
    from streams.vocab import Vocab
    vocab = Vocab.default()
    writer = LiveStreamWriter(root, writer_id="bench2", manifest={"vocab_version": vocab.version},
                              vocab_size=vocab.size, durable=False)
    publish(writer, vocab.special("<|endoftext|>"), unit(np.random.default_rng(9), batch, 384), 10**8)
    t3 = time.perf_counter()
    ref = sync(root, horizon=max(horizon, len(index) + batch), kind=kind)  # between compactions
    t4 = time.perf_counter()
    ki = ref.open().key_index("en")
    t5 = time.perf_counter()
    ki.save(os.path.join(root, "_semantic_dedup"), "en", ref.open().space)
    out.update(next_sync_s=t4 - t3, persist_s=time.perf_counter() - t5, next_docs=len(ki.idh), warm_open_s=t5 - t4)
print(json.dumps(out))
"""


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish(writer, eos: int, vecs: np.ndarray, first: int) -> None:
    """The batch's side file, then one published shard of its text samples (one shard key)."""
    from streams.events import TokenizedSample
    from streams.mds import sample_from_event

    offsets = range(first, first + len(vecs))
    write_pending(writer.root, model=model_identity(None)[0], keys=["en"] * len(vecs),
                  ids=[f"doc-{o}" for o in offsets], coordh=[coords_hash("bench", 0, o) for o in offsets], vecs=vecs)
    rows = [sample_from_event(TokenizedSample(
        id=f"doc-{o}", domain="web_en", modality="text", tokens=[11, 12, 13, eos], source="web",
        license="cc", pipeline_version="bench", language="en")) for o in offsets]
    writer.write_shard(rows, domain="web_en", settled=offsets_to_ranges("bench", 0, offsets))


def restart(root: str, kind: str, horizon: int, probe: np.ndarray, batch: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", _RESTART, root, kind, str(horizon), json.dumps(probe.tolist()),
                          os.path.abspath(__file__), str(batch)],
                         check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--horizon", type=int, default=100_000)  # DedupConfig.semantic_horizon
    ap.add_argument("--fill-batch", type=int, default=10_000)
    ap.add_argument("--tail", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--kind", default="hnsw")
    a = ap.parse_args()
    from streams.mds import LiveStreamWriter
    from streams.vocab import Vocab

    vocab, dim = Vocab.default(), 384
    for size in (int(s) for s in a.sizes.split(",")):
        rng = np.random.default_rng(size)
        work = tempfile.mkdtemp(prefix="bench-ann-restart-")
        root = os.path.join(work, "root")
        writer = LiveStreamWriter(root, writer_id="bench", manifest={"vocab_version": vocab.version},
                                  vocab_size=vocab.size, durable=False)
        eos, offset, held = vocab.special("<|endoftext|>"), 0, size - a.tail
        vecs = unit(rng, size, dim)
        t = time.perf_counter()
        while offset < held:
            n = min(a.fill_batch, held - offset)
            publish(writer, eos, vecs[offset:offset + n], offset)
            offset += n
            sync(root, horizon=a.horizon, kind="flat")  # a settlement point after each batch (builds nothing)
        fill_s = time.perf_counter() - t
        probe = vecs[held // 2] + 0.05 * unit(rng, 1, dim)[0]
        probe /= np.linalg.norm(probe)
        before = restart(root, a.kind, a.horizon, probe)  # no persisted index: builds it (and persists it)
        adir = os.path.join(root, DIRNAME, ANN)
        ann_bytes = sum(os.path.getsize(os.path.join(adir, f)) for f in os.listdir(adir))
        publish(writer, eos, vecs[held:], held)  # the tail: published, no snapshot (kill -9)
        after = restart(root, a.kind, a.horizon, probe, batch=a.batch)
        assert before["hit"] == after["hit"] == f"doc-{held // 2}", (before, after)
        print(f"{size:>7} vectors ({a.kind}, filled in {fill_s:.0f}s): restart-to-first-lookup "
              f"before {before['sync_s'] + before['first_lookup_s']:.2f} s (sync {before['sync_s']:.2f} + build "
              f"{before['first_lookup_s']:.2f}, {before['docs']} docs) | after {after['sync_s'] + after['first_lookup_s']:.2f} s "
              f"(sync+tail {after['sync_s']:.2f} + load/check/add {a.tail} {after['first_lookup_s']:.2f}, "
              f"{after['docs']} docs) | persisted index {ann_bytes / before['docs']:.0f} B/doc "
              f"| next settlement point (+{a.batch} docs, warm): sync {after['next_sync_s']:.2f} s incl. re-persist, "
              f"persist alone {after['persist_s']:.2f} s", flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
