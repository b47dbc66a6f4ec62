"""Online reweighting benefit: steps to reach a target held-out loss vs static uniform mixing.

Scenarios (trainer.synthetic domains; one stream per scenario and seed):

- ``junk``: noise + counting + markov + wide_markov in the stream; held-out = the three learnable
  domains. The noise domain stands for junk that got past the filters: steps spent on it are lost.
- ``difficulty``: counting + markov + wide_markov, held-out = all three (domains of different
  difficulty, nothing to throw away).
- ``noise-eval``: noise + markov + counting with the noise domain *in* the held-out mean: the
  model's excess loss on random tokens grows when it sees fewer of them, so down-weighting junk
  costs held-out loss here (and ODM's loss-as-reward up-weights it).

Every policy trains the same debug_cpu model from the same init on the same stream through the
live loader and the mixer; held-out loss = mean over the held-out domains of the loss on fixed
held-out documents, every ``--eval-every`` steps, smoothed over 3 evaluations. Target = uniform's
smoothed held-out loss at the end of its budget; we report the first step each policy reaches it.
Writes a JSON summary and a PNG of the held-out curves and weights.

    PYTHONPATH=.:bench .venv/bin/python bench/bench_trainer_mixing.py [--steps 600] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from bench_trainer_common import (
    SEQ,
    VOCAB,
    live_loader,
    make_model,
    observe,
    token_losses,
    train_step,
)
from rich.progress import Progress

from trainer.data.packer import Doc, Packer
from trainer.synthetic import synthetic_docs, write_stream


@dataclass(frozen=True)
class Scenario:
    domains: dict[str, str]  # domain -> synthetic kind
    heldout: tuple[str, ...]


SCENARIOS = {
    "junk": Scenario({"noise": "noise", "counting": "counting", "markov": "markov", "wide": "wide_markov"},
                     ("counting", "markov", "wide")),
    "difficulty": Scenario({"counting": "counting", "markov": "markov", "wide": "wide_markov"},
                           ("counting", "markov", "wide")),
    "noise-eval": Scenario({"noise": "noise", "markov": "markov", "counting": "counting"},
                           ("counting", "markov", "noise")),
}
POLICIES = {
    "uniform": ("static", {}),
    "learnability": ("learnability", {"smoothing": 0.9, "floor": 0.05}),
    "odm": ("odm", {"smoothing": 0.0}),
    "temperature": ("temperature", {"temperature": 2.0}),
}
SMOOTH = 3


def heldout_batches(sc: Scenario, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    out = {}
    for j, domain in enumerate(sc.heldout):
        docs = iter([Doc(f"h{i}", domain, t) for i, t in
                     enumerate(synthetic_docs(sc.domains[domain], n=400, vocab=VOCAB, seed=999_000 + 97 * seed + j))])
        packed = Packer(SEQ).pack_batch(docs.__next__, 16)
        out[domain] = tuple(torch.from_numpy(getattr(packed, k)) for k in ("input", "positions", "labels"))
    return out


@torch.no_grad()
def heldout_loss(model, held) -> float:
    model.eval()
    losses = [float(token_losses(model, i, p, lab).sum() / (lab != -100).sum()) for i, p, lab in held.values()]
    model.train()
    return float(np.mean(losses))


def run(root: str, policy: str, mix: dict, steps: int, every: int, held, seed: int, tick) -> dict:
    model, opt = make_model(seed=seed)
    loader = live_loader([root], policy, **mix)
    it = iter(loader)
    evals, weights = [], []
    for step in range(1, steps + 1):
        batch, labels = next(it)
        per_token = train_step(model, opt, batch, labels)
        observe(loader.mixer, batch["_meta"], per_token, labels, loader.buffers.available)
        if step % every == 0:
            evals.append((step, heldout_loss(model, held)))
            weights.append(loader.mixer.weight_dict())
        tick()
    loader.close()
    steps_, losses = zip(*evals)
    smooth = np.convolve(losses, np.ones(SMOOTH) / SMOOTH, mode="valid")
    return {"steps": list(steps_), "heldout": list(losses), "smoothed": smooth.tolist(), "weights": weights}


def first_step(result: dict, target: float) -> int | None:
    """First eval step (the last of the smoothing window) whose smoothed held-out loss <= target."""
    offset = SMOOTH - 1
    return next((result["steps"][i + offset] for i, v in enumerate(result["smoothed"]) if v <= target), None)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    domains = sorted({d for r in results.values() for res in r["runs"].values() for d in res["weights"][-1]})
    colour = {d: f"C{i}" for i, d in enumerate(domains)}
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for c, sc in enumerate(names):
        runs = results[sc]["runs"]
        for pol, res in runs.items():
            axes[0][c].plot(res["steps"][SMOOTH - 1:], res["smoothed"], label=pol)
        axes[0][c].axhline(results[sc]["target"], color="grey", lw=0.8, ls="--")
        axes[0][c].set(title=f"{sc}: held-out loss (seed {results[sc]['seed']})", xlabel="step")
        axes[0][c].set_ylim(results[sc]["target"] - 0.6, results[sc]["target"] + 1.5)
        axes[0][c].legend()
        for pol in ("learnability", "odm"):
            if pol in runs:
                ws = runs[pol]["weights"]
                for d in ws[-1]:
                    axes[1][c].plot(runs[pol]["steps"], [w.get(d, 0) for w in ws], color=colour[d],
                                    ls="-" if pol == "learnability" else ":", label=f"{pol}:{d}")
        axes[1][c].set(title="domain weights (solid: learnability, dotted: odm)", xlabel="step", ylim=(0, 1))
        axes[1][c].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--scenarios", default="junk,difficulty,noise-eval")
    ap.add_argument("--policies", default="uniform,learnability,odm")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="bench_trainer_mixing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scenarios, policies = args.scenarios.split(","), args.policies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    summary: dict = {}
    rows = []
    with Progress() as progress:
        task = progress.add_task("training", total=len(scenarios) * len(seeds) * len(policies) * args.steps)
        for sc_name in scenarios:
            sc = SCENARIOS[sc_name]
            for seed in seeds:
                held = heldout_batches(sc, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    write_stream(tmp, domains=sc.domains, shards=12, per_shard=200, vocab=VOCAB, seed=1 + seed)
                    runs = {p: run(tmp, *POLICIES[p], args.steps, args.eval_every, held, seed,
                                   lambda: progress.advance(task)) for p in policies}
                target = runs["uniform"]["smoothed"][-1]
                base = first_step(runs["uniform"], target)
                for p, res in runs.items():
                    s = first_step(res, target)
                    rows.append((sc_name, seed, p, s, None if s is None else 1 - s / base, res["smoothed"][-1],
                                 res["weights"][-1]))
                if seed == seeds[0]:
                    summary[sc_name] = {"seed": seed, "target": target, "runs": runs}
    print(f"{'scenario':11s} {'seed':>4s} {'policy':13s} {'step@target':>11s} {'saving':>8s} {'final':>7s}  final weights")
    for sc_name, seed, p, s, saving, final, w in rows:
        sv = "  never" if saving is None else f"{saving * 100:+6.1f}%"
        print(f"{sc_name:11s} {seed:4d} {p:13s} {s!s:>11s} {sv:>8s} {final:7.4f}  "
              + " ".join(f"{d}={v:.2f}" for d, v in w.items()))
    for sc_name in scenarios:
        for p in policies:
            sv = [r[4] for r in rows if r[0] == sc_name and r[2] == p]
            got = [x for x in sv if x is not None]
            mean = f"{np.mean(got) * 100:+.1f}%" if len(got) == len(sv) else f"reached in {len(got)}/{len(sv)} seeds"
            print(f"mean saving {sc_name:11s} {p:13s} {mean}")
    with open(f"{args.out}.json", "w") as f:
        json.dump({"rows": rows, "args": vars(args)}, f, indent=1, default=str)
    plot(summary, f"{args.out}.png")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
