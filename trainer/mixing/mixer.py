"""Online domain mixer: per-domain loss statistics -> sampling weights (floor + smoothing).

The trainer calls :meth:`Mixer.observe` once per step with per-domain loss sums and
token counts reduced over data-parallel ranks, so every rank holds identical weights.
The whole state (statistics, weights, policy state) is checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.mixing.policies import (
    POLICIES,
    DomainStats,
    LearnabilityPolicy,
    ODMPolicy,
    StaticPolicy,
    TemperaturePolicy,
)

__all__ = ["Mixer"]


class Mixer:
    """Holds per-domain statistics and the current weights of one training run."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        policy: str = "static"
        """static | temperature | odm | learnability"""
        weights: dict[str, float] = field(default_factory=dict)
        """static weights by domain (missing domains share the remainder)"""
        temperature: float = 1.0
        floor: float = 0.02
        """minimum weight of any active domain"""
        smoothing: float = 0.5
        """w_t = smoothing * w_{t-1} + (1 - smoothing) * proposal"""
        fast_ema: float = 0.7
        slow_ema: float = 0.95
        odm_alpha: float = 0.9
        odm_lr_scale: float = 1.0
        """multiplies ODM's EXP3 learning rate ε_t (1: as in the paper)"""
        learn_window: int = 128
        """observations per domain in the learnability policy's loss-vs-tokens slope"""
        learn_min_obs: int = 16
        """learnability: observations before a domain's slope counts (until then it counts as learnable)"""
        learn_significance: float = 2.0
        """learnability: |t| of a loss slope that counts as fully significant progress"""
        learn_sharpness: float = 3.0
        """learnability: weight ratio e^sharpness between a domain being learned and a stagnant one"""
        reference_losses: dict[str, float] = field(default_factory=dict)
        warmup_steps: int = 0
        """steps with uniform weights before the policy takes over"""

        def build(self) -> Mixer:
            return Mixer(self)

    def __init__(self, config: Config):
        if config.policy not in POLICIES:
            raise ValueError(f"unknown mixing policy {config.policy!r}; expected one of {sorted(POLICIES)}")
        if not 0.0 <= config.smoothing < 1.0:
            raise ValueError(f"mixing smoothing must be in [0, 1), got {config.smoothing}")
        self.config = config
        self.policy = {
            "static": lambda: StaticPolicy(weights=dict(config.weights)),
            "temperature": lambda: TemperaturePolicy(temperature=config.temperature),
            "odm": lambda: ODMPolicy(alpha=config.odm_alpha, lr_scale=config.odm_lr_scale),
            "learnability": lambda: LearnabilityPolicy(
                window=config.learn_window, min_obs=config.learn_min_obs, sharpness=config.learn_sharpness,
                significance=config.learn_significance, reference_losses=dict(config.reference_losses),
            ),
        }[config.policy]()
        self.domains: list[str] = []
        self.weights = np.zeros(0)
        self._smoothed = np.zeros(0)  # smoothed proposals; ``weights`` adds the floor on top
        self._stats: dict[str, np.ndarray] = {}
        self.step = 0
        self.last_loss: dict[str, float] = {}

    # -- domains -----------------------------------------------------------------
    def add_domains(self, names) -> None:
        """Register newly seen domains (kept sorted; a new domain starts at the mean weight)."""
        new = sorted(set(names) - set(self.domains))
        if not new:
            return
        old_domains = list(self.domains)
        self.domains = sorted(old_domains + new)
        self.weights = _extend(old_domains, self.weights, self.domains)
        self._smoothed = _extend(old_domains, self._smoothed, self.domains)
        self._stats = _aligned_stats(old_domains, self._stats, self.domains)

    # -- update ------------------------------------------------------------------
    def observe(self, loss_sum: dict[str, float], token_count: dict[str, float],
                trained: dict[str, int], available: dict[str, int]) -> np.ndarray:
        """One step's per-domain statistics (already reduced over ranks); returns new weights."""
        self.add_domains(set(loss_sum) | set(available) | set(trained))
        self.step += 1
        s, c = self._stats, self.config
        doms = self.domains
        s["available"] = np.array([available.get(d, a) for d, a in zip(doms, s["available"])], dtype=np.float64)
        s["trained"] += np.array([trained.get(d, 0) for d in doms], dtype=np.float64)
        n = np.array([token_count.get(d, 0.0) for d in doms], dtype=np.float64)
        s["tokens"] += n
        present = n > 0
        loss = np.array([loss_sum.get(d, 0.0) for d in doms], dtype=np.float64) / np.where(present, n, 1.0)
        s["last"] = np.where(present, loss, s["last"])
        for key, a in (("fast", c.fast_ema), ("slow", c.slow_ema)):
            ema = np.where(np.isnan(s[key]), loss, a * s[key] + (1 - a) * loss)
            s[key] = np.where(present, ema, s[key])
        self.last_loss = {d: float(v) for d, v, p in zip(doms, s["last"], present) if p}
        if self.step <= c.warmup_steps:
            return self.weights
        stats = DomainStats(
            domains=self.domains, last_loss=s["last"], fast_loss=s["fast"], slow_loss=s["slow"],
            trained_samples=s["trained"], trained_tokens=s["tokens"], available_samples=s["available"],
            present=present, step=self.step,
        )
        proposal = np.asarray(self.policy.propose(stats, self.weights), dtype=np.float64)
        proposal = proposal / proposal.sum()
        self._smoothed = c.smoothing * self._smoothed + (1 - c.smoothing) * proposal
        self.weights = self._floor(self._smoothed)
        return self.weights

    def _floor(self, w: np.ndarray) -> np.ndarray:
        k = len(w)
        floor = min(self.config.floor, 1.0 / k)
        return (1 - k * floor) * (w / w.sum()) + floor

    def sampling_weights(self, exclude: set[str] = frozenset()) -> dict[str, float]:
        """Weights renormalised over domains not excluded (paused/quarantined/starved)."""
        live = {d: float(w) for d, w in zip(self.domains, self.weights) if d not in exclude}
        total = sum(live.values())
        return {d: w / total for d, w in live.items()} if total > 0 else {}

    def weight_dict(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.weights)}

    # -- checkpoint --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "weights": self.weights.tolist(),
            "smoothed": self._smoothed.tolist(),
            "stats": {k: v.tolist() for k, v in self._stats.items()},
            "step": self.step,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.domains = list(state["domains"])
        self.weights = np.array(state["weights"], dtype=np.float64)
        self._smoothed = np.array(state.get("smoothed", state["weights"]), dtype=np.float64)
        stats = {k: np.array(v, dtype=np.float64) for k, v in state["stats"].items()}
        self._stats = _aligned_stats(self.domains, stats, self.domains)  # fills stats added since
        self.step = int(state["step"])
        self.policy.load_state_dict(state["policy"])


_STAT_INIT = {"fast": np.nan, "slow": np.nan, "last": np.nan, "trained": 0.0, "tokens": 0.0, "available": 0.0}


def _extend(old: list[str], weights: np.ndarray, domains: list[str]) -> np.ndarray:
    """Weights over ``domains``: old ones kept, new ones at the mean old weight; normalised."""
    by = dict(zip(old, weights))
    fill = float(np.mean(list(by.values()))) if by else 1.0
    w = np.array([by.get(d, fill) for d in domains], dtype=np.float64)
    return w / w.sum()


def _aligned_stats(old: list[str], stats: dict[str, np.ndarray], domains: list[str]) -> dict[str, np.ndarray]:
    """Per-domain statistic arrays re-aligned to ``domains`` (missing entries at their initial value)."""
    by = {k: dict(zip(old, stats.get(k, []))) for k in _STAT_INIT}
    return {k: np.array([by[k].get(d, v) for d in domains], dtype=np.float64) for k, v in _STAT_INIT.items()}
