"""The run's quarantine: shards and sources never to be trained again, kept in RUN/quarantine.json.

Checkpoints are restored on rollback and resume, so the quarantine lives beside them rather
than inside them: a restart (or a rollback to a checkpoint older than the quarantine) still
skips everything quarantined, each entry with its reason and time.
"""

from __future__ import annotations

import json
import os
import time

from streams.source_names import canonical_source

__all__ = ["Quarantine"]


class Quarantine:
    """Quarantined shard and source names with their reasons; rank 0 persists, every rank reads."""

    def __init__(self, run_dir: str, *, writer: bool):
        self.path = os.path.join(run_dir, "quarantine.json")
        self.writer = writer
        self.shards: dict[str, dict] = {}
        self.sources: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                state = json.load(f)
            self.shards, self.sources = dict(state.get("shards", {})), dict(state.get("sources", {}))

    def add(self, *, shards: set[str] = frozenset(), sources: set[str] = frozenset(), reason: str,
            step: int) -> tuple[set[str], set[str]]:
        """Record new entries; returns the (shards, sources) that were not quarantined before."""
        sources = {canonical_source(s) for s in sources}  # one entry per source, however spelled
        new_shards, new_sources = set(shards) - set(self.shards), set(sources) - set(self.sources)
        entry = {"reason": reason, "step": step, "at": time.time()}
        self.shards.update({s: entry for s in new_shards})
        self.sources.update({s: entry for s in new_sources})
        if (new_shards or new_sources) and self.writer:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"shards": self.shards, "sources": self.sources}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        return new_shards, new_sources
