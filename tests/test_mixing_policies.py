"""Mixing policies move weight in the expected direction on synthetic per-domain loss curves."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from trainer.mixing import Mixer

SIZES = {"noise": 1000, "learnable": 3000, "learned": 1000}


def curves(t: int, rng: np.random.Generator) -> dict[str, float]:
    """A noise domain (high, flat), a domain being learned (falling), an already-learned one (low, flat)."""
    return {"noise": 6.2 + 0.1 * rng.standard_normal(),
            "learnable": 5.0 * np.exp(-t / 400) + 1.0 + 0.1 * rng.standard_normal(),
            "learned": 0.3 + 0.05 * rng.standard_normal()}


def run_policy(policy: str, steps: int = 300, loss: Callable = curves, **kw) -> Mixer:
    rng = np.random.default_rng(0)
    m = Mixer.Config(policy=policy, **kw).build()
    for t in range(steps):
        losses = loss(t, rng)
        m.observe({d: v * 100 for d, v in losses.items()}, {d: 100 for d in losses}, {d: 4 for d in losses},
                  {d: SIZES.get(d, 1000) for d in losses})
    return m


def test_static_policy_keeps_given_weights():
    w = run_policy("static", weights={"noise": 0.2, "learnable": 0.5}).weight_dict()
    assert w["learnable"] == pytest.approx(0.5, abs=0.02) and w["learned"] == pytest.approx(0.3, abs=0.02)


def test_temperature_policy_follows_domain_size():
    w1 = run_policy("temperature", temperature=1.0).weight_dict()
    w4 = run_policy("temperature", temperature=4.0).weight_dict()
    assert w1["learnable"] > w4["learnable"] > w4["noise"]  # T=1 ∝ size; higher T flattens


def test_odm_moves_weight_towards_high_loss_domains():
    w = run_policy("odm").weight_dict()
    assert w["learned"] < 1 / 3 < w["noise"]  # EXP3 reward = loss: the learned domain loses share


def test_odm_is_full_information_hedge_not_importance_weighted():
    """Every domain is observed every step: the reward is the loss itself, whatever the current weights.

    (The EXP3 estimate L/π would favour the domain drawn less, here the one with the lower loss.)
    """
    from trainer.mixing.policies import DomainStats, ODMPolicy

    policy = ODMPolicy(alpha=0.0)
    stats = DomainStats(domains=["hard", "easy"], last_loss=np.array([4.0, 3.0]), fast_loss=np.zeros(2),
                        slow_loss=np.zeros(2), trained_samples=np.ones(2), trained_tokens=np.ones(2),
                        available_samples=np.ones(2), present=np.array([True, True]), step=1)
    skewed = np.array([0.9, 0.1])
    policy.propose(stats, skewed)
    w = policy.propose(stats, skewed)
    assert w[0] > w[1]
    assert w[0] == pytest.approx(1 / (1 + np.exp(-policy.lr_scale * np.sqrt(np.log(2) / 2))), rel=1e-12)


def test_odm_lr_scale_moves_further():
    w1 = run_policy("odm").weight_dict()
    w4 = run_policy("odm", odm_lr_scale=4.0).weight_dict()
    assert w4["noise"] > w1["noise"] and w4["learned"] < w1["learned"]


def test_learnability_moves_weight_to_the_learnable_domain():
    w = run_policy("learnability", floor=0.05).weight_dict()
    assert w["learnable"] > 0.6 and w["noise"] < 0.2 and w["learned"] < 0.2
    assert min(w.values()) >= 0.05 - 1e-9  # floor


def forgetting(t: int, rng: np.random.Generator) -> dict[str, float]:
    """Both domains fall to a plateau; from t=300 'kept' stays learned, 'lost' is being forgotten,
    and 'junk' (never learned: its loss only ever rose) climbs as well."""
    base = 5.0 * np.exp(-t / 40) + 1.0
    rise = max(t - 300, 0) / 100
    return {"kept": base + 0.05 * rng.standard_normal(), "lost": base + rise + 0.05 * rng.standard_normal(),
            "junk": 6.2 + rise + 0.05 * rng.standard_normal()}


def test_learnability_returns_weight_to_a_domain_being_forgotten_but_not_to_junk():
    m = run_policy("learnability", steps=450, loss=forgetting, floor=0.05)
    w = m.weight_dict()
    assert w["lost"] > 0.6 and w["kept"] < 0.2 and w["junk"] < 0.2


def test_floor_does_not_compound_with_smoothing():
    w = run_policy("static", weights={"learnable": 1.0}, smoothing=0.9, floor=0.05).weight_dict()
    assert w["noise"] == pytest.approx(0.05) and w["learned"] == pytest.approx(0.05)  # not floor / (1 - 0.8 smoothing)


@pytest.mark.parametrize("policy", ["odm", "learnability", "temperature"])
def test_mixer_state_round_trips_mid_run(policy):
    rng = np.random.default_rng(1)
    m = run_policy(policy, steps=150)
    m2 = Mixer.Config(policy=policy).build()
    m2.load_state_dict(m.state_dict())
    for t in range(150, 200):
        losses = curves(t, rng)
        args = ({d: v * 100 for d, v in losses.items()}, {d: 100 for d in losses}, {d: 4 for d in losses}, SIZES)
        assert m.observe(*args).tolist() == m2.observe(*args).tolist()


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mixing policy 'bandit'"):
        Mixer.Config(policy="bandit").build()


def test_learnability_new_domain_starts_as_learnable_without_resetting_the_others():
    def late(t: int, rng: np.random.Generator) -> dict[str, float]:
        out = curves(t, rng)
        if t >= 300:
            out["fresh"] = 6.0 + 0.1 * rng.standard_normal()  # published mid-run: no evidence yet
        return out

    w = run_policy("learnability", steps=305, loss=late, floor=0.05).weight_dict()
    assert w["noise"] < 0.1 and w["learned"] < 0.1
    assert w["fresh"] > 0.3 and w["learnable"] > 0.3
