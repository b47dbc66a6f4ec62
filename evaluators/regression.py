"""Regression detection: paired bootstrap over eval items against the best previous checkpoint.

Each EvalReport carries its per-item scores in ``details["items"]`` (columns ``id``,
``nll`` (summed nats), ``tokens``, ``modality``, ``domain``). For every tracked
metric (``overall``, ``modality/<m>``, ``domain/<d>``) the statistic is the
token-weighted mean NLL (log perplexity); we resample the items both reports
share, with replacement, and look at ``logppl_new - logppl_best``.

Every checkpoint tests many metrics (one per domain and modality), so the test controls the
family-wise error over them: each metric's one-sided bootstrap p-value for
``H0: delta <= log(1 + min_rel_increase)`` goes through Holm–Bonferroni at level ``alpha``.
``min_rel_increase`` is the minimum effect size: a perplexity increase smaller than it never
counts, however certain. The reported interval is the percentile interval at the Bonferroni
level (``alpha / metrics``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from evaluators.identity import report_key
from streams.events import Alert, EvalReport

__all__ = ["Finding", "RegressionConfig", "detect_regressions", "holm", "overall_loss", "pick_best",
           "regression_alert"]


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
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class Finding:
    """The comparison of one metric against the best previous checkpoint."""

    metric: str
    n_items: int
    best_logppl: float
    new_logppl: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool

    def as_dict(self) -> dict:
        return asdict(self)


def overall_loss(report: EvalReport) -> float:
    """Token-weighted mean NLL of a report's items (inf if it has none)."""
    items = report.details.get("items") or {}
    tokens = float(np.sum(items.get("tokens", [])))
    return float(np.sum(items.get("nll", []))) / tokens if tokens else math.inf


def pick_best(previous: list[EvalReport], current: EvalReport) -> EvalReport | None:
    """The comparable previous report with the lowest loss: same suite, suite version and vocab, and
    an earlier step (a report of the same or a later step is from a branch a rollback abandoned)."""
    def comparable(r: EvalReport) -> bool:
        return (r.error is None and r.passed and report_key(r) != report_key(current) and r.step < current.step
                and r.suite == current.suite and r.vocab_version == current.vocab_version
                and r.details.get("suite_version") == current.details.get("suite_version")
                and bool(r.details.get("items")))
    candidates = [r for r in previous if comparable(r)]
    return min(candidates, key=overall_loss, default=None)


def _paired(new: dict, best: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align the two item tables on ``id``: labels, nll/tokens of new and of best."""
    best_index = {item_id: i for i, item_id in enumerate(best["id"])}
    new_rows = [i for i, item_id in enumerate(new["id"]) if item_id in best_index]
    best_rows = [best_index[new["id"][i]] for i in new_rows]
    labels = {k: np.asarray(new[k], dtype=object)[new_rows] for k in new if k not in ("id", "nll", "tokens")}
    return (labels, np.asarray(new["nll"], float)[new_rows], np.asarray(new["tokens"], float)[new_rows],
            np.asarray(best["nll"], float)[best_rows], np.asarray(best["tokens"], float)[best_rows])


def detect_regressions(new: EvalReport, best: EvalReport, cfg: RegressionConfig | None = None) -> list[Finding]:
    """Findings for every tracked metric with enough shared items (significant ones flagged)."""
    cfg = cfg or RegressionConfig()
    labels, nll_n, tok_n, nll_b, tok_b = _paired(new.details["items"], best.details["items"])
    masks = {"overall": np.ones(len(nll_n), bool)}
    for key in cfg.group_by:
        for value in sorted(set(labels.get(key, []))):
            masks[f"{key}/{value}"] = labels[key] == value
    masks = {m: mask for m, mask in masks.items() if mask.sum() >= cfg.min_items}
    if not masks:
        return []
    alpha = cfg.alpha / len(masks)
    threshold = math.log1p(cfg.min_rel_increase)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for metric, mask in masks.items():
        a_n, t_n, a_b, t_b = nll_n[mask], tok_n[mask], nll_b[mask], tok_b[mask]
        idx = rng.integers(0, len(a_n), size=(cfg.n_boot, len(a_n)))
        diffs = a_n[idx].sum(1) / t_n[idx].sum(1) - a_b[idx].sum(1) / t_b[idx].sum(1)
        low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
        p_value = (1 + int(np.count_nonzero(diffs <= threshold))) / (cfg.n_boot + 1)
        new_lp, best_lp = a_n.sum() / t_n.sum(), a_b.sum() / t_b.sum()
        rows.append((metric, int(mask.sum()), float(best_lp), float(new_lp), float(low), float(high), p_value))
    rejected = holm([r[-1] for r in rows], cfg.alpha)
    return [Finding(metric=m, n_items=n, best_logppl=b, new_logppl=v, delta=v - b, ci_low=lo, ci_high=hi,
                    p_value=p, significant=rej and v - b > threshold)
            for (m, n, b, v, lo, hi, p), rej in zip(rows, rejected)]


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
