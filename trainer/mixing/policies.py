"""Mixing policies: per-domain statistics in, unnormalised domain weights out.

Each policy is a small class with ``propose(stats, prev) -> weights`` and its own
checkpointable state. The :class:`~trainer.mixing.mixer.Mixer` applies the weight
floor and smoothing on top, so policies stay pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["POLICIES", "DomainStats", "LearnabilityPolicy", "ODMPolicy", "StaticPolicy", "TemperaturePolicy"]


@dataclass(slots=True)
class DomainStats:
    """What the mixer knows about each domain (arrays aligned with ``domains``)."""

    domains: list[str]
    last_loss: np.ndarray  # mean loss of the latest step the domain was trained in (nan if none)
    fast_loss: np.ndarray  # fast EMA of per-step loss
    slow_loss: np.ndarray  # slow EMA of per-step loss
    trained_samples: np.ndarray
    available_samples: np.ndarray  # samples seen in the stream (trained or buffered)
    present: np.ndarray  # bool: domain had tokens in the latest step
    step: int = 0


@dataclass(slots=True)
class StaticPolicy:
    """Fixed weights (unnamed domains share the rest equally; empty -> uniform)."""

    weights: dict[str, float] = field(default_factory=dict)

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        k = len(stats.domains)
        if not self.weights:
            return np.full(k, 1.0 / k)
        named = sum(self.weights.get(d, 0.0) for d in stats.domains)
        unnamed = [d for d in stats.domains if d not in self.weights]
        rest = max(0.0, 1.0 - named) / len(unnamed) if unnamed else 0.0
        return np.array([self.weights.get(d, rest) for d in stats.domains], dtype=np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(slots=True)
class TemperaturePolicy:
    """w_i ∝ n_i^(1/T), n_i = samples of domain i seen in the stream (T=1: proportional)."""

    temperature: float = 1.0

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        n = np.maximum(stats.available_samples.astype(np.float64), 1.0)
        return n ** (1.0 / self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(slots=True)
class ODMPolicy:
    """Online Data Mixing (Albalak et al. 2023): EXP3 with per-domain loss as reward.

    ε_t = min(1/K, sqrt(ln K / (K t))); π_i = (1 - Kε_t) softmax(ε_{t-1} R̂)_i + ε_t;
    for each domain trained this step: R̂_i ← α R̂_i + (1-α) L_i / π_i (importance weighted).
    """

    alpha: float = 0.9
    rewards: dict[str, float] = field(default_factory=dict)
    prev_eps: float = 0.0

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        k = len(stats.domains)
        t = max(stats.step, 1)
        for i, d in enumerate(stats.domains):
            if stats.present[i] and np.isfinite(stats.last_loss[i]):
                pi = max(float(prev[i]), 1e-6)
                r = self.rewards.get(d, 0.0)
                self.rewards[d] = self.alpha * r + (1 - self.alpha) * float(stats.last_loss[i]) / pi
        eps = min(1.0 / k, math.sqrt(math.log(k) / (k * t))) if k > 1 else 1.0
        r_hat = np.array([self.rewards.get(d, 0.0) for d in stats.domains])
        logits = self.prev_eps * r_hat
        soft = np.exp(logits - logits.max())
        soft /= soft.sum()
        self.prev_eps = eps
        return (1 - k * eps) * soft + eps

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": dict(self.rewards), "prev_eps": self.prev_eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = dict(state.get("rewards", {}))
        self.prev_eps = float(state.get("prev_eps", 0.0))


@dataclass(slots=True)
class LearnabilityPolicy:
    """Weight by learning progress (ADO-like) plus optional excess loss over a reference (DoReMi-like).

    progress_i = (slow EMA - fast EMA) / slow EMA of the domain's loss: positive while the
    loss falls, ~0 for noise (high, flat) and for already-learned data (low, flat).
    excess_i = max(loss_i - reference_i, 0) / reference_i when a reference loss is given.
    Multiplicative update w_i ← w_i · exp(η · score_i / mean|score|).
    """

    eta: float = 1.0
    reference_losses: dict[str, float] = field(default_factory=dict)

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        slow, fast = stats.slow_loss, stats.fast_loss
        ok = np.isfinite(slow) & np.isfinite(fast) & (slow > 0)
        progress = np.where(ok, (slow - fast) / np.where(ok, slow, 1.0), 0.0)
        score = np.clip(progress, 0.0, None)
        for i, d in enumerate(stats.domains):
            ref = self.reference_losses.get(d)
            if ref and np.isfinite(fast[i]):
                score[i] += max(float(fast[i]) - ref, 0.0) / ref
        scale = float(np.mean(np.abs(score)))
        if scale <= 1e-12:
            return prev.copy()
        return prev * np.exp(self.eta * score / scale)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


POLICIES = {"static": StaticPolicy, "temperature": TemperaturePolicy, "odm": ODMPolicy, "learnability": LearnabilityPolicy}
