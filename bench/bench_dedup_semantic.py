"""Semantic dedup index at 100k vectors: recall of HNSW / IVF against exact flat search, query time.

Vectors: 384-d (MiniLM's size), clustered like sentence embeddings (1,000 topic centres, unit
norm). Queries: near-duplicates of indexed vectors (cosine ~0.97) and unrelated new vectors.
Recall@1 = the approximate index returns flat search's nearest neighbour; "decision agreement"
= it takes the same keep/drop decision at the dedup threshold. One FAISS thread; per-query
latency is measured one query at a time (how the dedup stage calls it).
Usage: .venv/bin/python bench/bench_dedup_semantic.py [--n 100000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from beam_jobs.dedup.semantic import SemanticIndex, faiss_gpu_available


def data(n: int, queries: int, dim: int = 384, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dups = x[rng.integers(0, n, queries // 2)] + 0.012 * rng.standard_normal((queries // 2, dim)).astype(np.float32)
    fresh = centres[rng.integers(0, 1000, queries - queries // 2)] + 0.9 * rng.standard_normal(
        (queries - queries // 2, dim)).astype(np.float32)
    q = np.concatenate([dups, fresh])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=0.95)
    a = ap.parse_args()
    faiss.omp_set_num_threads(1)
    x, q = data(a.n, a.queries)
    ids = [str(i) for i in range(a.n)]
    results = {}
    for kind, kw in (("flat", {}), ("hnsw", {"ef_search": 64}),
                     ("ivf", {"nlist": 1024, "nprobe": 16, "train_size": a.n})):
        index = SemanticIndex(x.shape[1], kind, gpu=False, **kw)
        t = time.perf_counter()
        index.add_many(x, ids)
        build = time.perf_counter() - t
        t = time.perf_counter()
        scores, found = zip(*(index.search_many(v[None, :]) for v in q))
        per_query = (time.perf_counter() - t) / len(q)
        results[kind] = (np.array([s[0, 0] for s in scores]), np.array([f[0, 0] for f in found]), build, per_query)
    flat_s, flat_i, _, flat_t = results["flat"]
    for kind, (s, i, build, per_query) in results.items():
        recall = float((i == flat_i).mean())
        agree = float(((s >= a.threshold) == (flat_s >= a.threshold)).mean())
        print(f"{kind:5s} n={a.n}: recall@1 {recall:.4f}  decision agreement {agree:.4f}  "
              f"query {per_query * 1e3:.3f} ms ({flat_t / per_query:.1f}x flat)  build {build:.1f}s")
    dups = int((flat_s >= a.threshold).sum())
    print(f"{dups} of {len(q)} queries are duplicates at cosine >= {a.threshold} (flat); "
          f"faiss-gpu available: {faiss_gpu_available()}")


if __name__ == "__main__":
    main()
