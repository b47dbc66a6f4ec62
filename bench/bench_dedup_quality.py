"""Near-dup quality on synthetic edits with known Jaccard: precision/recall at Jaccard >= 0.8.

Baseline in the same run: datasketch's MinHashLSH (threshold 0.8, 128 perms) on the same docs.
Usage: .venv/bin/python bench/bench_dedup_quality.py [--bases 2000]
"""

from __future__ import annotations

import argparse
import random
import time

from datasketch import MinHash, MinHashLSH

from beam_jobs.dedup.index import DedupConfig, DedupIndex, fingerprint
from beam_jobs.synthetic import edit_words, english_doc, true_jaccard


def corpus(bases: int, seed: int = 0):
    rng = random.Random(seed)
    docs = [(f"b{i}", english_doc(rng)) for i in range(bases)]
    variants = []
    for i in range(bases // 2):
        rate = rng.uniform(0.0, 0.12)
        text = edit_words(rng, docs[i][1], rate)
        variants.append((f"v{i}", text, f"b{i}", true_jaccard(docs[i][1], text)))
    return docs, variants


def pr(found: dict[str, str], variants, threshold: float) -> tuple[float, float]:
    positives = {v for v, _, _, j in variants if j >= threshold}
    flagged = {v for v, _, orig, _ in variants if found.get(v) == orig}
    tp = len(flagged & positives)
    return tp / max(1, len(flagged)), tp / max(1, len(positives))


def ours(docs, variants, threshold):
    config = DedupConfig(jaccard_threshold=threshold)
    index, hasher = DedupIndex(config), config.hasher()
    found = {}
    t = time.perf_counter()
    for doc_id, text in docs:
        index.check_and_add(fingerprint(doc_id, text, config, hasher))
    for v, text, _, _ in variants:
        hit = index.check_and_add(fingerprint(v, text, config, hasher))
        if hit:
            found[v] = hit[1]
    return found, time.perf_counter() - t


def datasketch_lsh(docs, variants, threshold):
    config = DedupConfig()
    hasher = config.hasher()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    found = {}
    t = time.perf_counter()
    for doc_id, text in docs:
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in hasher.shingles(text)])
        lsh.insert(doc_id, m)
    for v, text, _, _ in variants:
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in hasher.shingles(text)])
        hits = lsh.query(m)
        if hits:
            found[v] = min(hits)
        lsh.insert(v, m)
    return found, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bases", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=0.8)
    a = ap.parse_args()
    docs, variants = corpus(a.bases)
    n_pos = sum(j >= a.threshold for *_, j in variants)
    print(f"{len(docs)} base docs, {len(variants)} edited variants, {n_pos} at true Jaccard >= {a.threshold}")
    results = {}
    for name, fn in (("headwater", ours), ("datasketch", datasketch_lsh)):
        found, secs = fn(docs, variants, a.threshold)
        p, r = pr(found, variants, a.threshold)
        results[name] = (p, r, secs)
        print(f"{name:11s} precision {p:.4f} recall {r:.4f} time {secs:.2f}s")
    print(f"ratio headwater/datasketch: precision {results['headwater'][0] / results['datasketch'][0]:.3f} "
          f"recall {results['headwater'][1] / results['datasketch'][1]:.3f} "
          f"speed {results['datasketch'][2] / results['headwater'][2]:.2f}x")


if __name__ == "__main__":
    main()
