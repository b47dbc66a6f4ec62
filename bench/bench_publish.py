"""Publish cost against history, and publish -> visible latency, for a local and an S3 root.

    .venv/bin/python bench/bench_publish.py [--small 100] [--large 10000] [--publishes 20] [--no-s3]

Publish cost: wall time of one ``LiveStreamWriter.write_shard`` (8 samples x 512 tokens, zstd,
durable) into a root that already holds N shards, N = --small and --large; the median of
--publishes, and the mean over enough publishes to include at least one fold (N/8 + 1 publishes: a
local root's journal into index.json, an S3 writer's log into its base plus a merge), i.e. the
amortized cost. A root with N shards is seeded by cloning one real publish N times (distinct names
and settled ranges; local: index.json, sidecar and hard-linked shard files; S3: a ``seed``
writer's base index and sidecar plus the merged index), i.e. the metadata N real publishes leave,
without the O(N^2) cost of making them.

Publish -> visible: a thread polls ``IndexWatcher(root)`` every 1 ms; latency = the first poll
listing the shard - the start of ``write_shard`` (so it includes sealing). The S3 root is moto's
server on 127.0.0.1, started here and configured only through AWS_ENDPOINT_URL and the key
variables. Ratios are within this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from infra.local_s3 import start_local_s3
from streams import manifest as mf
from streams import storage
from streams import writer_log as wl
from streams.events import OffsetRange
from streams.mds import LiveStreamWriter
from streams.mds_reader import IndexWatcher

MANIFEST = {"vocab_version": "v1-bench"}
RNG = np.random.default_rng(0)


def rows(k: int) -> list[dict]:
    return [{"id": f"{k}-{i}", "modality": "text", "tokens": RNG.integers(0, 150000, 512, dtype=np.int32),
             "source": "bench", "license": "cc0"} for i in range(8)]


def seeded_entries(template_info: dict, template_entry: dict, n: int) -> tuple[list, dict]:
    """``n`` index entries and sidecar entries cloned from one real publish (distinct names/ranges)."""
    infos, entries = [], {}
    for i in range(n):
        name = f"web.seed.{i:016x}"
        info = copy.deepcopy(template_info)
        info["raw_data"]["basename"] = f"{name}.mds"
        info["zip_data"]["basename"] = f"{name}.mds.zstd"
        entry = {**template_entry, "writer_id": "seed",
                 "settled": mf.ranges_to_json([OffsetRange(topic="raw.seed", partition=0, start=10 * i, end=10 * i + 10)])}
        infos.append(info)
        entries[name] = entry
    return infos, entries


def seed_local(root: str, n: int) -> None:
    with LiveStreamWriter(root, writer_id="tpl", manifest=MANIFEST) as w:
        pub = w.write_shard(rows(0), domain="web", settled=[OffsetRange(topic="raw.tpl", partition=0, start=0, end=1)])
    index, side = mf.read_index(root), mf.read_sidecar(root)
    (info,) = index["shards"]
    infos, entries = seeded_entries(info, side["shards"][pub.shard], n)
    src = os.path.join(root, info["zip_data"]["basename"])
    for i in infos:
        os.link(src, os.path.join(root, i["zip_data"]["basename"]))
    side["shards"].update(entries)
    with mf.root_lock(root):
        mf.write_root(root, {"shards": index["shards"] + infos}, side)


def seed_s3(root: str, n: int) -> None:
    with LiveStreamWriter(root, writer_id="tpl", manifest=MANIFEST) as w:
        pub = w.write_shard(rows(0), domain="web", settled=[OffsetRange(topic="raw.tpl", partition=0, start=0, end=1)])
    store = storage.object_root(root)
    index = store.writer_index("tpl")[0]
    side = mf.read_writer_sidecar(store, "tpl")[0]
    infos, entries = seeded_entries(index["shards"][0], side["shards"][pub.shard], n)
    seed_side = {**mf.empty_sidecar(), "vocab_version": MANIFEST["vocab_version"], "shards": entries}
    store.put("writers/seed/headwater.json", storage.json_bytes(seed_side))
    store.put("writers/seed/index.json", storage.json_bytes({"version": 2, "shards": infos}))
    wl.merge_index(store)


def publish_costs(root: str, publishes: int) -> list[float]:
    out = []
    with LiveStreamWriter(root, writer_id="bench", manifest=MANIFEST) as w:
        for k in range(publishes):
            r = rows(k)
            t = time.perf_counter()
            w.write_shard(r, domain="web", settled=[OffsetRange(topic="raw.bench", partition=0, start=10 * k, end=10 * k + 10)])
            out.append(time.perf_counter() - t)
    return out


def visible_latency(root: str, publishes: int) -> list[float]:
    watcher = IndexWatcher(root)
    watcher.poll()
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for e in watcher.poll():
                seen.setdefault(e.name, time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out = []
    try:
        with LiveStreamWriter(root, writer_id="lat", manifest=MANIFEST) as w:
            for k in range(publishes):
                r = rows(k)
                start = time.perf_counter()
                pub = w.write_shard(r, domain="web", settled=[OffsetRange(topic="raw.lat", partition=0, start=10 * k, end=10 * k + 10)])
                deadline = time.monotonic() + 30
                while pub.shard not in seen and time.monotonic() < deadline:
                    time.sleep(0.0005)
                out.append(seen[pub.shard] - start)
    finally:
        stop.set()
        t.join()
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--large", type=int, default=10_000)
    p.add_argument("--publishes", type=int, default=20)
    p.add_argument("--no-s3", action="store_true", help="local root only")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    results: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="bench-publish-")
    proc = None
    try:
        kinds = [("local", lambda: os.path.join(tmp, uuid.uuid4().hex), seed_local)]
        if not a.no_s3:
            proc, env = start_local_s3("bench")
            os.environ.update(env)
            kinds.append(("s3 (moto)", lambda: f"s3://bench/{uuid.uuid4().hex}", seed_s3))
        for kind, new_root, seed in kinds:
            res = results[kind] = {}
            for n in (a.small, a.large):
                root = new_root()
                t = time.perf_counter()
                seed(root, n)
                count = max(a.publishes, n // mf.FOLD_FRACTION + 1)  # at least one fold: the amortized cost
                costs = publish_costs(root, count)
                res[f"publish_s@{n}"], res[f"publish_mean_s@{n}"] = med(costs), statistics.fmean(costs)
                print(f"{kind:10s} publish at {n:>6} shards: median {med(costs) * 1e3:8.1f} ms  "
                      f"mean {statistics.fmean(costs) * 1e3:8.1f} ms  max {max(costs) * 1e3:8.1f} ms  "
                      f"({count} publishes; seeded in {time.perf_counter() - t:.1f} s)", flush=True)
            res["ratio_large_small"] = res[f"publish_s@{a.large}"] / res[f"publish_s@{a.small}"]
            res["mean_ratio_large_small"] = res[f"publish_mean_s@{a.large}"] / res[f"publish_mean_s@{a.small}"]
            lat = visible_latency(new_root(), a.publishes)
            res["visible_p50_s"], res["visible_p95_s"] = med(lat), float(np.percentile(lat, 95))
            print(f"{kind:10s} publish cost ratio {a.large}/{a.small} shards: median {res['ratio_large_small']:.2f}x, "
                  f"mean {res['mean_ratio_large_small']:.2f}x  (target <= 1.5x)", flush=True)
            print(f"{kind:10s} publish->visible: p50 {res['visible_p50_s'] * 1e3:.1f} ms  "
                  f"p95 {res['visible_p95_s'] * 1e3:.1f} ms", flush=True)
        if len(results) == 2:
            r = results["s3 (moto)"]["visible_p50_s"] / results["local"]["visible_p50_s"]
            print(f"publish->visible p50, s3 (moto) / local: {r:.1f}x")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
