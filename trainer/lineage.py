"""Per-source lineage of a run: how many tokens it trained from each source (and under each
license), in every checkpoint.

Each rank counts the input tokens of the batches it trained, per source and per license
(:attr:`trainer.data.loader.BatchMeta.source_tokens`, ``license_tokens``). The counts are a DCP ``Stateful`` (one
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
    """Tokens trained per source and per license on this rank since step 0 (restored with the
    checkpoint)."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()  # per source
        self.licenses: Counter[str] = Counter()

    def add(self, source_tokens: dict[str, int], license_tokens: dict[str, int] | None = None) -> None:
        """Count one micro-batch's tokens per source (and per license)."""
        self.tokens.update(source_tokens)
        self.licenses.update(license_tokens or {})

    def totals(self) -> dict[str, dict[str, int]]:
        """``{"tokens_by_source": ..., "tokens_by_license": ...}`` over all ranks (one collective
        when distributed: every rank must call it)."""
        mine = (dict(self.tokens), dict(self.licenses))
        parts: list[Any] = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        by_source: Counter[str] = Counter()
        by_license: Counter[str] = Counter()
        for sources, licenses in parts:
            by_source.update(sources)
            by_license.update(licenses)
        return {"tokens_by_source": dict(sorted(by_source.items())),
                "tokens_by_license": dict(sorted(by_license.items()))}

    def total(self) -> dict[str, int]:
        """Tokens per source over all ranks (a collective when distributed)."""
        return self.totals()["tokens_by_source"]

    def state_dict(self) -> dict[str, Any]:
        return {f"tokens_by_source_rank_{_rank()}": pickle.dumps(dict(self.tokens)),
                f"tokens_by_license_rank_{_rank()}": pickle.dumps(dict(self.licenses))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def counts(key: str) -> Counter[str]:  # a checkpoint older than the key has none
            return Counter(pickle.loads(state[key])) if key in state else Counter()

        self.tokens = counts(f"tokens_by_source_rank_{_rank()}")
        self.licenses = counts(f"tokens_by_license_rank_{_rank()}")
