"""Matplotlib figures for `headwater report`, each returned as a base64 PNG data URI.

Every function takes plain data already read from the run directory and returns the
image; callers decide when there is no data to plot.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from streams.events import Alert, EvalReport

__all__ = [
    "codebook_png",
    "evals_png",
    "freshness_png",
    "funnel_png",
    "loss_png",
    "rates_png",
    "shares_png",
    "timeline_png",
    "weights_png",
]

_SEVERITY_COLOR = {"info": "tab:blue", "warning": "tab:orange", "critical": "tab:red"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel_png(stages: dict[str, dict]) -> str:
    """Per stage: records passed on, stacked with records dropped per reason."""
    names = list(stages)
    reasons = sorted({r for s in stages.values() for r in s.get("drop", {})})
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * len(names)))
    y = range(len(names))
    left = [float(stages[n].get("out", 0)) for n in names]
    ax.barh(y, left, color="tab:green", label="out")
    cmap = plt.get_cmap("tab20b")
    for i, reason in enumerate(reasons):
        widths = [float(stages[n].get("drop", {}).get(reason, 0)) for n in names]
        ax.barh(y, widths, left=left, color=cmap(i % 20), label=f"drop: {reason}")
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("records")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)


def rates_png(times: list[float], series: dict[str, list[float]]) -> str:
    """Rates (dup, PII) over run time."""
    fig, ax = plt.subplots(figsize=(8, 2.6))
    for name, values in series.items():
        ax.plot(times, values, marker=".", label=name)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("rate")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _png(fig)


def shares_png(groups: dict[str, dict[str, float]]) -> str:
    """One bar chart of shares (fraction of records) per group, side by side."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 2.8), squeeze=False)
    for ax, (title, counts) in zip(axes[0], groups.items()):
        total = sum(counts.values()) or 1.0
        items = sorted(counts.items(), key=lambda kv: -kv[1])
        ax.bar([k for k, _ in items], [v / total for _, v in items], color="tab:blue")
        ax.set_title(title)
        ax.set_ylabel("share")
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return _png(fig)


def codebook_png(usage: dict[str, float]) -> str:
    """Fraction of RVQ codes used, per modality/level."""
    names = sorted(usage)
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.bar(names, [usage[n] for n in names], color="tab:purple")
    ax.axhline(0.05, color="tab:red", linestyle="--", linewidth=1, label="collapse threshold")
    ax.set_ylim(0, 1)
    ax.set_ylabel("codes used")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
    return _png(fig)


def weights_png(steps: list[int], weights: dict[str, list[float]]) -> str:
    """Mixer domain weights over steps (stacked, they sum to one)."""
    fig, ax = plt.subplots(figsize=(8, 2.8))
    names = sorted(weights)
    ax.stackplot(steps, [weights[n] for n in names], labels=names)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)


def loss_png(loss: list[tuple[int, float]], domain_loss: dict[str, list[tuple[int, float]]],
             abandoned: list[list[tuple[int, float]]], rollback_steps: list[int]) -> str:
    """Loss and per-domain loss over steps; rolled-back steps dotted, rollbacks as red lines."""
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(*zip(*loss), color="black", linewidth=1.5, label="loss")
    for name in sorted(domain_loss):
        ax.plot(*zip(*domain_loss[name]), linewidth=1, label=name)
    for i, branch in enumerate(abandoned):
        ax.plot(*zip(*branch), color="grey", linestyle=":", linewidth=1.5,
                label="rolled back" if i == 0 else None)
    for i, s in enumerate(rollback_steps):
        ax.axvline(s, color="tab:red", linestyle="--", label="rollback target" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)


def evals_png(reports: list[EvalReport]) -> str:
    """Each eval metric over checkpoint steps; failed evaluations circled in red."""
    metrics = sorted({m for r in reports for m in r.metrics})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 1.9 * len(metrics)), squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics):
        points = sorted((r.step, r.metrics[metric], r.passed) for r in reports if metric in r.metrics)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        bad = [p for p in points if not p[2]]
        ax.scatter([p[0] for p in bad], [p[1] for p in bad], s=80, facecolors="none", edgecolors="tab:red")
        ax.set_ylabel(metric, fontsize=8)
    axes[-1, 0].set_xlabel("checkpoint step")
    return _png(fig)


def freshness_png(ages_s: list[float]) -> str:
    """Histogram of sample age when the trainer consumed it."""
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.hist(ages_s, bins=min(40, max(5, len(ages_s) // 3)), color="tab:cyan")
    ax.set_xlabel("sample age at training (s)")
    ax.set_ylabel("steps")
    return _png(fig)


def timeline_png(t0: float, loss_points: list[tuple[float, float]], alerts: list[Alert],
                 actions: list[dict], evals: list[EvalReport]) -> str:
    """Run wall-clock timeline: loss (when timed), evals, alerts, and control actions."""
    fig, ax = plt.subplots(figsize=(8, 3))
    if loss_points:
        ax.plot([t - t0 for t, _ in loss_points], [v for _, v in loss_points], color="grey",
                linewidth=1, label="loss")
        ax.set_ylabel("loss")
    top = max([v for _, v in loss_points], default=1.0)
    for ev in evals:
        ax.axvline(ev.created_at - t0, color="tab:green" if ev.passed else "tab:red", alpha=0.3, linewidth=1)
    for a in alerts:
        ax.scatter([a.created_at - t0], [top], marker="v", s=60, color=_SEVERITY_COLOR[a.severity],
                   label=f"alert ({a.severity})", zorder=3)
        ax.annotate(a.rule, (a.created_at - t0, top), fontsize=7, rotation=30, xytext=(3, 4),
                    textcoords="offset points")
    for i, act in enumerate(sorted(actions, key=lambda a: a["at"])):
        x = act["at"] - t0
        ax.axvline(x, color="tab:red" if "rollback" in act["action"] else "tab:orange", linestyle="--",
                   linewidth=1.2, label=act["action"])
        ax.annotate(act["action"], (x, top * 0.5), fontsize=7, rotation=90, xytext=(3 + 9 * (i % 2), 0),
                    textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_xlabel("seconds since start (green/red bands: passed/failed evals)")
    return _png(fig)
