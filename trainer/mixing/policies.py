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
    trained_tokens: np.ndarray  # loss-bearing tokens trained per domain (cumulative)
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
    """Online Data Mixing (Albalak et al. 2023) with the full-information Hedge update this loader allows.

    ODM is EXP3: one domain per batch, so a domain's loss is seen only when it is drawn and the
    reward estimate is importance-weighted, R̂_i ← α R̂_i + (1-α) L_i / π_i. This loader draws
    domains per document, so every domain with data is in every step: its loss is observed, the
    1/π correction would only pull the weights towards uniform, and the right update is Hedge on
    the observed losses: R_i ← α R_i + (1-α) L_i for every domain trained this step (others keep
    R_i), π = softmax(η_{t-1} R) with ODM's step size η_t = c·sqrt(ln K / (K t)). No uniform
    exploration term: nothing needs exploring, and the Mixer's floor keeps every domain drawn.
    ``lr_scale`` is c. Loss as reward favours high-loss domains: right for domains with more left
    to learn, wrong for irreducible noise (the paper's noted failure mode).
    """

    alpha: float = 0.9
    lr_scale: float = 1.0
    rewards: dict[str, float] = field(default_factory=dict)
    prev_lr: float = 0.0

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        k = len(stats.domains)
        t = max(stats.step, 1)
        for i, d in enumerate(stats.domains):
            if stats.present[i] and np.isfinite(stats.last_loss[i]):
                r = self.rewards.get(d, 0.0)
                self.rewards[d] = self.alpha * r + (1 - self.alpha) * float(stats.last_loss[i])
        r_hat = np.array([self.rewards.get(d, 0.0) for d in stats.domains])
        logits = self.prev_lr * r_hat
        soft = np.exp(logits - logits.max())
        self.prev_lr = self.lr_scale * (math.sqrt(math.log(k) / (k * t)) if k > 1 else 0.0)
        return soft / soft.sum()

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": dict(self.rewards), "prev_lr": self.prev_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = dict(state.get("rewards", {}))
        self.prev_lr = float(state.get("prev_lr", 0.0))


@dataclass(slots=True)
class LearnabilityPolicy:
    """Up-weight domains being learned (or forgotten); down-weight junk and what is already learned.

    In the spirit of ADO (Jiang et al. 2024), which allocates by each domain's learning speed.
    For every domain the policy keeps its last ``window`` observations of (tokens trained on the
    domain, loss) and takes the t-statistic of the least-squares slope, so a noisy loss needs more
    evidence than a clean one: progress_i = clip((-t_i - 1) / (significance - 1), 0, 1). A domain
    whose slow-EMA loss climbs back above its best is being forgotten: forgetting_i = clip((slow_i - best_i) /
    forget_margin, 0, 1) · learned_i, where learned_i = (first_i - best_i) / first_i is the share
    of its initial loss the model ever learned (~0 for noise, so junk whose loss rises as the model
    specialises is not mistaken for lost knowledge). w_i ∝ exp(sharpness · max(progress_i,
    forgetting_i)): noise and learned-and-kept domains fall to the floor, domains being learned
    share the rest equally. With ``reference_losses`` (a DoReMi-style reference model's per-domain
    loss) the relative excess loss clip((loss_i - ref_i) / ref_i, 0, 1) is added to the score.
    A domain with fewer than ``min_obs`` observations (new, or rarely drawn) counts as being learned.
    """

    window: int = 128
    min_obs: int = 16
    sharpness: float = 3.0
    significance: float = 2.0
    forget_margin: float = 0.25
    reference_losses: dict[str, float] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> [n <= window, 2] (tokens, loss)
    first_loss: dict[str, float] = field(default_factory=dict)
    best_loss: dict[str, float] = field(default_factory=dict)

    def propose(self, stats: DomainStats, prev: np.ndarray) -> np.ndarray:
        for i in np.flatnonzero(stats.present & np.isfinite(stats.last_loss)):
            d = stats.domains[i]
            row = np.array([[stats.trained_tokens[i], stats.last_loss[i]]])
            h = self.history.get(d)
            self.history[d] = row if h is None else np.concatenate([h[len(h) + 1 - self.window:], row])
            slow = float(stats.slow_loss[i])
            self.first_loss.setdefault(d, slow)
            self.best_loss[d] = min(self.best_loss.get(d, slow), slow)
        empty = np.zeros((0, 2))
        young = np.array([len(self.history.get(d, empty)) < self.min_obs for d in stats.domains])
        t = np.zeros(len(stats.domains))
        if (~young).any():
            t[~young] = _slope_t([self.history[d] for d, y in zip(stats.domains, young) if not y], self.window)
        progress = np.where(young, 1.0, np.clip((-t - 1.0) / (self.significance - 1.0), 0.0, 1.0))
        first = np.array([self.first_loss.get(d, np.nan) for d in stats.domains])
        best = np.array([self.best_loss.get(d, np.nan) for d in stats.domains])
        learned = np.nan_to_num(np.clip((first - best) / first, 0.0, 1.0))
        forgetting = np.clip((stats.slow_loss - best) / self.forget_margin, 0.0, 1.0) * learned
        score = np.maximum(progress, np.nan_to_num(forgetting))
        if self.reference_losses:
            ref = np.array([self.reference_losses.get(d, np.nan) for d in stats.domains])
            ok = np.isfinite(ref) & (ref > 0) & np.isfinite(stats.fast_loss)
            score += np.where(ok, np.clip((stats.fast_loss - ref) / np.where(ok, ref, 1.0), 0.0, 1.0), 0.0)
        z = self.sharpness * score
        return np.exp(z - z.max())

    def state_dict(self) -> dict[str, Any]:
        return {"history": {d: h.tolist() for d, h in self.history.items()},
                "first_loss": dict(self.first_loss), "best_loss": dict(self.best_loss)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {d: np.array(h, dtype=np.float64).reshape(-1, 2) for d, h in state.get("history", {}).items()}
        self.first_loss = dict(state.get("first_loss", {}))
        self.best_loss = dict(state.get("best_loss", {}))


def _slope_t(histories: list[np.ndarray], width: int) -> np.ndarray:
    """t-statistic of the least-squares slope of loss on tokens for each [n, 2] history (0 if undefined)."""
    x, y, w = (np.zeros((len(histories), width)) for _ in range(3))
    for j, h in enumerate(histories):
        x[j, : len(h)], y[j, : len(h)], w[j, : len(h)] = h[:, 0], h[:, 1], 1.0
    n = w.sum(1)
    dx = (x - (w * x).sum(1, keepdims=True) / n[:, None]) * w
    dy = (y - (w * y).sum(1, keepdims=True) / n[:, None]) * w
    sxx = (dx * dx).sum(1)
    ok = (sxx > 0) & (n >= 3)
    b = (dx * dy).sum(1) / np.where(ok, sxx, 1.0)
    rss = ((dy - b[:, None] * dx) ** 2).sum(1)
    se = np.sqrt(np.maximum(rss, 1e-12) / np.where(ok, n - 2, 1.0) / np.where(ok, sxx, 1.0))
    return np.where(ok, b / se, 0.0)


POLICIES = {"static": StaticPolicy, "temperature": TemperaturePolicy, "odm": ODMPolicy, "learnability": LearnabilityPolicy}
