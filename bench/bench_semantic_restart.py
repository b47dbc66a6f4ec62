"""Semantic dedup restart cost against history size, and bytes of semantic state per document.

A stream root is filled the way ingest fills it: per batch, the kept documents' embeddings in a
pending side file (``write_pending``, fsynced) and then their published text shard (no embedding
in the samples), a settlement-point ``sync`` after each batch
(compacting per key beyond ``--horizon``), then one batch published *without* a snapshot (a
kill -9 between publish and snapshot). A restart, in a fresh process, loads the snapshot plus
that tail and answers a lookup, which builds the key's ANN index (the dominant cost).
Embeddings are synthetic unit vectors (384-d, MiniLM's size); the model is not run.
Usage: .venv/bin/python bench/bench_semantic_restart.py [--sizes 1000,10000,30000] [--horizon 10000]
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
from beam_jobs.dedup.semantic_settled import DIRNAME, SemanticSettledIndex, sync, write_pending
from beam_jobs.dedup.sketch import coords_hash
from beam_jobs.sink import offsets_to_ranges

_RESTART = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from beam_jobs.dedup.semantic_settled import sync
import faiss, streams.mds  # noqa: F401 - imported before timing
t1 = time.perf_counter()
root, kind, horizon = sys.argv[1], sys.argv[2], int(sys.argv[3])
ref = sync(root, horizon=horizon, kind=kind)
index = ref.open()
t2 = time.perf_counter()
probe = np.asarray(json.loads(sys.argv[4]), dtype=np.float32)
hit = index.lookup("en", probe, idh=1, coordh=1, threshold=0.95)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "build_s": t3 - t2, "docs": len(index), "hit": hit}))
"""


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish(writer, eos: int, vecs: np.ndarray, first: int) -> float:
    """The batch's side file, then one published shard of its text samples; side-file bytes per doc."""
    from streams.events import TokenizedSample
    from streams.mds import sample_from_event

    offsets = range(first, first + len(vecs))
    path = write_pending(writer.root, model=model_identity(None)[0], keys=["en"] * len(vecs),
                         ids=[f"doc-{o}" for o in offsets], coordh=[coords_hash("bench", 0, o) for o in offsets],
                         vecs=vecs)
    per_doc = os.path.getsize(path) / len(vecs)
    rows = [sample_from_event(TokenizedSample(
        id=f"doc-{o}", domain="web_en", modality="text", tokens=[11, 12, 13, eos], source="web",
        license="cc", pipeline_version="bench", language="en")) for o in offsets]
    writer.write_shard(rows, domain="web_en", settled=offsets_to_ranges("bench", 0, offsets))
    return per_doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,30000")
    ap.add_argument("--horizon", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--tail", type=int, default=100)
    ap.add_argument("--kinds", default="flat,hnsw")
    a = ap.parse_args()
    from streams.mds import LiveStreamWriter
    from streams.vocab import Vocab

    vocab, rng, dim = Vocab.default(), np.random.default_rng(0), 384
    work = tempfile.mkdtemp(prefix="bench-sem-restart-")
    root = os.path.join(work, "root")
    writer = LiveStreamWriter(root, writer_id="bench", manifest={"vocab_version": vocab.version},
                              vocab_size=vocab.size, durable=False)
    eos, offset, side = vocab.special("<|endoftext|>"), 0, []
    probe = unit(rng, 1, dim)[0]
    for size in (int(s) for s in a.sizes.split(",")):
        t = time.perf_counter()
        while offset < size:
            n = min(a.batch, size - offset)
            side.append(publish(writer, eos, unit(rng, n, dim), offset))
            offset += n
            sync(root, horizon=a.horizon, kind="flat")  # the settlement point after each batch
        fill_s = time.perf_counter() - t
        side.append(publish(writer, eos, unit(rng, a.tail, dim), offset))
        offset += a.tail
        saved = os.path.join(work, "saved")
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(os.path.join(root, DIRNAME), saved)
        for kind in a.kinds.split(","):
            out = subprocess.run([sys.executable, "-c", _RESTART, root, kind, str(a.horizon), json.dumps(probe.tolist())],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            shutil.rmtree(os.path.join(root, DIRNAME))
            shutil.copytree(saved, os.path.join(root, DIRNAME))
            print(f"history {offset:>6} docs (filled in {fill_s:.0f}s), {kind:>4}: restart load+tail {r['load_s'] * 1e3:7.1f} ms, "
                  f"index build on first lookup {r['build_s']:.2f} s, {r['docs']} docs held", flush=True)
        sync(root, horizon=a.horizon, kind="flat")
        index = SemanticSettledIndex.load(root)
        print(f"  snapshot: {len(index)} docs in {len(index.segments)} segments, {index.nbytes() / len(index):.1f} B/doc; "
              f"pending side files: {np.mean(side):.0f} B/doc (until folded; none in the samples)", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
