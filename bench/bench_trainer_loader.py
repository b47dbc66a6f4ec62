"""Live-stream loader + mixer overhead vs a static in-memory loader, same model, same run.

Both arms train the debug_cpu model (vocab 512, seq 128, batch 4) on one process; the
live arm reads a stream root through TailReader/prefetch/packing and updates the mixer
(``--policy``, ODM by default) from per-domain losses each step, the static arm iterates pre-built tensors.
Steps alternate between the arms so machine noise hits both. Prints the step-time ratio
and the live arm's data stall (time in next() / step time) when the stream is ahead.

    PYTHONPATH=.:bench .venv/bin/python bench/bench_trainer_loader.py [--steps 150] [--policy learnability]
"""

from __future__ import annotations

import argparse
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
        write_stream(tmp, domains=DOMAINS, shards=6, per_shard=150, vocab=VOCAB)
        loader = live_loader(tmp, args.policy)
        live_it = iter(loader)
        static = [next(live_it) for _ in range(32)]  # same kind of batches, held in memory
        model_a, opt_a = make_model()
        model_b, opt_b = make_model()
        t_live, t_static, t_wait = [], [], []
        for step in range(args.steps):
            def live_step():
                (batch, labels), wait = timed(lambda: next(live_it))
                per_token = train_step(model_a, opt_a, batch, labels)
                observe(loader.mixer, batch["_meta"], per_token, labels, loader.buffers.available)
                return wait
            wait, dt = timed(live_step)
            batch, labels = static[step % len(static)]
            _, ds = timed(partial(train_step, model_b, opt_b, batch, labels))
            if step >= 10:  # skip warm-up
                t_live.append(dt), t_static.append(ds), t_wait.append(wait)
        loader.close()
    live, stat = median(t_live), median(t_static)
    print(f"static in-memory loader: {stat * 1e3:.2f} ms/step (median of {len(t_static)})")
    print(f"live stream loader+mixer: {live * 1e3:.2f} ms/step")
    print(f"overhead ratio live/static = {live / stat:.3f} ({(live / stat - 1) * 100:+.1f}%)")
    print(f"data stall (next() / step time) = {sum(t_wait) / sum(t_live) * 100:.2f}%")


if __name__ == "__main__":
    main()
