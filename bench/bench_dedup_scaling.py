"""Dedup cost per new record as the index grows (1k -> 100k seen docs): it must stay flat.

Baseline in the same run: datasketch MinHashLSH query+insert with the same signatures.
Usage: .venv/bin/python bench/bench_dedup_scaling.py [--sizes 1000,10000,100000] [--probe 1000]
"""

from __future__ import annotations

import argparse
import random
import time

from datasketch import LeanMinHash, MinHash, MinHashLSH

from beam_jobs.dedup.index import DedupConfig, DedupIndex, fingerprint
from beam_jobs.synthetic import english_doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--probe", type=int, default=1000)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    config = DedupConfig()
    hasher = config.hasher()
    rng = random.Random(0)
    t0 = time.perf_counter()
    fps = [fingerprint(f"d{i}", english_doc(rng), config, hasher) for i in range(max(sizes) + a.probe)]
    print(f"fingerprinted {len(fps)} docs in {time.perf_counter() - t0:.1f}s")
    sigs = {}
    index, lsh = DedupIndex(config), MinHashLSH(threshold=0.8, num_perm=128)
    seen = 0
    rows = []
    for n in sizes:
        for fp in fps[seen:n]:
            index.add(fp)
            if fp.doc_id not in sigs:
                sigs[fp.doc_id] = LeanMinHash(MinHash(num_perm=128, hashvalues=hasher.signature("", fp.shingles), scheme="legacy"))
            lsh.insert(fp.doc_id, sigs[fp.doc_id])
        seen = n
        probe = fps[-a.probe :]
        probe_sigs = [LeanMinHash(MinHash(num_perm=128, hashvalues=hasher.signature("", fp.shingles), scheme="legacy")) for fp in probe]
        t = time.perf_counter()
        for fp in probe:
            index.check(fp)
        ours = (time.perf_counter() - t) / len(probe) * 1e6
        t = time.perf_counter()
        for m in probe_sigs:
            lsh.query(m)
        theirs = (time.perf_counter() - t) / len(probe) * 1e6
        rows.append((n, ours, theirs))
        print(f"seen {n:>7}: headwater check {ours:7.1f} us/record   datasketch query {theirs:7.1f} us/record")
    print(f"growth {sizes[0]}->{sizes[-1]}: headwater x{rows[-1][1] / rows[0][1]:.2f}, datasketch x{rows[-1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
