"""Regression detection: paired bootstrap over eval items against the branch's latest passed checkpoint.

Each EvalReport carries its per-item scores in ``details["items"]`` (columns ``id``,
``nll`` (summed nats), ``tokens``, ``modality``, ``domain``). For every tracked
metric (``overall``, ``modality/<m>``, ``domain/<d>``) the statistic is the
token-weighted mean NLL (log perplexity); we resample the items both reports
share, with replacement, and look at ``logppl_new - logppl_baseline``.

Baseline: the latest comparable report that passed on the checkpoint's own branch (see
:func:`branch_history`), not the lowest loss ever seen. The minimum over a long history is the
luckiest draw of the checkpoint-to-checkpoint noise, so at a loss plateau every later checkpoint
looks worse than it (docs/BENCHMARKS.md measures this). A report that fails does not become a
baseline, so a poisoned checkpoint missed once is compared with the clean one again next time.

Null distribution: item resampling sees only the eval-item noise. Checkpoints also differ from
each other (online mixing moves weight between domains), so each bootstrap replicate gets a
normal draw with the metric's extra checkpoint-to-checkpoint variance, estimated from the last
``history`` passed reports of the branch: ``max(0, var(successive deltas) - item var)``, the
variance taken around a running median of three (:func:`_wander_var`), so a learning curve is
not taken for noise; none before ``min_history`` deltas exist.

Trend: a metric still improving fast hides a poison behind its own progress (+16% perplexity
minus 8% learnt looks like +8%); if such a checkpoint passed, it would become the baseline and
the poison would never be seen. So the test is on ``delta - trend``, where ``trend`` is the
median of the last ``trend_window`` successive changes, only if negative and at most the
minimum effect in size. Capping it there means a metric that merely stops improving reaches the
threshold and never crosses it: only getting worse than where the trend led counts.

Every checkpoint tests many metrics (one per domain and modality), so the test controls the
family-wise error over them: each metric's one-sided p-value for
``H0: delta <= log(1 + min_rel_increase)`` goes through Holm–Bonferroni at level ``alpha``.
``min_rel_increase`` is the minimum effect size: a perplexity increase smaller than it never
counts, however certain. The reported interval is the percentile interval at the Bonferroni
level (``alpha / metrics``).

The evaluator and bench/bench_alert_quality.py both call :func:`assess`: one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import groupby

import numpy as np

from evaluators.identity import report_key
from streams.events import Alert, EvalReport

__all__ = ["Finding", "RegressionConfig", "assess", "branch_history", "detect_regressions", "holm",
           "metric_masks", "pick_baseline", "regression_alert"]


@dataclass(kw_only=True, slots=True)
class RegressionConfig:
    """Significance test settings."""

    alpha: float = 0.05
    """family-wise error rate over the metrics of one checkpoint (Holm–Bonferroni)"""
    n_boot: int = 2000
    min_rel_increase: float = 0.05
    """minimum effect size: relative perplexity increase (5%) below which nothing is significant"""
    min_items: int = 10
    group_by: tuple[str, ...] = ("modality", "domain")
    history: int = 20
    """passed reports of the branch whose successive changes estimate checkpoint-to-checkpoint variance"""
    min_history: int = 5
    """successive changes needed before that variance and the trend are used (item noise only before)"""
    trend_window: int = 5
    """the latest successive changes whose median is the trend a still-improving metric is expected to keep"""
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class Finding:
    """The comparison of one metric against the baseline checkpoint (``best_*``: the baseline)."""

    metric: str
    n_items: int
    best_logppl: float
    new_logppl: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    drift_sd: float = 0.0
    """checkpoint-to-checkpoint sd added to the null (0: not enough history)"""
    trend: float = 0.0
    """the change expected from the recent trend (<= 0, at least -threshold); the test is on delta - trend"""

    def as_dict(self) -> dict:
        return asdict(self)


def _wall(r: EvalReport) -> float | None:
    wall = r.details.get("checkpoint_wall_time")
    return None if wall is None else float(wall)


def branch_history(previous: list[EvalReport], current: EvalReport) -> list[EvalReport]:
    """The comparable reports that passed on ``current``'s branch, by step (oldest first).

    Comparable: same suite, suite version and vocab, no error, an item table, an earlier step.
    On the branch: no report of the run saved between it and ``current`` has a step at or below
    its own (such a later checkpoint means the trainer rolled back past it: it was abandoned).
    ``previous`` may hold any reports of the run (failed, errors, other suites): all of them
    date rollbacks."""
    now = _wall(current)

    def comparable(r: EvalReport) -> bool:
        return (r.error is None and r.passed and report_key(r) != report_key(current) and r.step < current.step
                and r.suite == current.suite and r.vocab_version == current.vocab_version
                and r.details.get("suite_version") == current.details.get("suite_version")
                and bool(r.details.get("items")))

    abandoned: set[int] = set()  # ids of reports a later-saved, lower-or-equal step supersedes
    if now is not None:
        timed = sorted(((w, r) for r in previous if (w := _wall(r)) is not None and w < now),
                       key=lambda x: x[0], reverse=True)
        lowest_later = math.inf  # lowest step saved after the group at hand (and before ``current``)
        for _, group in groupby(timed, key=lambda x: x[0]):
            reports = [r for _, r in group]
            abandoned.update(id(r) for r in reports if lowest_later <= r.step)
            lowest_later = min(lowest_later, *(r.step for r in reports))
    return sorted((r for r in previous if comparable(r) and id(r) not in abandoned),
                  key=lambda r: (r.step, _wall(r) or 0.0))


def pick_baseline(previous: list[EvalReport], current: EvalReport) -> EvalReport | None:
    """The latest report that passed on ``current``'s branch (:func:`branch_history`), or None."""
    history = branch_history(previous, current)
    return history[-1] if history else None


def assess(report: EvalReport, previous: list[EvalReport], cfg: RegressionConfig | None = None) -> None:
    """Compare ``report`` with its baseline among ``previous`` (reports of its run): sets
    ``details["regression"]`` and fails the report on a significant finding. No baseline: unchanged."""
    history = branch_history(previous, report)
    if not history:
        return
    baseline = history[-1]
    findings = detect_regressions(report, baseline, cfg, history=history)
    report.details["regression"] = {"best_checkpoint": baseline.checkpoint_path, "best_step": baseline.step,
                                    "baseline": "latest_passed", "findings": [f.as_dict() for f in findings]}
    report.passed = report.passed and not any(f.significant for f in findings)


def metric_masks(labels: dict[str, np.ndarray], n: int, group_by: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Item masks of every tracked metric: ``overall`` and ``<key>/<value>`` per ``group_by`` key."""
    masks = {"overall": np.ones(n, bool)}
    for key in group_by:
        for value in sorted(set(labels.get(key, []))):
            masks[f"{key}/{value}"] = labels[key] == value
    return masks


def _metric_series(history: Sequence[EvalReport], metrics: list[str],
                   group_by: tuple[str, ...]) -> dict[str, list[float]]:
    """Each metric's log-perplexity in each history report that has its items."""
    series: dict[str, list[float]] = {m: [] for m in metrics}
    for r in history:
        items = r.details["items"]
        nll, tok = np.asarray(items["nll"], float), np.asarray(items["tokens"], float)
        labels = {k: np.asarray(items[k], dtype=object) for k in group_by if k in items}
        masks = metric_masks(labels, len(nll), group_by)
        for m in metrics:
            if m in masks and tok[masks[m]].sum() > 0:
                series[m].append(float(nll[masks[m]].sum() / tok[masks[m]].sum()))
    return series


def _wander_var(steps: np.ndarray) -> float:
    """Variance of successive changes around their local course: each interior change minus the
    median of it and its two neighbours (a learning curve, however steep, is monotone and leaves
    nothing), mean square scaled by 1 / 0.78 (the factor for independent changes)."""
    resid = steps[1:-1] - np.median(np.stack([steps[:-2], steps[1:-1], steps[2:]]), axis=0)
    return float(np.mean(resid ** 2) / 0.78)


def _paired(new: dict, best: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align the two item tables on ``id``: labels, nll/tokens of new and of best."""
    best_index = {item_id: i for i, item_id in enumerate(best["id"])}
    new_rows = [i for i, item_id in enumerate(new["id"]) if item_id in best_index]
    best_rows = [best_index[new["id"][i]] for i in new_rows]
    labels = {k: np.asarray(new[k], dtype=object)[new_rows] for k in new if k not in ("id", "nll", "tokens")}
    return (labels, np.asarray(new["nll"], float)[new_rows], np.asarray(new["tokens"], float)[new_rows],
            np.asarray(best["nll"], float)[best_rows], np.asarray(best["tokens"], float)[best_rows])


def detect_regressions(new: EvalReport, best: EvalReport, cfg: RegressionConfig | None = None, *,
                       history: Sequence[EvalReport] = ()) -> list[Finding]:
    """Findings for every tracked metric with enough shared items (significant ones flagged).

    ``best`` is the baseline; ``history`` (oldest first, ending with it) the branch's passed
    reports whose successive changes add checkpoint-to-checkpoint variance to the null."""
    cfg = cfg or RegressionConfig()
    labels, nll_n, tok_n, nll_b, tok_b = _paired(new.details["items"], best.details["items"])
    masks = metric_masks(labels, len(nll_n), cfg.group_by)
    masks = {m: mask for m, mask in masks.items() if mask.sum() >= cfg.min_items}
    if not masks:
        return []
    alpha = cfg.alpha / len(masks)
    threshold = math.log1p(cfg.min_rel_increase)
    rng = np.random.default_rng(cfg.seed)
    series = _metric_series(list(history)[-cfg.history:], list(masks), cfg.group_by)
    rows = []
    for metric, mask in masks.items():
        a_n, t_n, a_b, t_b = nll_n[mask], tok_n[mask], nll_b[mask], tok_b[mask]
        idx = rng.integers(0, len(a_n), size=(cfg.n_boot, len(a_n)))
        diffs = a_n[idx].sum(1) / t_n[idx].sum(1) - a_b[idx].sum(1) / t_b[idx].sum(1)
        steps = np.diff(series[metric])
        drift_var, trend = 0.0, 0.0
        if len(steps) >= cfg.min_history:
            hist_var = _wander_var(steps)
            recent = steps[-cfg.trend_window:]
            trend = min(0.0, max(float(np.median(recent)), -threshold))
            # the checkpoint-to-checkpoint variance the items miss, + the trend estimate's (median: pi/2 var/m)
            drift_var = max(0.0, hist_var - float(np.var(diffs))) + math.pi / 2 * hist_var / len(recent)
        diffs = diffs + rng.normal(0.0, math.sqrt(drift_var), cfg.n_boot)
        low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
        p_value = (1 + int(np.count_nonzero(diffs - trend <= threshold))) / (cfg.n_boot + 1)
        new_lp, best_lp = a_n.sum() / t_n.sum(), a_b.sum() / t_b.sum()
        rows.append((metric, int(mask.sum()), float(best_lp), float(new_lp), float(low), float(high), p_value,
                     math.sqrt(drift_var), trend))
    rejected = holm([r[6] for r in rows], cfg.alpha)
    return [Finding(metric=m, n_items=n, best_logppl=b, new_logppl=v, delta=v - b, ci_low=lo, ci_high=hi,
                    p_value=p, significant=rej and v - b - tr > threshold, drift_sd=sd, trend=tr)
            for (m, n, b, v, lo, hi, p, sd, tr), rej in zip(rows, rejected)]


def holm(p_values: list[float], alpha: float) -> list[bool]:
    """Holm–Bonferroni step-down: which hypotheses are rejected at family-wise level ``alpha``."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def regression_alert(report: EvalReport, *, source: str) -> Alert:
    """The ``eval_regression`` Alert of a report that failed on significant findings.

    It names the checkpoint (path and save time), so the rollback policy can find the report
    on ``evals`` that corroborates it."""
    reg = report.details["regression"]
    significant = [f for f in reg["findings"] if f["significant"]]
    worst = max(significant, key=lambda f: f["ci_low"])
    return Alert(rule="eval_regression", severity="critical", source=source,
                 dedup_key=f"eval_regression|{report.run_id}|{report.suite}",
                 message=(f"step {report.step} regressed on {worst['metric']}: log-ppl +{worst['delta']:.4f} "
                          f"(CI [{worst['ci_low']:.4f}, {worst['ci_high']:.4f}], p={worst['p_value']:.2g}) "
                          f"vs step {reg['best_step']}"),
                 evidence={"action": "rollback", "run_id": report.run_id, "checkpoint": report.checkpoint_path,
                           "metrics": [f["metric"] for f in significant],
                           "checkpoint_wall_time": report.details.get("checkpoint_wall_time"),
                           "step": report.step, "suite": report.suite, **reg})
