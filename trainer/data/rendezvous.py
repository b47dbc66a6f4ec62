"""DataRendezvous: every rank starts a batch only when all ranks have data, and they wait together.

Without it a rank with an empty stream blocks in its loader while the others block in the
training step's collectives until the process-group timeout aborts the run. With it, each
batch starts with one small all-reduce of "ready" flags on a dedicated gloo group; while
any rank is not ready, all ranks repeat it every ``heartbeat_s`` (a heartbeat), so no
collective waits longer than that, and training resumes on all ranks together once data
arrives. The group's own timeout (``timeout_s``) only fires if a rank is gone.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DataRendezvous"]


class DataRendezvous:
    """Collective "has data" agreement over all ranks (a no-op in a single process)."""

    def __init__(self, *, timeout_s: float):
        self.group = None
        # called by every rank, in the same order
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def all_ready(self, ready: bool) -> bool:
        """True on every rank iff ``ready`` on every rank."""
        if self.group is None:
            return ready
        flag = torch.tensor([1 if ready else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def union(self, names: list[str]) -> list[str]:
        """The sorted union of every rank's ``names``."""
        if self.group is None:
            return sorted(set(names))
        out: list[list[str] | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, sorted(names), group=self.group)
        return sorted({n for part in out for n in part or ()})
