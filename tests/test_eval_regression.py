"""Regression detection: paired bootstrap over per-item losses against the latest passed report."""

from __future__ import annotations

import numpy as np

from evaluators.regression import (
    RegressionConfig,
    assess,
    branch_history,
    detect_regressions,
    holm,
    pick_baseline,
)
from streams.events import EvalReport


def report(path: str, nll_per_token: np.ndarray, *, domains=None, suite_version="s1", passed=True,
           wall: float | None = None) -> EvalReport:
    n = len(nll_per_token)
    tokens = np.full(n, 50)
    domains = domains or ["wiki"] * n
    items = {"id": [f"item{i}" for i in range(n)], "nll": (nll_per_token * tokens).tolist(),
             "tokens": tokens.tolist(), "modality": ["text"] * n, "domain": domains}
    details = {"items": items, "suite_version": suite_version}
    if wall is not None:
        details["checkpoint_wall_time"] = wall
    return EvalReport(run_id="r", step=int(path.split("-")[-1]), checkpoint_path=path, suite="core",
                      vocab_version="v1", passed=passed, details=details)


def test_noise_is_not_a_regression_but_a_real_shift_is():
    rng = np.random.default_rng(1)
    base = rng.uniform(2.0, 4.0, 200)
    best = report("ck-100", base)
    noisy = report("ck-200", base + rng.normal(0, 0.05, 200))
    assert not any(f.significant for f in detect_regressions(noisy, best))
    worse = report("ck-300", base + 0.3 + rng.normal(0, 0.05, 200))
    (overall, *_rest) = detect_regressions(worse, best)
    assert overall.metric == "overall" and overall.significant
    assert overall.ci_low > 0.2 and overall.delta == overall.new_logppl - overall.best_logppl


def test_regression_in_one_domain_is_localised():
    rng = np.random.default_rng(2)
    domains = ["wiki"] * 100 + ["code"] * 100
    base = rng.uniform(2.0, 4.0, 200)
    shifted = base.copy()
    shifted[100:] += 0.5
    findings = {f.metric: f for f in detect_regressions(report("ck-2", shifted, domains=domains),
                                                           report("ck-1", base, domains=domains))}
    assert findings["domain/code"].significant
    assert not findings["domain/wiki"].significant
    assert set(findings) == {"overall", "modality/text", "domain/code", "domain/wiki"}


def test_only_shared_items_are_compared_and_small_groups_skipped():
    base = np.full(30, 3.0)
    best = report("ck-1", base)
    new = report("ck-2", np.full(40, 3.0))  # 10 extra items the best never saw
    (f,) = [f for f in detect_regressions(new, best, RegressionConfig(min_items=25)) if f.metric == "overall"]
    assert f.n_items == 30 and f.delta == 0.0
    assert detect_regressions(new, best, RegressionConfig(min_items=31)) == []


def test_baseline_is_the_latest_passed_report_not_the_lowest_loss():
    good_lo = report("ck-1", np.full(20, 2.5))
    good_hi = report("ck-2", np.full(20, 3.0))  # later, a little worse: the baseline all the same
    failed = report("ck-3", np.full(20, 1.0), passed=False)
    other_version = report("ck-4", np.full(20, 1.0), suite_version="s2")
    current = report("ck-5", np.full(20, 2.6))
    assert pick_baseline([good_hi, good_lo, failed, other_version, current], current) is good_hi
    assert branch_history([good_hi, good_lo, failed, current], current) == [good_lo, good_hi]
    assert pick_baseline([failed], current) is None


def test_holm_steps_down_and_is_never_weaker_than_bonferroni():
    assert holm([0.01, 0.02, 0.03], 0.05) == [True, True, True]  # Bonferroni (0.0167) rejects one
    assert holm([0.04, 0.001, 0.3], 0.05) == [False, True, False]
    assert holm([0.2, 0.001], 0.05) == [False, True]
    assert holm([], 0.05) == []


def test_fifteen_domains_of_noise_and_sub_threshold_drift_never_fire_but_a_poisoned_domain_does():
    domains = [f"d{k:02d}" for k in range(15) for _ in range(20)]
    false_alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        base = rng.uniform(2.0, 4.0, len(domains))
        drift = np.log1p(0.02) + rng.normal(0, 0.15, len(domains))  # +2% perplexity: below the 5% minimum
        findings = detect_regressions(report("ck-2", base + drift, domains=domains),
                                      report("ck-1", base, domains=domains), RegressionConfig(n_boot=1000, seed=seed))
        assert len(findings) == 17  # overall, modality/text, 15 domains: one family
        false_alarms += any(f.significant for f in findings)
        poisoned = base + rng.normal(0, 0.15, len(domains))
        poisoned[np.asarray(domains) == "d07"] += 0.4  # ~13% perplexity increase on one domain
        hit = {f.metric for f in detect_regressions(report("ck-3", poisoned, domains=domains),
                                                    report("ck-1", base, domains=domains),
                                                    RegressionConfig(n_boot=1000, seed=seed)) if f.significant}
        assert "domain/d07" in hit and hit <= {"domain/d07", "overall", "modality/text"}
    assert false_alarms == 0


def test_minimum_effect_size_is_required_however_certain_the_shift():
    base = np.random.default_rng(3).uniform(2.0, 4.0, 400)
    shifted = report("ck-2", base + 0.03)  # a certain +1% perplexity: real, but below 5%
    (overall, *_rest) = detect_regressions(shifted, report("ck-1", base))
    assert overall.ci_low > 0.025 and not overall.significant and overall.p_value > 0.5
    (strict, *_rest) = detect_regressions(shifted, report("ck-1", base), RegressionConfig(min_rel_increase=0.01))
    assert strict.significant and strict.p_value < 0.01


def test_pick_baseline_ignores_reports_of_later_steps_from_an_abandoned_branch():
    earlier = report("ck-10", np.full(20, 3.0))
    abandoned = report("ck-40", np.full(20, 2.0))  # trained further before a rollback to step 10
    current = report("ck-20", np.full(20, 2.8))
    assert pick_baseline([earlier, abandoned], current) is earlier


def test_reports_of_an_abandoned_branch_below_the_current_step_are_not_baselines():
    """Rolled back from 40 to 10: the old step-20/30 reports are off the branch once step 20 is saved again."""
    before = [report(f"ck-{s}", np.full(20, 3.0 - s / 100), wall=float(s)) for s in (10, 20, 30, 40)]
    again_20 = report("ck-20", np.full(20, 2.9), wall=50.0)  # saved after the rollback
    current = report("ck-30", np.full(20, 2.85), wall=60.0)
    assert branch_history([*before, again_20], current) == [before[0], again_20]
    assert pick_baseline([*before, again_20], current) is again_20


def series(n: int, step: np.ndarray, sd: float, seed: int, domains: list[str]) -> list[EvalReport]:
    """n passed reports whose per-domain level moves by ``step`` per checkpoint plus N(0, sd) per domain."""
    rng = np.random.default_rng(seed)
    names = sorted(set(domains))
    idx = np.array([names.index(d) for d in domains])
    base, level, out = rng.uniform(2.0, 4.0, len(domains)), np.zeros(len(names)), []
    for k in range(n):
        level = level + step + rng.normal(0, sd, len(names))
        out.append(report(f"ck-{10 * (k + 1)}", base + level[idx] + rng.normal(0, 0.01, len(domains)),
                          domains=domains, wall=float(k)))
    return out


def test_checkpoint_to_checkpoint_variance_from_history_widens_the_null():
    """Domains that jump ~6% between clean checkpoints: with their history the same jump is noise."""
    domains = [f"d{k}" for k in range(4) for _ in range(30)]
    hist = series(12, np.zeros(4), 0.04, 5, domains)
    last = hist[-1]
    jumped = report("ck-130", np.asarray(last.details["items"]["nll"]) / 50 + np.repeat([0.12, 0, 0, 0], 30),
                    domains=domains, wall=20.0)
    cfg = RegressionConfig(n_boot=1000)
    alone = {f.metric: f for f in detect_regressions(jumped, last, cfg)}
    assert alone["domain/d0"].significant and alone["domain/d0"].drift_sd == 0.0  # item noise only: "regressed"
    with_history = {f.metric: f for f in detect_regressions(jumped, last, cfg, history=hist)}
    assert with_history["domain/d0"].drift_sd > 0.02 and not with_history["domain/d0"].significant


def test_a_poison_hidden_by_fast_learning_is_caught_but_merely_stopping_to_improve_is_not():
    """Each domain learns 7% per checkpoint; a +10.5% poison looks like +3% against the last report."""
    domains = [f"d{k}" for k in range(4) for _ in range(30)]
    hist = series(10, np.full(4, -0.07), 0.005, 6, domains)
    last = np.asarray(hist[-1].details["items"]["nll"]) / 50
    cfg = RegressionConfig(n_boot=1000)
    poisoned = report("ck-110", last - 0.07 + np.repeat([0.10, 0, 0, 0], 30), domains=domains, wall=20.0)
    hit = {f.metric for f in detect_regressions(poisoned, hist[-1], cfg, history=hist) if f.significant}
    assert "domain/d0" in hit and not hit & {"domain/d1", "domain/d2", "domain/d3"}
    assert not any(f.significant for f in detect_regressions(poisoned, hist[-1], cfg))  # without the trend: missed
    stopped = report("ck-110", last + np.repeat([0.0, -0.07, -0.07, -0.07], 30), domains=domains, wall=20.0)
    (d0,) = [f for f in detect_regressions(stopped, hist[-1], cfg, history=hist) if f.metric == "domain/d0"]
    assert d0.trend == -np.log1p(cfg.min_rel_increase) and not d0.significant  # the trend credit is capped


def test_assess_fails_a_report_only_on_a_significant_finding_against_its_baseline():
    domains = [f"d{k}" for k in range(4) for _ in range(30)]
    hist = series(8, np.zeros(4), 0.005, 7, domains)
    last = np.asarray(hist[-1].details["items"]["nll"]) / 50
    clean = report("ck-90", last, domains=domains, wall=20.0)
    assess(clean, hist)
    assert clean.passed and clean.details["regression"]["best_step"] == 80
    bad = report("ck-90", last + np.repeat([0.3, 0, 0, 0], 30), domains=domains, wall=20.0)
    assess(bad, hist)
    assert not bad.passed and [f["metric"] for f in bad.details["regression"]["findings"] if f["significant"]]


def test_alert_quality_clean_run_never_rolls_back_and_poison_is_caught_within_two_checkpoints():
    """The bench's synthetic run through the real detector, rules, router and rollback policy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_alert_quality import clean_run, poisoned_run, recurring_run

    cfg = RegressionConfig()
    assert clean_run(1, 100, cfg) == 0  # 100 checkpoints x 17 metrics, no rollback
    assert clean_run(0, 100, cfg, plateau=True) == 0  # at the loss floor (lowest-loss baseline: 8 in 120)
    for plateau in (False, True):
        delay, _domain = poisoned_run(0, 40, cfg, 0.15, plateau=plateau)
        assert delay is not None and 1 <= delay <= 2
    assert recurring_run(0, cfg, 0.15) == (1, 1, 1)  # one rollback, then the breaker: pause + page
