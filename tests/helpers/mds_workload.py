"""Subprocess workloads for the live MDS stream tests.

``append ROOT WRITER_ID SHARDS SAMPLES [--sleep S] [--wait-for FILE]``: publish shards whose
samples are checkable (:func:`expected_tokens` of their id).
``resume-append ROOT WRITER_ID SHARDS SAMPLES``: the same, resuming after what is settled (a
fold after every publish), for kill -9 tests.
``snapshots ROOT --until FILE``: read the root with a STOCK ``streaming.StreamingDataset``
over and over until FILE exists (then once more); print one JSON line per snapshot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def expected_tokens(sample_id: str) -> np.ndarray:
    seed = sum(sample_id.encode()) * 31 + len(sample_id)
    return (np.arange(1 + seed % 97, dtype=np.int64) * 7 + seed) % 151_643


def make_samples(writer_id: str, shard: int, n: int) -> list[dict]:
    return [
        {"id": f"{writer_id}-{shard}-{i}", "modality": "text", "tokens": expected_tokens(f"{writer_id}-{shard}-{i}"),
         "source": "test", "license": "cc0", "lineage": {"shard": shard, "i": i}, "produced_at": 1.0}
        for i in range(n)
    ]


def append(args: argparse.Namespace) -> None:
    from streams.events import OffsetRange
    from streams.mds import LiveStreamWriter

    if args.wait_for:
        while not os.path.exists(args.wait_for):
            time.sleep(0.05)
    with LiveStreamWriter(args.root, writer_id=args.writer_id, manifest={"vocab_version": "v1-test"}) as w:
        for k in range(args.shards):
            rng = [OffsetRange(topic=f"raw.{args.writer_id}", partition=0, start=k * 10, end=k * 10 + 10)]
            w.write_shard(make_samples(args.writer_id, k, args.samples), domain="web", settled=rng)
            time.sleep(args.sleep)


def resume_append(args: argparse.Namespace) -> None:
    from streams.events import OffsetRange
    from streams.mds import LiveStreamWriter

    with LiveStreamWriter(args.root, writer_id=args.writer_id, manifest={"vocab_version": "v1-test"},
                          fold_interval_s=0.0) as w:
        settled = w.settled()
        for k in range(args.shards):
            rng = OffsetRange(topic=f"raw.{args.writer_id}", partition=0, start=k * 10, end=k * 10 + 10)
            if any(r.topic == rng.topic and r.start <= rng.start and rng.end <= r.end for r in settled):
                continue
            w.write_shard(make_samples(args.writer_id, k, args.samples), domain="web", settled=[rng])
            time.sleep(0.02)


def snapshots(args: argparse.Namespace) -> None:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    open(args.ready, "w").close()
    final = False
    while True:
        final = os.path.exists(args.until)
        if os.path.exists(os.path.join(args.root, "index.json")):
            clean_stale_shared_memory()
            ds = StreamingDataset(local=args.root, shuffle=False, batch_size=1)
            ids = []
            for s in ds:
                if not np.array_equal(s["tokens"], expected_tokens(s["id"])):
                    raise SystemExit(f"torn sample {s['id']}")
                ids.append(s["id"])
            if len(set(ids)) != len(ids) or len(ids) != ds.num_samples:
                raise SystemExit(f"snapshot inconsistent: {len(ids)} ids, {len(set(ids))} unique, {ds.num_samples}")
            print(json.dumps({"samples": len(ids), "shards": ds.num_shards}), flush=True)
            del ds
            gc.collect()
        if final:
            return
        time.sleep(0.02)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("append")
    a.add_argument("root")
    a.add_argument("writer_id")
    a.add_argument("shards", type=int)
    a.add_argument("samples", type=int)
    a.add_argument("--sleep", type=float, default=0.0)
    a.add_argument("--wait-for", default="")
    r = sub.add_parser("resume-append")
    for name in ("root", "writer_id"):
        r.add_argument(name)
    r.add_argument("shards", type=int)
    r.add_argument("samples", type=int)
    s = sub.add_parser("snapshots")
    s.add_argument("root")
    s.add_argument("--until", required=True)
    s.add_argument("--ready", required=True)
    args = p.parse_args()
    {"append": append, "resume-append": resume_append, "snapshots": snapshots}[args.cmd](args)


if __name__ == "__main__":
    main()
