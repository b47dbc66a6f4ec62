"""Per-source lineage of a run: how many tokens it trained from each source, in every checkpoint.

Each rank counts the input tokens of the batches it trained, per source
(:attr:`trainer.data.loader.BatchMeta.source_tokens`). The counts are a DCP ``Stateful`` (one
key per rank, like the shard log), so a resumed or rolled-back run continues from the counts of
the checkpoint it loaded. At each save the ranks' counts are summed (one ``all_gather_object``,
a collective every rank reaches in ``_on_checkpoint_saved``) into the checkpoint's
``headwater.json`` and its CheckpointSaved event (``lineage``).
"""

from __future__ import annotations

import pickle
from collections import Counter
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["SourceLineage"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class SourceLineage(Stateful):
    """Tokens trained per source on this rank since step 0 (restored with the checkpoint)."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()

    def add(self, source_tokens: dict[str, int]) -> None:
        """Count one micro-batch's tokens per source."""
        self.tokens.update(source_tokens)

    def total(self) -> dict[str, int]:
        """Tokens per source over all ranks (a collective when distributed)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return dict(sorted(self.tokens.items()))
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, dict(self.tokens))
        out: Counter[str] = Counter()
        for part in parts:
            out.update(part)
        return dict(sorted(out.items()))

    def state_dict(self) -> dict[str, Any]:
        return {f"tokens_by_source_rank_{_rank()}": pickle.dumps(dict(self.tokens))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = f"tokens_by_source_rank_{_rank()}"
        self.tokens = Counter(pickle.loads(state[key])) if key in state else Counter()
