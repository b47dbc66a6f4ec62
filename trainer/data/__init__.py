"""Live-stream data path: per-domain prefetch buffers, document packing, the torchtitan loader."""

from trainer.data.loader import BatchMeta, LiveStreamDataLoader, freshness
from trainer.data.packer import IGNORE_INDEX, Doc, Packer, Row

__all__ = ["IGNORE_INDEX", "BatchMeta", "Doc", "LiveStreamDataLoader", "Packer", "Row", "freshness"]
