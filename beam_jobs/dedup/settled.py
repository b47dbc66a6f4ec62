"""The settled text index: what the local runner knows about documents already published.

Every kept text sample carries its compact dedup record in ``lineage["dedup"]`` (see
:mod:`beam_jobs.dedup.record`), so a shard publishes its index delta atomically with itself.
:func:`sync` folds the shards published since the last snapshot (the *tail*) into one new
immutable segment under ``<stream_root>/_dedup/`` and atomically rewrites ``snapshot.json``
(which segments, which shards they cover). A restart therefore memory-maps the segments and
reads only the tail: its cost does not grow with history.

Each segment keeps, per document: the sketch (id hash, coords hash, filter) and its id
(truncated), per band a sorted ``(key, slot)`` table, and a sorted exact-hash table.
Horizon: when more than ``horizon_docs`` documents or segments older than ``horizon_age_s``
are held, the oldest whole segments are forgotten (a later near-dup of them is kept).

Object-store roots (``s3://...``): the index folder lives in this machine's cache instead
(:func:`~beam_jobs.dedup.snapshot.index_home`), folded from every writer's published shards, and
the purge list is the object ``ROOT/_dedup/purged.npy`` that every cache's sync reads.

Takedown: :func:`purge` puts the removed documents' id hashes on ``_dedup/purged.npy``; the next
:func:`sync` rewrites the segments holding any of them without them (even with no new shard)
and never folds one again, so a later near-duplicate of a taken-down document is kept. Syncs and
purges of one root take turns (:func:`~beam_jobs.dedup.snapshot.snapshot_lock`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from beam_jobs.dedup.record import DedupRecord, decode_record
from beam_jobs.dedup.sketch import Sketch, estimate_jaccard, id_hash
from beam_jobs.dedup.snapshot import (
    PURGED,
    ColumnSegment,
    SegmentSet,
    add_purged_to,
    apply_horizon,
    index_home,
    open_generation,
    read_purged_of,
    read_segment,
    read_snapshot,
    read_tail,
    snapshot_lock,
    write_segment,
    write_snapshot,
)

__all__ = ["DIRNAME", "ID_BYTES", "Segment", "SettledIndex", "SettledRef", "purge", "sync"]

log = logging.getLogger(__name__)
DIRNAME = "_dedup"
LOCK_WAIT_S = 300.0  # how long a sync or purge waits for another process folding the same root
ID_BYTES = 16  # ids are kept (for ``dup_of``) truncated to this many bytes
_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], SettledIndex] = {}  # (index home, generation) -> index, set when complete


@dataclass(frozen=True, slots=True)
class SettledRef:
    """A pinned generation of a stream root's settled index (picklable; what a pipeline holds).
    ``home``: the local folder holding its ``_dedup`` (the root itself, or its cache folder)."""

    root: str
    generation: int
    home: str

    def open(self) -> SettledIndex:
        """The index of this generation: the in-process one when this process built it, else
        loaded (memory-mapped) from the snapshot; never a half-built one."""
        return open_generation(_OPEN, _LOCK, self.home, self.generation, lambda: SettledIndex.load(self.home),
                               "dedup")


class Segment(ColumnSegment):
    """An immutable, memory-mapped set of settled documents."""

    FIELDS = ("idh", "coordh", "n", "log2_q", "bloom", "ids", "exact", "exact_slot", "band_keys", "band_slots")

    def __len__(self) -> int:
        return len(self.idh)

    @classmethod
    def build(cls, path: str, records: list[tuple[str, DedupRecord]], created: float) -> Segment:
        """Write a segment of ``(doc id, record)`` pairs and open it."""
        n = len(records)
        bands = len(records[0][1].bands)
        keys = np.array([r.bands for _, r in records], dtype=np.uint32).reshape(n, bands).T
        order = np.argsort(keys, axis=1, kind="stable").astype(np.uint32)
        exact = np.array([r.exact for _, r in records], dtype=np.uint64)
        exact_order = np.argsort(exact, kind="stable").astype(np.uint32)
        arrays = {
            "idh": np.array([r.sketch.idh for _, r in records], dtype=np.uint64),
            "coordh": np.array([r.sketch.coordh for _, r in records], dtype=np.uint32),
            "n": np.array([r.sketch.n for _, r in records], dtype=np.uint16),
            "log2_q": np.array([r.sketch.log2_q for _, r in records], dtype=np.uint8),
            "bloom": np.frombuffer(b"".join(r.sketch.bloom for _, r in records), dtype=np.uint8).reshape(n, -1),
            "ids": np.array([i.encode("utf-8", "surrogatepass")[:ID_BYTES] for i, _ in records], dtype=f"S{ID_BYTES}"),
            "exact": exact[exact_order],
            "exact_slot": exact_order,
            "band_keys": np.take_along_axis(keys, order.astype(np.int64), axis=1),
            "band_slots": order,
        }
        write_segment(path, arrays, {"created": created, "docs": n})
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> Segment:
        arrays, meta = read_segment(path, cls.FIELDS)
        return cls(path, arrays, meta["created"])

    def sketch(self, slot: int) -> Sketch:
        return Sketch(int(self.idh[slot]), int(self.coordh[slot]), 0, int(self.n[slot]), int(self.log2_q[slot]),
                      self.bloom[slot].tobytes())

    def near_slots(self, bands: list[int]) -> set[int]:
        out: set[int] = set()
        for b, key in enumerate(bands):
            row = self.band_keys[b]
            lo, hi = np.searchsorted(row, key, "left"), np.searchsorted(row, key, "right")
            out.update(int(s) for s in self.band_slots[b][lo:hi])
        return out

    def exact_slots(self, exact: int) -> list[int]:
        lo, hi = np.searchsorted(self.exact, exact, "left"), np.searchsorted(self.exact, exact, "right")
        return [int(s) for s in self.exact_slot[lo:hi]]


@dataclass(slots=True)
class SettledIndex(SegmentSet):
    """Segments of one snapshot generation, newest last; read-only once built. ``home``: the
    folder holding ``_dedup`` (a local stream root, or an object-store root's cache folder)."""

    home: str
    generation: int = 0
    segments: tuple[Segment, ...] = ()
    shards: frozenset[str] = frozenset()

    @classmethod
    def load(cls, home: str) -> SettledIndex:
        """The snapshot under ``home`` as last written (empty if none)."""
        snap = read_snapshot(os.path.join(home, DIRNAME))
        if snap is None:
            return cls(home)
        segs = tuple(Segment.open(os.path.join(home, DIRNAME, name)) for name in snap["segments"])
        return cls(home, snap["generation"], segs, frozenset(snap["shards"]))

    def lookup(self, *, idh: int, coordh: int, exact: int | None, bands: list[int] | None,
               shingles: np.ndarray | None, threshold: float) -> tuple[str, str, int] | None:
        """(kind, dup_of id, dup_of id hash) of the best settled match, never the record itself."""
        for seg in self.segments:
            for slot in seg.exact_slots(exact) if exact is not None else ():
                if int(seg.idh[slot]) != idh and int(seg.coordh[slot]) != coordh:
                    return "exact", seg.ids[slot].decode("utf-8", "replace"), int(seg.idh[slot])
        best: tuple[float, str, int] | None = None
        if bands is None or shingles is None:
            return None
        for seg in self.segments:
            for slot in seg.near_slots(bands):
                if int(seg.idh[slot]) == idh or int(seg.coordh[slot]) == coordh:
                    continue
                j = estimate_jaccard(seg.sketch(slot), shingles)
                if j >= threshold and (best is None or j > best[0]):
                    best = (j, seg.ids[slot].decode("utf-8", "replace"), int(seg.idh[slot]))
        return None if best is None else ("near", best[1], best[2])


def _tail(root: str, covered: frozenset[str]) -> tuple[list[tuple[str, DedupRecord]], set[str]]:
    """Records of kept text samples in published shards not yet covered, and those shards."""
    found, shards = read_tail(root, covered, "text", "dedup")
    return [(doc_id, decode_record(rec)) for doc_id, rec in found], shards


def purge(root: str, ids: list[str], *, lock_wait_s: float = LOCK_WAIT_S) -> int:
    """Forget the documents ``ids`` (a takedown): their id hashes join ``<root>/_dedup/purged.npy``
    (for an object-store root that object, read by every machine's cache), so the next
    :func:`sync` rewrites the snapshot without their sketches (even with no new shard) and never
    folds them again. Until then a pipeline pinned to an older generation may still drop a
    near-duplicate as ``dup_of`` one of them. Returns the number added."""
    return add_purged_to(root, DIRNAME, (id_hash(i) for i in ids), lock_wait_s=lock_wait_s)


def sync(root: str, *, horizon_docs: int | None = None, horizon_age_s: float | None = None,
         max_segments: int = 16, now: float | None = None, lock_wait_s: float = LOCK_WAIT_S,
         cache_dir: str | None = None) -> SettledRef:
    """Fold the tail into a new segment, apply the horizon, write the next snapshot generation.

    Call at a settlement point (before a micro-batch, after the previous one published).
    Processes syncing one index folder take turns (waiting up to ``lock_wait_s``, else
    :class:`~beam_jobs.dedup.snapshot.SnapshotBusy`). ``cache_dir``: where an object-store
    root's index is kept (:func:`~beam_jobs.dedup.snapshot.index_home`). Returns the pinned
    reference a pipeline's dedup uses."""
    now = time.time() if now is None else now
    home = index_home(root, cache_dir)
    ddir = os.path.join(home, DIRNAME)
    with snapshot_lock(ddir, lock_wait_s):
        index = SettledIndex.load(home)
        records, shards = _tail(root, index.shards)
        purged = read_purged_of(root, home, DIRNAME)
        held = [np.asarray(seg.idh) for seg in index.segments]
        dirty = [bool(len(purged)) and bool(np.isin(h, purged).any()) for h in held]  # a takedown since
        if not shards and index.generation and not any(dirty):
            with _LOCK:
                _OPEN.setdefault((home, index.generation), index)
            return SettledRef(root, index.generation, home)
        gen = index.generation + 1
        segs = [_without(seg, purged, os.path.join(ddir, f"seg-{gen:08d}-p{i:02d}")) if d else seg
                for i, (seg, d) in enumerate(zip(index.segments, dirty))]
        segs = [seg for seg in segs if seg is not None]
        # Neither a taken-down document nor one already held (a rewritten shard's survivor) is folded.
        skip = np.union1d(purged, np.concatenate(held)) if held else purged
        fresh = ~np.isin(np.array([r.sketch.idh for _, r in records], dtype=np.uint64), skip)
        records = [rec for rec, ok in zip(records, fresh.tolist()) if ok]
        if records:
            segs.append(Segment.build(os.path.join(ddir, f"seg-{gen:08d}"), records, now))
        if len(segs) > max_segments:  # compact the older half into one segment
            half = len(segs) // 2
            merged = [rec for seg in segs[:half] for rec in _records(seg)]
            segs = [Segment.build(os.path.join(ddir, f"seg-{gen:08d}-m"), merged, segs[half - 1].created),
                    *segs[half:]]
        apply_horizon(segs, now=now, horizon_age_s=horizon_age_s, horizon_count=horizon_docs,
                      log=log, what="dedup", unit="documents")
        snap = write_snapshot(ddir, gen, segs, index.shards | shards, now, keep=(PURGED,))
    built = SettledIndex(home, gen, tuple(segs), frozenset(snap["shards"]))
    with _LOCK:
        _OPEN[(home, gen)] = built
        for key in [k for k in _OPEN if k[0] == home and k[1] < gen - 1]:
            del _OPEN[key]
    return SettledRef(root, gen, home)


def _without(seg: Segment, purged: np.ndarray, path: str) -> Segment | None:
    """``seg`` rewritten at ``path`` without the documents in ``purged`` (same age); ``None`` if
    none is left."""
    gone = np.isin(np.asarray(seg.idh), purged).tolist()
    left = [rec for rec, g in zip(_records(seg), gone) if not g]
    log.info("dedup takedown: %s rewritten without %d documents", seg.path, len(seg) - len(left))
    return Segment.build(path, left, seg.created) if left else None


def _records(seg: Segment) -> list[tuple[str, DedupRecord]]:
    """A segment's documents as records again (for compaction)."""
    bands = np.empty_like(seg.band_keys)
    for b in range(seg.band_keys.shape[0]):
        bands[b][seg.band_slots[b]] = seg.band_keys[b]
    exact = np.empty(len(seg), dtype=np.uint64)
    exact[seg.exact_slot] = seg.exact
    return [(seg.ids[i].decode("utf-8", "replace"),
             DedupRecord(seg.sketch(i), [int(k) for k in bands[:, i]], int(exact[i]))) for i in range(len(seg))]
