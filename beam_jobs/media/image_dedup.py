"""Image dedup inside one process: exact (pixel digest) and verified near-dup (``near_dup``).

Used by :class:`MediaProcessor` when it runs without Beam (``process_image``, benchmarks) and as
the fallback for records that did not pass through :class:`dedup_transform.MediaDedup`; in the
ingest job the keyed-state ``MediaDedup`` decides and this index is not consulted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .near_dup import NearDupConfig, NearDupIndex, encode, fingerprint

__all__ = ["ImageDeduper"]


class ImageDeduper:
    """Remembers kept images; ``check`` returns (None, evidence) for a new image (now remembered)
    or (reason, evidence) with ``dup_of`` for a duplicate."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        near: NearDupConfig = field(default_factory=NearDupConfig)
        # Settled index (local runner): beyond either, the oldest whole segments are forgotten
        # and a later near-dup of them is kept (None: no limit). 10M images: ~14 GB of segments.
        horizon_images: int | None = 10_000_000
        horizon_age_s: float | None = None

        def build(self) -> ImageDeduper:
            return ImageDeduper(self)

    def __init__(self, config: ImageDeduper.Config):
        self.config = config
        self.index = NearDupIndex(config.near)

    def check(self, rgb: np.ndarray, record_id: str = "") -> tuple[str | None, dict]:
        """(reason or None, evidence) for one decoded image; kept images are added to the index."""
        fp = fingerprint(rgb, record_id or f"#{len(self.index)}")
        hit = self.index.check(fp)
        if hit is not None:
            reason, kept, evidence = hit
            return reason, {**evidence, "dup_of": kept.record_id}
        self.index.add(fp)
        return None, {"media_dedup": encode(fp)}
