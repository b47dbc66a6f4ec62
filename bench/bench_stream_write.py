"""Live stream write throughput vs the raw MDSWriter vs dd, on the same disk in the same run.

    .venv/bin/python bench/bench_stream_write.py [--mb 128] [--shard-mb 16] [--reps 3] [--compression zstd|none]

Each rep writes the same samples (int32 token arrays + metadata columns, zstd by default, xxh64) with
(a) one raw ``MDSWriter`` (shards cut at --shard-mb), (b) ``LiveStreamWriter`` publishing one
sealed shard per --shard-mb chunk with settled offset ranges, durable (fsync) as in production,
(c) the same with ``durable=False``; plus ``dd`` of the same byte count with ``conv=fdatasync``.
MB/s counts encoded (uncompressed) sample bytes; reps are interleaved (order rotated, ``sync`` before each); median and best (least
disturbed by other load on a shared machine) are reported, plus the writers' CPU seconds.
Target (issue 3): live >= 90% of raw MDSWriter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from streaming.base.format.mds.writer import MDSWriter

from streams.events import OffsetRange
from streams.mds import COLUMNS, LiveStreamWriter
from streams.vocab import Vocab


def make_samples(total_mb: int, tokens_per_sample: int, seed: int = 0) -> tuple[list[dict], int]:
    rng = np.random.default_rng(seed)
    vocab = Vocab.default()
    probe = MDSWriter(columns=COLUMNS, out=tempfile.mkdtemp())
    samples, nbytes, i = [], 0, 0
    while nbytes < total_mb * 2**20:
        n = int(rng.integers(tokens_per_sample // 2, tokens_per_sample * 3 // 2))
        s = {"id": f"doc-{i:08d}", "domain": "web", "modality": "text",
             "tokens": rng.integers(0, vocab.text_size, n, dtype=np.int32), "source": "bench://crawl",
             "license": "cc-by-4.0", "pipeline_version": "bench@1", "language": "en",
             "produced_at": time.time(), "lineage": {"filters": "v1", "tokenizer": "qwen-bpe"}}
        nbytes += len(probe.encode_sample(s)) + 4
        samples.append(s)
        i += 1
    shutil.rmtree(probe.local, ignore_errors=True)
    return samples, nbytes


def chunks(samples: list[dict], nbytes: int, shard_mb: int) -> list[list[dict]]:
    per = max(1, int(len(samples) * shard_mb * 2**20 / nbytes))
    return [samples[i:i + per] for i in range(0, len(samples), per)]


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn(*args)``."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t, time.process_time() - c


def run_raw(out: str, samples: list[dict], shard_mb: int, compression: str | None) -> None:
    with MDSWriter(columns=COLUMNS, out=out, compression=compression, hashes=["xxh64"],
                   size_limit=shard_mb * 2**20) as w:
        for s in samples:
            w.write(s)


def run_live(out: str, parts: list[list[dict]], durable: bool, compression: str | None) -> None:
    with LiveStreamWriter(out, writer_id="bench", manifest={"vocab_version": Vocab.default().version},
                          vocab_size=Vocab.default().size, durable=durable, compression=compression) as w:
        offset = 0
        for part in parts:
            rng = OffsetRange(topic="raw.text", partition=0, start=offset, end=offset + len(part))
            w.write_shard(part, domain="web", settled=[rng])
            offset += len(part)


def run_dd(out: str, nbytes: int) -> None:
    count = max(1, nbytes // 2**20)
    subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={count}", "conv=fdatasync", "status=none"],
                   check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=128, help="encoded sample bytes per rep (MiB)")
    p.add_argument("--shard-mb", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048, help="mean tokens per sample")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compression", default="zstd", help="MDS compression for both writers, or 'none'")
    p.add_argument("--dir", default=None, help="directory on the disk under test (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write results here")
    args = p.parse_args(argv)

    compression = None if args.compression == "none" else args.compression
    base = args.dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    console = Console(width=max(140, Console().width))
    samples, nbytes = make_samples(args.mb, args.tokens)
    parts = chunks(samples, nbytes, args.shard_mb)
    mib = nbytes / 2**20
    console.print(f"{len(samples)} samples, {mib:.0f} MiB encoded, {len(parts)} shards of ~{args.shard_mb} MiB")

    jobs = {
        "dd (fdatasync)": lambda out: timed(run_dd, os.path.join(out, "dd.bin"), nbytes),
        "raw MDSWriter": lambda out: timed(run_raw, out, samples, args.shard_mb, compression),
        "live, durable": lambda out: timed(run_live, out, parts, True, compression),
        "live, no fsync": lambda out: timed(run_live, out, parts, False, compression),
    }
    wall: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    with Progress(console=console) as progress:
        task = progress.add_task("benchmark", total=args.reps * len(jobs))
        labels = list(jobs)
        for rep in range(args.reps):  # interleaved and rotated, so background load hits all alike
            for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
                job = jobs[label]
                out = tempfile.mkdtemp(dir=base, prefix="hw-bench-")
                os.sync()  # start each job with no dirty pages left by the previous one
                try:
                    w, c = job(out)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                wall[label].append(mib / w)
                cpu[label].append(c)
                progress.advance(task)

    med = {k: statistics.median(v) for k, v in wall.items()}
    best = {k: max(v) for k, v in wall.items()}
    raw, dd = "raw MDSWriter", "dd (fdatasync)"
    table = Table(title=f"stream write ({args.compression}), {mib:.0f} MiB x {args.reps} reps, {len(parts)} shards")
    for col in ("writer", "MiB/s median", "MiB/s best", "vs raw (median)", "vs raw (best)", "vs dd (median)",
                "CPU s median", "reps MiB/s"):
        table.add_column(col)
    for k in jobs:
        c = "-" if k == dd else f"{statistics.median(cpu[k]):.2f}"
        table.add_row(k, f"{med[k]:.1f}", f"{best[k]:.1f}", f"{med[k] / med[raw]:.2f}x", f"{best[k] / best[raw]:.2f}x",
                      f"{med[k] / med[dd]:.2f}x", c, " ".join(f"{x:.0f}" for x in wall[k]))
    console.print(table)
    console.print(f"live (durable) / raw MDSWriter = {med['live, durable'] / med[raw]:.2f} median, "
                  f"{best['live, durable'] / best[raw]:.2f} best (target >= 0.90); "
                  f"live (no fsync) / raw = {med['live, no fsync'] / med[raw]:.2f}; "
                  f"raw MDSWriter / dd = {med[raw] / med[dd]:.2f}; live (durable) / dd = {med['live, durable'] / med[dd]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": mib, "shards": len(parts), "mib_per_s": wall, "cpu_s": cpu}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
