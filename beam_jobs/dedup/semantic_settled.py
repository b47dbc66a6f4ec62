"""The settled semantic index: embeddings of documents already published (local runner).

Every text sample kept by semantic dedup carries its embedding, int8-quantised, in
``lineage["semantic"]`` (:func:`encode_embedding`), so a shard publishes its semantic index
delta atomically with itself. :func:`sync` (a settlement point, like the text index's) folds
the shards published since the last snapshot (the *tail*) into one immutable segment under
``<stream_root>/_semantic_dedup/`` and atomically rewrites ``snapshot.json``. A restart maps
the segments and reads only the tail.

A segment holds per document: the shard key (uint16 into the segment's key table), id hash,
coords hash, id (truncated to ``ID_BYTES``), the quantisation scale (float32) and the int8
codes (``dim`` bytes): 418 B per document at MiniLM's 384 dimensions. Horizon: at most
``horizon`` documents per shard key; when a key would hold more, or beyond ``max_segments``
segments, the snapshot is compacted to the newest ``0.8 x horizon`` of each key. So the
snapshot (and the cost of a restart, which builds one ANN index per key from it on its first
lookup) is bounded by ``keys x horizon``, whatever the history. Within one process, the next
generation copies the ANN indexes already built and adds only the tail (until a compaction).
"""

from __future__ import annotations

import base64
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from beam_jobs.dedup.settled import ID_BYTES
from beam_jobs.dedup.sketch import id_hash
from beam_jobs.dedup.snapshot import (
    ColumnSegment,
    SegmentSet,
    read_segment,
    read_snapshot,
    read_tail,
    write_segment,
    write_snapshot,
)

__all__ = ["DIRNAME", "SemanticRecord", "SemanticSegment", "SemanticSettledIndex", "SemanticSettledRef",
           "decode_embedding", "encode_embedding", "sync"]

log = logging.getLogger(__name__)
DIRNAME = "_semantic_dedup"
_VERSION = 1
_HEAD = struct.Struct("<BIHfB")  # version, coords hash, dim, scale, key length
_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], SemanticSettledIndex] = {}


class SemanticRecord:
    """A kept document's published semantic record: shard key, coords hash and int8 embedding."""

    __slots__ = ("codes", "coordh", "key", "scale")

    def __init__(self, key: str, coordh: int, scale: float, codes: np.ndarray):
        self.key, self.coordh, self.scale, self.codes = key, coordh, scale, codes

    def vector(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scale


def quantize(vec: np.ndarray) -> tuple[float, np.ndarray]:
    """Symmetric per-vector int8 quantisation: ``(scale, codes)`` with ``vec ~ codes * scale``."""
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return scale, np.clip(np.rint(vec / scale), -127, 127).astype(np.int8)


def encode_embedding(key: str, coordh: int, vec: np.ndarray) -> str:
    """The ``lineage["semantic"]`` text of a kept document (base64; ~4/3 x (dim + 12 + key) chars)."""
    scale, codes = quantize(np.asarray(vec, dtype=np.float32))
    k = key.encode("utf-8", "surrogatepass")[:255]
    return base64.b64encode(_HEAD.pack(_VERSION, coordh, codes.size, scale, len(k)) + k + codes.tobytes()).decode("ascii")


def decode_embedding(text: str) -> SemanticRecord:
    data = base64.b64decode(text)
    version, coordh, dim, scale, nk = _HEAD.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"semantic record version {version} is not supported (expected {_VERSION})")
    off = _HEAD.size
    key = data[off : off + nk].decode("utf-8", "replace")
    codes = np.frombuffer(data, dtype=np.int8, count=dim, offset=off + nk)
    return SemanticRecord(key, coordh, scale, codes)


class SemanticSegment(ColumnSegment):
    """An immutable, memory-mapped set of settled embeddings."""

    FIELDS = ("key", "idh", "coordh", "ids", "scale", "codes")

    def __init__(self, path: str, arrays: dict[str, np.ndarray], created: float, keys: list[str]):
        super().__init__(path, arrays, created)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.idh)

    @classmethod
    def build(cls, path: str, rows: list[tuple[str, int, SemanticRecord]], created: float) -> SemanticSegment:
        """Write a segment of ``(doc id, id hash, record)`` rows (oldest first) and open it."""
        names = np.array([r.key for _, _, r in rows], dtype=object)
        arrays = {
            "idh": np.array([h for _, h, _ in rows], dtype=np.uint64),
            "coordh": np.array([r.coordh for _, _, r in rows], dtype=np.uint32),
            "ids": np.array([i.encode("utf-8", "surrogatepass")[:ID_BYTES] for i, _, _ in rows], dtype=f"S{ID_BYTES}"),
            "scale": np.array([r.scale for _, _, r in rows], dtype=np.float32),
            "codes": np.stack([r.codes for _, _, r in rows]).astype(np.int8),
        }
        return cls.write(path, names, arrays, created)

    @classmethod
    def write(cls, path: str, names: np.ndarray, arrays: dict[str, np.ndarray], created: float) -> SemanticSegment:
        """Write columns (``names``: each row's shard key, as objects) and open the segment."""
        keys = sorted(set(names.tolist()))
        slot = {k: i for i, k in enumerate(keys)}
        arrays = {"key": np.array([slot[k] for k in names.tolist()], dtype=np.uint16), **arrays}
        write_segment(path, arrays, {"created": created, "docs": len(names), "keys": keys})
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> SemanticSegment:
        arrays, meta = read_segment(path, cls.FIELDS)
        return cls(path, arrays, meta["created"], meta["keys"])

    def names(self) -> np.ndarray:
        """Each row's shard key (objects)."""
        return np.array(self.keys, dtype=object)[np.asarray(self.key, dtype=np.int64)]

    def count_by_key(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.key, dtype=np.int64), minlength=len(self.keys))
        return {k: int(c) for k, c in zip(self.keys, counts) if c}


class _KeyIndex:
    """One shard key's settled documents: an ANN index over the dequantised vectors."""

    def __init__(self, kind: str):
        self.kind, self.index = kind, None
        self.idh, self.coordh = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        self.ids = np.zeros(0, f"S{ID_BYTES}")

    @classmethod
    def build(cls, segs, key: str, kind: str) -> _KeyIndex:
        return cls(kind).extended(segs, key, copy=False)

    def extended(self, segs, key: str, *, copy: bool = True) -> _KeyIndex:
        """This index plus the rows of ``key`` in ``segs`` (a copy unless ``copy=False``)."""
        from beam_jobs.dedup.semantic import SemanticIndex

        cols = _columns(segs, only=key)
        new = _KeyIndex(self.kind)
        new.idh = np.concatenate([self.idh, cols["idh"]])
        new.coordh = np.concatenate([self.coordh, cols["coordh"]])
        new.ids = np.concatenate([self.ids, cols["ids"]])
        new.index = self.index.copy() if copy and self.index is not None else self.index
        if len(cols["idh"]):
            data = cols["codes"].astype(np.float32) * cols["scale"][:, None]
            if new.index is None:
                new.index = SemanticIndex(data.shape[1], self.kind)
            new.index.add_many(data, [""] * len(data))  # ids are looked up in self.ids
        return new

    def lookup(self, vec: np.ndarray, *, idh: int, coordh: int, threshold: float, k: int = 4) -> str | None:
        if self.index is None:
            return None
        scores, pos = self.index.search_many(vec.reshape(1, -1), k)
        for score, i in zip(scores[0], pos[0]):
            if i < 0 or float(score) < threshold:
                continue
            if int(self.idh[i]) == idh or int(self.coordh[i]) == coordh:  # never a duplicate of itself
                continue
            return self.ids[i].decode("utf-8", "replace")
        return None


@dataclass(slots=True)
class SemanticSettledIndex(SegmentSet):
    """Segments of one snapshot generation, oldest first; read-only once built. The ANN index of
    a shard key is built on its first lookup (once per process and generation)."""

    root: str
    kind: str = "hnsw"
    generation: int = 0
    segments: tuple[SemanticSegment, ...] = ()
    shards: frozenset[str] = frozenset()
    _built: dict[str, _KeyIndex] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, root: str, kind: str = "hnsw") -> SemanticSettledIndex:
        """The snapshot as last written (empty if none)."""
        snap = read_snapshot(os.path.join(root, DIRNAME))
        if snap is None:
            return cls(root, kind)
        segs = tuple(SemanticSegment.open(os.path.join(root, DIRNAME, name)) for name in snap["segments"])
        return cls(root, kind, snap["generation"], segs, frozenset(snap["shards"]))

    def count_by_key(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for seg in self.segments:
            for k, n in seg.count_by_key().items():
                out[k] = out.get(k, 0) + n
        return out

    def key_index(self, key: str) -> _KeyIndex:
        with self._lock:
            if key not in self._built:
                self._built[key] = _KeyIndex.build(self.segments, key, self.kind)
            return self._built[key]

    def lookup(self, key: str, vec: np.ndarray, *, idh: int, coordh: int, threshold: float) -> str | None:
        """Id of a settled document of shard ``key`` at cosine >= ``threshold`` (never the record
        itself: same id hash or same coords hash), else ``None``."""
        return self.key_index(key).lookup(vec, idh=idh, coordh=coordh, threshold=threshold)


@dataclass(frozen=True, slots=True)
class SemanticSettledRef:
    """A pinned generation of a stream root's settled semantic index (picklable)."""

    root: str
    generation: int
    kind: str = "hnsw"

    def open(self) -> SemanticSettledIndex:
        """This generation's index: the in-process one when this process built it, else loaded."""
        key = (self.root, self.generation)
        with _LOCK:
            if key not in _OPEN:
                index = SemanticSettledIndex.load(self.root, self.kind)
                if index.generation != self.generation:
                    raise RuntimeError(f"semantic dedup snapshot of {self.root} is at generation "
                                       f"{index.generation}, the pipeline was built for {self.generation}")
                _OPEN[key] = index
            return _OPEN[key]


def _tail(root: str, covered: frozenset[str]) -> tuple[list[tuple[str, int, SemanticRecord]], set[str]]:
    found, shards = read_tail(root, covered, "text", "semantic")
    return [(doc_id, id_hash(doc_id), decode_embedding(rec)) for doc_id, rec in found], shards


def _columns(segs, only: str | None = None) -> dict[str, np.ndarray]:
    """The rows of ``segs`` (oldest first) as columns, ``names`` included; ``only``: one shard key's."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in ("names", *SemanticSegment.FIELDS[1:])}
    for seg in segs:
        names = seg.names()
        rows = np.flatnonzero(names == only) if only is not None else np.arange(len(seg))
        parts["names"].append(names[rows])
        for f in SemanticSegment.FIELDS[1:]:
            parts[f].append(np.asarray(getattr(seg, f)[rows]))
    empty = {"names": np.zeros(0, object), "idh": np.zeros(0, np.uint64), "coordh": np.zeros(0, np.uint32),
             "ids": np.zeros(0, f"S{ID_BYTES}"), "scale": np.zeros(0, np.float32), "codes": np.zeros((0, 0), np.int8)}
    return {f: np.concatenate(v) if v else empty[f] for f, v in parts.items()}


def _newest_per_key(rows: list[tuple[str, int, SemanticRecord]], horizon: int) -> list[tuple[str, int, SemanticRecord]]:
    """The newest ``horizon`` rows of each shard key (rows oldest first; order kept)."""
    seen: dict[str, int] = {}
    keep = []
    for row in reversed(rows):
        n = seen.get(row[2].key, 0)
        if n < horizon:
            seen[row[2].key] = n + 1
            keep.append(row)
    return keep[::-1]


def sync(root: str, *, horizon: int, kind: str = "hnsw", max_segments: int = 16, low_water: float = 0.8,
         now: float | None = None) -> SemanticSettledRef:
    """Fold the tail into a new segment, apply the per-key horizon, write the next generation.

    A key never holds more than ``horizon`` documents: beyond it (or beyond ``max_segments``
    segments) the snapshot is compacted to the newest ``low_water x horizon`` of each key, so
    compaction (and the ANN rebuild it causes) is amortised over many micro-batches. Between
    compactions the ANN indexes this process already built are copied and extended with the
    tail only. Call at a settlement point (before a micro-batch, after the previous one
    published); returns the pinned reference the pipeline's semantic dedup uses."""
    now = time.time() if now is None else now
    with _LOCK:
        index = _OPEN.get((root, read_generation(root)))
    index = index if index is not None and index.kind == kind else SemanticSettledIndex.load(root, kind)
    rows, shards = _tail(root, index.shards)
    if not shards and index.generation:
        with _LOCK:
            _OPEN.setdefault((root, index.generation), index)
        return SemanticSettledRef(root, index.generation, kind)
    gen = index.generation + 1
    ddir = os.path.join(root, DIRNAME)
    os.makedirs(ddir, exist_ok=True)
    segs = list(index.segments)
    new = [SemanticSegment.build(os.path.join(ddir, f"seg-{gen:08d}"), _newest_per_key(rows, horizon), now)] if rows else []
    segs += new
    counts: dict[str, int] = {}
    for seg in segs:
        for k, n in seg.count_by_key().items():
            counts[k] = counts.get(k, 0) + n
    compact = len(segs) > max_segments or any(n > horizon for n in counts.values())
    if compact:
        cols = _columns(segs)
        low = max(1, int(horizon * low_water))
        keep = np.sort(np.concatenate([np.flatnonzero(cols["names"] == k)[-low:] for k in counts]))
        log.info("semantic dedup horizon/compaction: %d of %d documents kept in one segment",
                 len(keep), len(cols["names"]))
        names = cols.pop("names")[keep]
        segs = [SemanticSegment.write(os.path.join(ddir, f"seg-{gen:08d}-m"), names,
                                      {f: v[keep] for f, v in cols.items()}, now)]
    snap = write_snapshot(ddir, gen, segs, index.shards | shards, now)
    built = SemanticSettledIndex(root, kind, gen, tuple(segs), frozenset(snap["shards"]))
    if not compact:  # the previous generation stays pinned and read-only: extend copies
        with index._lock:
            carried = dict(index._built)
        built._built.update({k: ki.extended(new, k) for k, ki in carried.items()})
    with _LOCK:
        _OPEN[(root, gen)] = built
        for key in [k for k in _OPEN if k[0] == root and k[1] < gen - 1]:
            del _OPEN[key]
    return SemanticSettledRef(root, gen, kind)


def read_generation(root: str) -> int:
    """The generation of the snapshot last written under ``root`` (0: none)."""
    snap = read_snapshot(os.path.join(root, DIRNAME))
    return 0 if snap is None else int(snap["generation"])
