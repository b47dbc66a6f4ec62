"""Sample age at training when ingest outpaces the trainer: the live loader's freshness policy.

A writer thread publishes one shard per domain every ``--publish-every`` seconds (``--per-shard``
documents each, ``produced_at`` = now); the loader (one process, no model: each step sleeps
``--step-s``) draws batches of 4 x 128 tokens with static weights, one domain at the 0.02
floor. The stream starts with a backlog (``--backlog-shards`` per domain, published before
the trainer starts, as when a trainer starts late or restarts). Prints the age of the trained
documents (p50/p95/max) and what the freshness policy skipped. Run it on an older tree with
``PYTHONPATH=<tree>:bench`` to compare.

    PYTHONPATH=.:bench .venv/bin/python bench/bench_trainer_freshness.py [--seconds 40]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np

from trainer import cpu_compat

cpu_compat.install()

from trainer.data import LiveStreamDataLoader
from trainer.mixing import Mixer
from trainer.synthetic import write_stream

DOMAINS = {"web": "markov", "code": "counting", "junk": "noise"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--step-s", type=float, default=0.1)
    ap.add_argument("--publish-every", type=float, default=1.0)
    ap.add_argument("--per-shard", type=int, default=40)
    ap.add_argument("--backlog-shards", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_stream(root, domains=DOMAINS, shards=args.backlog_shards, per_shard=args.per_shard, vocab=512)
        stop = threading.Event()

        def publish() -> None:
            k = args.backlog_shards
            while not stop.wait(args.publish_every):
                write_stream(root, domains=DOMAINS, shards=1, per_shard=args.per_shard, vocab=512, start_shard=k)
                k += 1

        writer = threading.Thread(target=publish, daemon=True)
        mix = Mixer.Config(policy="static", weights={"web": 0.6, "code": 0.4, "junk": 0.0}, smoothing=0.0)
        loader = LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[root], mixing=mix),
                                      dp_world_size=1, dp_rank=0, seq_len=128, local_batch_size=4, vocab_size=512)
        loader.mixer.observe({}, {}, {}, {})  # the static weights (junk at the floor) take effect
        it = iter(loader)
        writer.start()
        ages: list[float] = []
        junk: list[float] = []
        end = time.monotonic() + args.seconds
        steps = 0
        while time.monotonic() < end:
            meta = next(it)[0]["_meta"]
            now = time.time()
            ages += [now - p for p in meta.produced_at]
            junk += [now - p for p, d in zip(meta.produced_at, meta.doc_domains) if d == "junk"]
            steps += 1
            time.sleep(args.step_s)
        stop.set()
        writer.join()
        skipped = loader.buffers.skipped() if hasattr(loader.buffers, "skipped") else "n/a (no freshness policy)"
        loader.close()
    a, j = np.asarray(ages), np.asarray(junk)
    produced = len(DOMAINS) * args.per_shard / args.publish_every
    print(f"{steps} steps, {len(a)} documents trained ({len(a) / args.seconds:.0f}/s; ingest {produced:.0f}/s)")
    print(f"age at training: p50 {np.median(a):.1f} s, p95 {np.percentile(a, 95):.1f} s, max {a.max():.1f} s")
    if j.size:
        print(f"floor domain 'junk' ({j.size} docs): p50 {np.median(j):.1f} s, p95 {np.percentile(j, 95):.1f} s")
    print(f"skipped by the freshness policy: {skipped}")


if __name__ == "__main__":
    main()
