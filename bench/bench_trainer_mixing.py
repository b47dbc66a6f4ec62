"""Online reweighting benefit: steps to reach a target held-out loss vs static uniform mixing.

Synthetic benchmark (trainer.synthetic): a noise domain (irreducible), a learnable Markov
domain and an easy counting domain. Every policy trains the same debug_cpu model from the
same init on the same stream; held-out loss = mean over domains of the loss on fixed
held-out documents, evaluated every ``--eval-every`` steps. Target = the held-out loss
uniform mixing reaches at the end of its budget; we report the first step each policy
reaches it and the saving vs uniform.

    .venv/bin/python bench/bench_trainer_mixing.py [--steps 300] [--policies uniform,learnability,odm]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from bench_trainer_common import (
    DOMAINS,
    SEQ,
    VOCAB,
    live_loader,
    make_model,
    observe,
    token_losses,
    train_step,
)

from trainer.data.packer import Doc, Packer
from trainer.synthetic import synthetic_docs, write_stream

POLICIES = {
    "uniform": ("static", {}),
    "learnability": ("learnability", {"floor": 0.1}),
    "odm": ("odm", {"smoothing": 0.0}),
    "temperature": ("temperature", {"temperature": 2.0}),
}


def heldout_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {}
    for j, (domain, kind) in enumerate(sorted(DOMAINS.items())):
        docs = iter([Doc(f"h{i}", domain, t) for i, t in
                     enumerate(synthetic_docs(kind, n=200, vocab=VOCAB, seed=999_000 + j))])
        packer = Packer(SEQ)
        rows = [packer.pack(lambda: next(docs)) for _ in range(8)]
        out[domain] = tuple(torch.from_numpy(np.stack([getattr(r, k) for r in rows]))
                            for k in ("input", "positions", "labels"))
    return out


@torch.no_grad()
def heldout_loss(model, held) -> float:
    model.eval()
    losses = []
    for inputs, positions, labels in held.values():
        per = token_losses(model, inputs, positions, labels)
        losses.append(float(per.sum() / (labels != -100).sum()))
    model.train()
    return float(np.mean(losses))


def run(root: str, policy: str, mix: dict, steps: int, every: int, held) -> tuple[list[tuple[int, float]], dict]:
    model, opt = make_model(seed=0)
    loader = live_loader(root, policy, **mix)
    it = iter(loader)
    curve = []
    for step in range(1, steps + 1):
        batch, labels = next(it)
        per_token = train_step(model, opt, batch, labels)
        observe(loader.mixer, batch["_meta"], per_token, labels, loader.buffers.available)
        if step % every == 0:
            curve.append((step, heldout_loss(model, held)))
    weights = loader.mixer.weight_dict()
    loader.close()
    return curve, weights


def first_step(curve, target: float) -> int | None:
    return next((s for s, loss in curve if loss <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--policies", default="uniform,learnability,odm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    held = heldout_batches()
    with tempfile.TemporaryDirectory() as tmp:
        write_stream(tmp, domains=DOMAINS, shards=12, per_shard=200, vocab=VOCAB, seed=1)
        curves = {}
        for name in args.policies.split(","):
            policy, mix = POLICIES[name]
            curves[name], weights = run(tmp, policy, mix, args.steps, args.eval_every, held)
            print(f"{name:13s} final held-out {curves[name][-1][1]:.4f}  weights "
                  + " ".join(f"{d}={w:.2f}" for d, w in weights.items()))
    target = curves["uniform"][-1][1]
    base = first_step(curves["uniform"], target)
    print(f"target held-out loss {target:.4f} (uniform at step {base})")
    for name, curve in curves.items():
        s = first_step(curve, target)
        saving = "n/a (not reached)" if s is None else f"{(1 - s / base) * 100:+.1f}% fewer steps"
        print(f"{name:13s} reaches target at step {s}: {saving}")


if __name__ == "__main__":
    main()
