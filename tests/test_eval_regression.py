"""Regression detection: paired bootstrap over per-item losses against the best previous report."""

from __future__ import annotations

import numpy as np

from evaluators.regression import (
    RegressionConfig,
    detect_regressions,
    holm,
    overall_loss,
    pick_best,
)
from streams.events import EvalReport


def report(path: str, nll_per_token: np.ndarray, *, domains=None, suite_version="s1", passed=True) -> EvalReport:
    n = len(nll_per_token)
    tokens = np.full(n, 50)
    domains = domains or ["wiki"] * n
    items = {"id": [f"item{i}" for i in range(n)], "nll": (nll_per_token * tokens).tolist(),
             "tokens": tokens.tolist(), "modality": ["text"] * n, "domain": domains}
    return EvalReport(run_id="r", step=int(path.split("-")[-1]), checkpoint_path=path, suite="core",
                      vocab_version="v1", passed=passed, details={"items": items, "suite_version": suite_version})


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


def test_pick_best_skips_failed_other_versions_and_self():
    good_hi = report("ck-1", np.full(20, 3.0))
    good_lo = report("ck-2", np.full(20, 2.5))
    failed = report("ck-3", np.full(20, 1.0), passed=False)
    other_version = report("ck-4", np.full(20, 1.0), suite_version="s2")
    current = report("ck-5", np.full(20, 2.6))
    assert pick_best([good_hi, good_lo, failed, other_version, current], current) is good_lo
    assert overall_loss(good_lo) == 2.5
    assert pick_best([failed], current) is None


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


def test_pick_best_ignores_reports_of_later_steps_from_an_abandoned_branch():
    earlier = report("ck-10", np.full(20, 3.0))
    abandoned = report("ck-40", np.full(20, 2.0))  # trained further before a rollback to step 10
    current = report("ck-20", np.full(20, 2.8))
    assert pick_best([earlier, abandoned], current) is earlier


def test_alert_quality_clean_run_never_rolls_back_and_poison_is_caught_within_two_checkpoints():
    """The bench's synthetic run through the real detector, rules, router and rollback policy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_alert_quality import clean_run, poisoned_run, recurring_run

    cfg = RegressionConfig()
    assert clean_run(1, 100, cfg) == 0  # 100 checkpoints x 17 metrics, no rollback
    assert clean_run(1, 100, RegressionConfig(min_rel_increase=0.02)) > 0  # the old minimum effect: false alarms
    delay, _domain = poisoned_run(0, 40, cfg, 0.15)
    assert delay is not None and 1 <= delay <= 2
    assert recurring_run(0, cfg, 0.15) == (1, 1, 1)  # one rollback, then the breaker: pause + page
