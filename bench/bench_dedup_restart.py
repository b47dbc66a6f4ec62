"""Dedup restart cost against history size, and bytes of dedup state per document.

A stream root is filled the way ingest fills it: batches of published text shards (real BPE
tokens, each sample's dedup record in its lineage), a settlement-point snapshot after each
batch, then one more batch published *without* a snapshot (a kill -9 between publish and
snapshot). A restart, in a fresh process, loads the snapshot plus that tail and answers a
lookup. Baseline in the same run: the previous design's restart, which decoded and
re-fingerprinted every published sample (run at the sizes up to ``--baseline-max``).
Usage: .venv/bin/python bench/bench_dedup_restart.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.minhash import exact_key
from beam_jobs.dedup.record import DedupRecord, encode_record
from beam_jobs.dedup.settled import SettledIndex, sync
from beam_jobs.dedup.sketch import coords_hash, id_hash, make_sketch
from beam_jobs.sink import offsets_to_ranges
from beam_jobs.synthetic import english_doc

_RESTART = r"""
import json, sys, time
t0 = time.perf_counter()
from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.settled import sync
from beam_jobs.dedup.sketch import id_hash
import streams.mds  # noqa: F401 - imported by both designs before timing (mosaicml streaming)
t1 = time.perf_counter()
root, text = sys.argv[1], sys.argv[2]
ref = sync(root)
index = ref.open()
c = DedupConfig(); h = c.hasher(); sh = h.shingle_hashes(text)
bands = [b & 0xFFFFFFFF for b in h.band_keys(h.signature(text, sh))]
hit = index.lookup(idh=id_hash("probe"), coordh=0, exact=None, bands=bands, shingles=sh, threshold=c.jaccard_threshold)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "restart_s": t2 - t1, "docs": len(index), "hit": hit}))
"""

_BASELINE = r"""
import json, sys, time
t0 = time.perf_counter()
from beam_jobs.dedup.index import DedupConfig, DedupIndex, fingerprint
from streams.mds import TailReader
from streams.vocab import Vocab
t1 = time.perf_counter()
c = DedupConfig(num_perm=128, bands=20, rows=6)  # the previous design's index
h, index, vocab = c.hasher(), DedupIndex(c), Vocab.default()
with TailReader(sys.argv[1]) as reader:
    for s in reader.samples(timeout_s=0):
        text = vocab.decode([int(t) for t in s["tokens"][:-1]])
        index.add(fingerprint(s["id"], text, c, h))
print(json.dumps({"imports_s": t1 - t0, "restart_s": time.perf_counter() - t1, "docs": len(index)}))
"""


def publish(root: str, writer, vocab, config: DedupConfig, texts: list[tuple[int, str]]) -> None:
    """One published shard of text samples carrying their dedup records."""
    from streams.events import TokenizedSample
    from streams.mds import sample_from_event

    hasher, eos = config.hasher(), vocab.special("<|endoftext|>")
    rows = []
    for offset, text in texts:
        doc_id = f"doc-{offset}"
        shingles = hasher.shingle_hashes(text)
        sketch = make_sketch(id_hash(doc_id), coords_hash("bench", 0, offset), shingles, config.bloom_bytes)
        bands = [b & 0xFFFFFFFF for b in hasher.band_keys(hasher.signature(text, shingles))]
        record = DedupRecord(sketch, bands, exact_key(text))
        rows.append(sample_from_event(TokenizedSample(
            id=doc_id, domain="web_en", modality="text", tokens=[*vocab.encode(text), eos], source="web",
            license="cc", pipeline_version="bench", language="en", lineage={"dedup": encode_record(record)})))
    writer.write_shard(rows, domain="web_en", settled=offsets_to_ranges("bench", 0, [o for o, _ in texts]))


def run(script: str, root: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, root, *extra], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--batch", type=int, default=1000, help="docs per published batch (one snapshot each)")
    ap.add_argument("--tail", type=int, default=100, help="docs published after the last snapshot")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-max", type=int, default=10000)
    a = ap.parse_args()
    from streams.mds import LiveStreamWriter
    from streams.vocab import Vocab

    sizes = [int(s) for s in a.sizes.split(",")]
    config, vocab, rng = DedupConfig(), Vocab.default(), random.Random(0)
    work = tempfile.mkdtemp(prefix="bench-restart-")
    root = os.path.join(work, "root")
    writer = LiveStreamWriter(root, writer_id="bench", manifest={"vocab_version": vocab.version},
                              vocab_size=vocab.size, durable=False)
    offset, rows = 0, []
    probe = english_doc(rng)
    for size in sizes:
        t = time.perf_counter()
        while offset < size:
            n = min(a.batch, size - offset)
            publish(root, writer, vocab, config, [(offset + i, english_doc(rng)) for i in range(n)])
            offset += n
            sync(root)  # the settlement point after each batch
        build_s = time.perf_counter() - t
        publish(root, writer, vocab, config, [(offset + i, english_doc(rng)) for i in range(a.tail)])
        offset += a.tail  # published, not yet snapshotted: the restart's tail
        saved = os.path.join(work, "saved-dedup")
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(os.path.join(root, "_dedup"), saved)
        runs = []
        for _ in range(a.repeats):
            runs.append(run(_RESTART, root, probe))
            shutil.rmtree(os.path.join(root, "_dedup"))
            shutil.copytree(saved, os.path.join(root, "_dedup"))
        restart = statistics.median(r["restart_s"] for r in runs)
        imports = statistics.median(r["imports_s"] for r in runs)
        sync(root)
        index = SettledIndex.load(root)
        per_doc = index.nbytes() / len(index)
        base = run(_BASELINE, root) if offset <= a.baseline_max + a.tail else None
        rows.append((offset, restart, imports, per_doc, base))
        print(f"history {offset:>7} docs ({len(index.segments)} segments, built in {build_s:.0f}s): restart "
              f"{restart * 1e3:7.1f} ms (+ imports {imports:.2f}s); state {per_doc:.1f} B/doc"
              + (f"; previous design re-read: {base['restart_s']:.2f}s" if base else ""), flush=True)
    first, last = rows[0], rows[-1]
    print(f"restart ratio {first[0]} -> {last[0]} docs: x{last[1] / first[1]:.2f} (target <= 1.3)")
    bands = config.bands
    print(f"state per doc: settled index {last[3]:.1f} B (near-dup: 19 B head + {config.bloom_bytes} B filter + "
          f"16 B id + {bands}x8 B band tables; exact: 12 B); Beam state: {bands}x8 B bucket ids + "
          f"{19 + config.bloom_bytes} B sketch + id (<= 16 B)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
