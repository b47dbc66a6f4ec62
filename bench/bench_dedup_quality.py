"""Near-dup quality on synthetic edits with known Jaccard: precision/recall at Jaccard >= 0.8.

headwater: the ingest's own sharded Beam chain (``beam_jobs.dedup.Dedup`` on the FnApiRunner):
LSH over (band, bucket) keys, verification against the bounded per-document sketch.
Baselines in the same run on the same docs: datasketch MinHashLSH (threshold 0.8, 128 perms)
and, when its venv exists (``bash bench/build_datatrove_venv.sh``), datatrove's 4-stage MinHash
dedup (signatures, buckets, clusters, filter; 14 buckets x 8 hashes, its defaults).
Usage: .venv/bin/python bench/bench_dedup_quality.py [--bases 2000] [--datatrove-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time

from datasketch import MinHash, MinHashLSH

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.synthetic import edit_words, english_doc, true_jaccard

DATATROVE_PYTHON = "build/datatrove-venv/bin/python"
_DATATROVE_WORKER = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                               MinhashDedupFilter, MinhashDedupSignature)
src, work = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(src)]
def read(data, rank=0, world_size=1):
    yield from (Document(text=r["text"], id=r["id"]) for r in rows)
def kept(data, rank=0, world_size=1):
    with open(f"{work}/kept.txt", "w") as f:
        f.writelines(doc.id + "\n" for doc in data)
    yield from ()
if __name__ == "__main__":
    cfg = MinhashConfig()
    t0 = time.perf_counter()
    stages = [([read, MinhashDedupSignature(output_folder=f"{work}/sig", config=cfg)], 1),
              ([MinhashDedupBuckets(input_folder=f"{work}/sig", output_folder=f"{work}/buckets", config=cfg)],
               cfg.num_buckets),
              ([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=cfg)], 1),
              ([read, MinhashDedupFilter(input_folder=f"{work}/remove"), kept], 1)]
    for i, (steps, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{i}").run()
    print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


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
    """The Beam Dedup chain over bases then variants (offsets in that order: originals win ties)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.dedup.transform import Dedup
    from beam_jobs.records import Doc, KafkaCoords

    rows = [(i, text) for i, text in docs] + [(v, text) for v, text, _, _ in variants]
    elements = [Doc(coords=KafkaCoords("bench", 0, n), id=i, source="web", license="cc", text=text, language="en")
                for n, (i, text) in enumerate(rows)]
    out = os.path.join(tempfile.mkdtemp(prefix="bench-dedup-"), "verdicts")
    t = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = (p | beam.Create(elements) | Dedup(DedupConfig(jaccard_threshold=threshold))
             | beam.Map(lambda d: json.dumps([d.id, d.lineage.get("dup_of")])) | beam.io.WriteToText(out))
    secs = time.perf_counter() - t
    found = {}
    for name in os.listdir(os.path.dirname(out)):
        with open(os.path.join(os.path.dirname(out), name)) as f:
            for line in f:
                doc_id, dup_of = json.loads(line)
                if dup_of is not None:
                    found[doc_id] = dup_of
    return found, secs


def datatrove(docs, variants, python: str):
    """datatrove's MinHash dedup in its own venv: removed variant -> the kept doc of its cluster."""
    work = tempfile.mkdtemp(prefix="bench-datatrove-")
    src = os.path.join(work, "in.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in [*docs, *[(v, t) for v, t, _, _ in variants]])
    worker = os.path.join(work, "worker.py")
    with open(worker, "w") as f:
        f.write(_DATATROVE_WORKER)
    res = subprocess.run([python, worker, src, work], capture_output=True, text=True, check=True)
    secs = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
    with open(os.path.join(work, "kept.txt")) as f:
        survivors = {line.strip() for line in f}
    removed = {d for d, _ in docs} | {v for v, *_ in variants}
    removed -= survivors
    # datatrove keeps one document per cluster (the first); a removed variant counts as found
    # when its own base survived (the variant's only near-dup in this corpus).
    return {v: orig for v, _, orig, _ in variants if v in removed and orig in survivors}, secs


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
    ap.add_argument("--datatrove-python", default=DATATROVE_PYTHON)
    a = ap.parse_args()
    docs, variants = corpus(a.bases)
    n_pos = sum(j >= a.threshold for *_, j in variants)
    print(f"{len(docs)} base docs, {len(variants)} edited variants, {n_pos} at true Jaccard >= {a.threshold}")
    runs = [("headwater", lambda: ours(docs, variants, a.threshold)),
            ("datasketch", lambda: datasketch_lsh(docs, variants, a.threshold))]
    if os.path.exists(a.datatrove_python):
        runs.append(("datatrove", lambda: datatrove(docs, variants, a.datatrove_python)))
    else:
        print(f"datatrove: skipped ({a.datatrove_python} missing; bash bench/build_datatrove_venv.sh)")
    results = {}
    for name, fn in runs:
        found, secs = fn()
        p, r = pr(found, variants, a.threshold)
        results[name] = (p, r, secs)
        print(f"{name:11s} precision {p:.4f} recall {r:.4f} time {secs:.2f}s")
    for other in [n for n in results if n != "headwater"]:
        print(f"ratio headwater/{other}: precision {results['headwater'][0] / max(results[other][0], 1e-9):.3f} "
              f"recall {results['headwater'][1] / max(results[other][1], 1e-9):.3f}")


if __name__ == "__main__":
    main()
