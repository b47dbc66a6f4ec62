"""Live-stream loader + mixer overhead vs a static in-memory loader, same model, same run.

Three arms train the debug_cpu model (vocab 512, seq 128, batch 4) on one process: the
live arm reads a stream root through the per-domain readers/packing and updates the mixer
(``--policy``, ODM by default) from per-domain losses each step; the quiet-root arm does the
same with a second stream root beside it that publishes nothing; the static arm iterates
pre-built tensors. Steps rotate between the arms so machine noise hits all three. Prints the
live/static step-time ratio, the quiet-root/live ratio and the data stall (time in next() /
step time) of both live arms when the stream is ahead.

    PYTHONPATH=.:bench .venv/bin/python bench/bench_trainer_loader.py [--steps 150] [--policy learnability]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial

import torch
from bench_trainer_common import (
    DOMAINS,
    VOCAB,
    live_loader,
    make_model,
    median,
    observe,
    timed,
    train_step,
)

from trainer.synthetic import write_stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--policy", default="odm", help="mixing policy of the live arm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        busy, quiet = os.path.join(tmp, "busy"), os.path.join(tmp, "quiet")
        write_stream(busy, domains=DOMAINS, shards=6, per_shard=150, vocab=VOCAB)
        os.makedirs(quiet)
        loaders = {"live": live_loader([busy], args.policy), "quiet": live_loader([busy, quiet], args.policy)}
        iters = {k: iter(v) for k, v in loaders.items()}
        static = [next(iters["live"]) for _ in range(32)]  # same kind of batches, held in memory
        models = {k: make_model() for k in ("live", "quiet", "static")}
        t: dict[str, list[float]] = {k: [] for k in ("live", "quiet", "static", "wait_live", "wait_quiet")}
        for step in range(args.steps):
            for arm in ("live", "quiet"):
                def live_step(arm=arm):
                    (batch, labels), wait = timed(lambda: next(iters[arm]))
                    per_token = train_step(*models[arm], batch, labels)
                    observe(loaders[arm].mixer, batch["_meta"], per_token, labels, loaders[arm].buffers.available)
                    return wait
                wait, dt = timed(live_step)
                if step >= 10:  # skip warm-up
                    t[arm].append(dt), t[f"wait_{arm}"].append(wait)
            batch, labels = static[step % len(static)]
            _, ds = timed(partial(train_step, *models["static"], batch, labels))
            if step >= 10:
                t["static"].append(ds)
        for ld in loaders.values():
            ld.close()
    live, quiet_, stat = median(t["live"]), median(t["quiet"]), median(t["static"])
    print(f"static in-memory loader: {stat * 1e3:.2f} ms/step (median of {len(t['static'])})")
    print(f"live stream loader+mixer: {live * 1e3:.2f} ms/step")
    print(f"overhead ratio live/static = {live / stat:.3f} ({(live / stat - 1) * 100:+.1f}%)")
    print(f"data stall (next() / step time) = {sum(t['wait_live']) / sum(t['live']) * 100:.2f}%")
    print(f"busy root + quiet root: {quiet_ * 1e3:.2f} ms/step; ratio to busy root alone = {quiet_ / live:.3f}; "
          f"data stall {sum(t['wait_quiet']) / sum(t['quiet']) * 100:.2f}%")


if __name__ == "__main__":
    main()
