"""Dedup throughput against the number of keys and workers.

Part 1 (exact, any machine): how the keyed work spreads. For N English documents (20 % of
them near-duplicates), count the elements each keyed stage receives per key, hash keys onto
W workers (as a runner does) and report the busiest worker's share, hence the speedup that
key distribution allows: previous design (one key per language) vs the sharded chain.
Part 2 (measured here): the Dedup chain's docs/s on the FnApiRunner with 1 and 2 workers
(multi-processing); this machine has 2 cores shared with other jobs, so read it as a floor.
Usage: .venv/bin/python bench/bench_dedup_keys.py [--docs 20000] [--measure 2000]
"""

from __future__ import annotations

import argparse
import random
import time
import zlib
from collections import Counter

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.minhash import exact_key
from beam_jobs.dedup.sketch import id_hash
from beam_jobs.synthetic import edit_words, english_doc


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        texts.append(edit_words(rng, rng.choice(texts), 0.02) if texts and rng.random() < 0.2 else english_doc(rng))
    return texts


def key_loads(texts: list[str], config: DedupConfig) -> Counter:
    """Elements per key over the keyed stages (Buckets, Verify, Decide) of the sharded chain."""
    hasher, loads = config.hasher(), Counter()
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, text in enumerate(texts):
        idh = id_hash(f"d{i}")
        keys = [(-1, exact_key(text))]
        keys += list(enumerate(hasher.band_keys(hasher.signature(text, hasher.shingle_hashes(text)))))
        loads[("decide", idh)] += 1 + len(keys)
        loads[("verify", idh)] += 1
        for key in keys:
            loads[("bucket", key)] += 1
            for cand in buckets.setdefault(key, []):
                loads[("verify", cand)] += 1
                loads[("decide", idh)] += 1
            buckets[key].append(idh)
    return loads


def busiest_share(loads: Counter, workers: int) -> float:
    per_worker = Counter()
    for key, n in loads.items():
        per_worker[zlib.crc32(repr(key).encode()) % workers] += n
    return max(per_worker.values()) / sum(per_worker.values())


def measure(texts: list[str], workers: int) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.dedup.transform import Dedup
    from beam_jobs.records import Doc, KafkaCoords

    docs = [Doc(coords=KafkaCoords("k", 0, i), id=f"d{i}", source="web", license="cc", text=t, language="en")
            for i, t in enumerate(texts)]
    options = PipelineOptions(["--runner=FnApiRunner", f"--direct_num_workers={workers}",
                               "--direct_running_mode=multi_processing"])
    t = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        _ = p | beam.Create(docs, reshuffle=True) | Dedup(DedupConfig()) | beam.combiners.Count.Globally()
    return len(docs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--measure", type=int, default=2000, help="docs for the measured run (0: skip)")
    a = ap.parse_args()
    texts = corpus(a.docs)
    loads = key_loads(texts, DedupConfig())
    keys = Counter(stage for stage, _ in loads)
    print(f"{a.docs} docs -> keys per stage: {dict(keys)}; busiest key {max(loads.values())} of "
          f"{sum(loads.values())} elements")
    print("workers | busiest worker share (speedup bound): previous design, 1 key 'en' | sharded chain")
    for w in (1, 2, 4, 8, 16, 64, 256):
        share = busiest_share(loads, w)
        print(f"{w:7d} | 1.000 (x1.0) | {share:.4f} (x{1 / share:.1f})")
    if a.measure:
        sample = texts[: a.measure]
        rates = {w: measure(sample, w) for w in (1, 2)}
        print(f"measured, {a.measure} docs on FnApiRunner: 1 worker {rates[1]:.0f} docs/s, 2 workers "
              f"{rates[2]:.0f} docs/s (x{rates[2] / rates[1]:.2f})")


if __name__ == "__main__":
    main()
