"""Live MosaicML MDS streams: the public face of the writer, the tail reader and the root state.

A stream root is a stock MDS dataset directory (every snapshot loads in
``streaming.StreamingDataset(local=root)``) that grows by sealed, immutable shards, plus the
``headwater.json`` sidecar recording each shard's domain, settled Kafka offsets and lineage.

Readers: :class:`TailReader` follows the root live with a resumable cursor. A stock
``StreamingDataset(local=root)`` reads a snapshot but decompresses shards into the root;
``StreamingDataset(remote=root, local=<own cache>)`` reads the same snapshot without writing there.

A root may also be an object-store URL (``s3://bucket/prefix``): the same classes and functions
work on it, with a lock-free per-writer layout whose merged ``index.json`` is what
``StreamingDataset(remote=root)`` reads (:mod:`streams.storage`).
"""

from streams.manifest import StreamManifest, merge_ranges, read_index, read_sidecar, settled_ranges
from streams.mds_reader import TailReader
from streams.mds_writer import COLUMNS, LiveStreamWriter, OverlapError, sample_from_event

__all__ = [
    "COLUMNS",
    "LiveStreamWriter",
    "OverlapError",
    "StreamManifest",
    "TailReader",
    "merge_ranges",
    "read_index",
    "read_sidecar",
    "sample_from_event",
    "settled_ranges",
]
