"""One step's statistics as one device vector: reduced with one all-reduce, read one step late.

Per step the trainer needs, summed over all ranks: each domain's loss sum, label tokens,
documents trained and samples available, the squared gradient norm, and a few flags (a
non-finite gradient, a control command waiting on rank 0, a rank holding domains the mixer
does not know). :class:`StepStats` accumulates them on the device while the micro-batches
run (per-token losses never leave the device), reduces them with a single ``all_reduce`` of
one float64 vector, and returns a :class:`PendingStep` that the host reads only after the
next step's forward/backward has been queued, so the CPU runs one step ahead of the device.

Domains occupy fixed slots (the mixer's sorted domain list, at most :data:`MAX_DOMAINS`), so
the vector has the same length on every rank whatever each one has seen; a checksum of the
domain list (slot ``DOMAIN_SUM``) detects ranks whose lists differ, and the trainer then
re-agrees them. Contributions are weighted so that every quantity is counted once over the
world: data and losses are replicated over tensor-parallel ranks (weight ``1/tp``); sharded
gradient pieces count once, replicated ones ``1/replicas``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.data.loader import BatchMeta
from trainer.data.packer import IGNORE_INDEX

__all__ = ["MAX_DOMAINS", "PendingStep", "StepReading", "StepStats", "domain_checksum"]

MAX_DOMAINS = 256
"""domain slots in the vector (a run with more domains is refused)"""

_K = MAX_DOMAINS
LOSS, TOKENS, DOCS, AVAILABLE = 0, _K, 2 * _K, 3 * _K
GRAD_SQ, NONFINITE, CONTROL, NEW_DOMAINS, DOMAIN_SUM, RANKS = (4 * _K + i for i in range(6))
_SIZE = 4 * _K + 6


def domain_checksum(domains: list[str]) -> float:
    """A 32-bit checksum of a domain list (exact in float64, also when summed over ranks)."""
    return float(zlib.crc32("\n".join(domains).encode()))


@dataclass(slots=True)
class StepReading:
    """The host's view of one reduced step."""

    domains: list[str]
    loss_sum: dict[str, float]
    tokens: dict[str, int]
    docs: dict[str, int]
    available: dict[str, int]
    grad_norm: float
    ok: bool
    """the device-side guard let the optimizer step"""
    control_pending: bool
    new_domains: bool
    domains_agree: bool

    @property
    def loss(self) -> float:
        total = sum(self.tokens.values())
        return sum(self.loss_sum.values()) / total if total else float("nan")


@dataclass(slots=True)
class PendingStep:
    """A step whose reduced vector is (being) computed on the device; host-side facts kept beside it."""

    step: int
    domains: list[str]
    vector: torch.Tensor
    ok: torch.Tensor | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    """host-side facts of the step (shards, sources, timings), this rank's"""

    def gate(self, limit: float) -> torch.Tensor:
        """On the device: does the step pass the guard (finite loss and gradient, loss <= ``limit``)?
        Kept as :attr:`ok` and read with the rest."""
        v = self.vector
        loss = v[LOSS:LOSS + _K].sum() / v[TOKENS:TOKENS + _K].sum().clamp(min=1.0)
        bound = torch.full((), limit, dtype=torch.float64, device=v.device)
        self.ok = torch.isfinite(loss) & (v[NONFINITE] == 0) & (loss <= bound)
        return self.ok

    def read(self) -> StepReading:
        """Copy the vector to the host (waits for this step's reduction only)."""
        ok = self.ok if self.ok is not None else torch.ones((), dtype=torch.bool, device=self.vector.device)
        v = torch.cat([self.vector, ok.to(self.vector.dtype).reshape(1)]).tolist()
        ranks = max(v[RANKS], 1.0)
        return StepReading(
            domains=self.domains,
            loss_sum={d: v[LOSS + i] for i, d in enumerate(self.domains)},
            tokens={d: round(v[TOKENS + i]) for i, d in enumerate(self.domains)},
            docs={d: round(v[DOCS + i]) for i, d in enumerate(self.domains)},
            available={d: round(v[AVAILABLE + i]) for i, d in enumerate(self.domains)},
            grad_norm=math.sqrt(v[GRAD_SQ]) if math.isfinite(v[GRAD_SQ]) else float("nan"),
            ok=v[_SIZE] > 0.5,
            control_pending=v[CONTROL] > 0,
            new_domains=v[NEW_DOMAINS] > 0,
            domains_agree=abs(v[DOMAIN_SUM] - ranks * domain_checksum(self.domains)) < 0.5,
        )


class StepStats:
    """Accumulates one step's statistics on ``device`` and reduces them over the world."""

    def __init__(self, device: torch.device, *, tp: int = 1):
        self.device = device
        self.tp = max(tp, 1)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._acc: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._slots: dict[str, int] = {}
        self.domains: list[str] = []

    def begin(self, domains: list[str]) -> None:
        """Start a step with the mixer's domains as slots."""
        if len(domains) > _K:
            raise ValueError(f"{len(domains)} domains: at most {_K} are supported")
        self.domains = list(domains)
        self._slots = {d: i for i, d in enumerate(self.domains)}
        self._acc = torch.zeros(2, _K + 1, dtype=torch.float64, device=self.device)  # loss, tokens (+ bin)
        self._host = torch.zeros(_SIZE, dtype=torch.float64)
        self._host[DOMAIN_SUM] = domain_checksum(self.domains)
        self._host[RANKS] = 1.0

    def add_microbatch(self, meta: BatchMeta, labels: torch.Tensor, token_losses: torch.Tensor | None) -> bool:
        """Add one micro-batch (device ``labels`` and per-token losses); False if it held unknown domains."""
        slot_of = [self._slots.get(d, _K) for d in meta.domains]
        known = _K not in slot_of
        for d in meta.doc_domains:
            if d in self._slots:
                self._host[DOCS + self._slots[d]] += 1.0 / self.tp
        if token_losses is not None:
            slots = torch.tensor(slot_of + [_K], dtype=torch.int64)[meta.domain_idx]
            slots = slots.to(self.device, non_blocking=True)
            slots = torch.where(labels != IGNORE_INDEX, slots, _K).flatten()
            self._acc[0].index_add_(0, slots, token_losses.detach().flatten().to(torch.float64), alpha=1 / self.tp)
            self._acc[1].index_add_(0, slots, torch.full_like(slots, 1, dtype=torch.float64), alpha=1 / self.tp)
        return known

    def finish(self, *, step: int, params, available: dict[str, int], control_pending: bool,
               unknown_domains: bool, facts: dict[str, Any]) -> PendingStep:
        """Add gradient norm and flags, enqueue the all-reduce; returns the step to read later."""
        for d, n in available.items():
            if d in self._slots:
                self._host[AVAILABLE + self._slots[d]] = n / self.tp
        self._host[CONTROL] = float(control_pending)
        self._host[NEW_DOMAINS] = float(unknown_domains)
        grad_sq = _grad_sq(params, self.world).to(self.device, torch.float64)
        host = self._host.to(self.device, non_blocking=True)
        vector = torch.cat([self._acc[0, :_K], self._acc[1, :_K], host[2 * _K:]])
        vector[GRAD_SQ] = grad_sq
        vector[NONFINITE] = (~torch.isfinite(grad_sq)).to(torch.float64)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vector)
        pending = PendingStep(step=step, domains=self.domains, vector=vector, facts=facts)
        self._acc = self._host = None
        return pending


def _grad_sq(params, world: int) -> torch.Tensor:
    """This rank's share of the squared global gradient norm: summed over ranks it is the norm^2."""
    groups: dict[float, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            replicas = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            g = g.to_local()
        else:  # a plain tensor is the whole gradient on every rank (no parallelism, or DDP after its all-reduce)
            replicas = world
        if g.numel():
            groups.setdefault(float(replicas), []).append(g)
    total: torch.Tensor | None = None
    for replicas, grads in groups.items():
        part = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False).to(torch.float64) ** 2 / replicas
        total = part if total is None else total + part
    return total if total is not None else torch.zeros((), dtype=torch.float64)
