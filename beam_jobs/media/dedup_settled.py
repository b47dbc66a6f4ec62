"""The settled image index: what the local runner knows about images already published.

Every kept image sample carries its fingerprint in ``lineage["media_dedup"]``
(:func:`near_dup.encode`), so a shard publishes its index delta atomically with itself.
:func:`sync` (called at a settlement point: when a micro-batch's pipeline is built, after the
previous one published) folds the shards published since the last snapshot into one new
immutable segment under ``<stream_root>/_media_dedup/`` and atomically rewrites
``snapshot.json``. A restart memory-maps the segments and reads only the tail of shards
published after the snapshot, so its cost does not grow with history.

A segment holds, per image, the fingerprint columns (~1.2 KB: 1024-byte grey thumbnail,
48-byte colour thumbnail, pHash, digest, id truncated to 48 bytes) and, per bucket column, a
sorted ``(key, slot)`` table. Horizon: beyond ``horizon_images`` images or segments older than
``horizon_age_s``, the oldest whole segments are forgotten (a later near-dup of them is kept).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from .near_dup import (
    COLOUR,
    ID_BYTES,
    THUMB,
    MediaFingerprint,
    NearDupConfig,
    best_match,
    bucket_keys,
    decode,
)

__all__ = ["DIRNAME", "MediaSegment", "MediaSettledIndex", "MediaSettledRef", "sync"]

log = logging.getLogger(__name__)
DIRNAME = "_media_dedup"
SNAPSHOT = "snapshot.json"
_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], MediaSettledIndex] = {}


@dataclass(frozen=True, slots=True)
class MediaSettledRef:
    """A pinned generation of a stream root's settled image index (picklable)."""

    root: str
    generation: int
    config: NearDupConfig

    def open(self) -> MediaSettledIndex:
        """This generation's index: the in-process one when this process built it, else loaded."""
        key = (self.root, self.generation)
        with _LOCK:
            if key not in _OPEN:
                index = MediaSettledIndex.load(self.root, self.config)
                if index.generation != self.generation:
                    raise RuntimeError(f"media dedup snapshot of {self.root} is at generation {index.generation}, "
                                       f"the pipeline was built for {self.generation}")
                _OPEN[key] = index
            return _OPEN[key]


class MediaSegment:
    """An immutable, memory-mapped set of settled image fingerprints."""

    FIELDS = ("ids", "digest", "phash", "thumb", "colour", "detail", "spread", "keys", "slots")

    def __init__(self, path: str, arrays: dict[str, np.ndarray], created: float):
        self.path, self.created = path, created
        for name in self.FIELDS:
            setattr(self, name, arrays[name])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, path: str, fps: list[MediaFingerprint], config: NearDupConfig, created: float) -> MediaSegment:
        keys = np.array([bucket_keys(fp, config) for fp in fps], dtype=np.uint64).T  # [columns, n]
        order = np.argsort(keys, axis=1, kind="stable")
        arrays = {
            "ids": np.array([fp.record_id.encode("utf-8", "surrogatepass")[:ID_BYTES] for fp in fps], f"S{ID_BYTES}"),
            "digest": np.array([fp.digest for fp in fps], "S16"),
            "phash": np.array([fp.phash for fp in fps], np.uint64),
            "thumb": np.frombuffer(b"".join(fp.thumb for fp in fps), np.uint8).reshape(len(fps), THUMB * THUMB),
            "colour": np.frombuffer(b"".join(fp.colour for fp in fps), np.uint8).reshape(len(fps), COLOUR * COLOUR * 3),
            "detail": np.array([fp.detail for fp in fps], np.float16),
            "spread": np.array([fp.spread for fp in fps], np.float16).reshape(len(fps), 3),
            "keys": np.take_along_axis(keys, order, axis=1),
            "slots": order.astype(np.uint32),
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(arr))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"created": created, "images": len(fps), "radius": config.hamming_radius,
                       "colour_cell": config.colour_cell}, f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> MediaSegment:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        arrays = {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in cls.FIELDS}
        seg = cls(path, arrays, meta["created"])
        seg.key_config = (meta["radius"], meta["colour_cell"])
        return seg

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.FIELDS)

    def fingerprint(self, slot: int) -> MediaFingerprint:
        return MediaFingerprint(self.ids[slot].decode("utf-8", "replace"), None, bytes(self.digest[slot]).ljust(16, b"\0"),
                                int(self.phash[slot]), self.thumb[slot].tobytes(), self.colour[slot].tobytes(),
                                float(self.detail[slot]), tuple(float(v) for v in self.spread[slot]))

    def slots_for(self, column: int, key: int) -> list[int]:
        row = self.keys[column]
        lo, hi = np.searchsorted(row, np.uint64(key), "left"), np.searchsorted(row, np.uint64(key), "right")
        return [int(s) for s in self.slots[column][lo:hi]]


@dataclass(slots=True)
class MediaSettledIndex:
    """Segments of one snapshot generation, newest last; read-only once built."""

    root: str
    config: NearDupConfig
    generation: int = 0
    segments: tuple[MediaSegment, ...] = ()
    shards: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    @classmethod
    def load(cls, root: str, config: NearDupConfig) -> MediaSettledIndex:
        path = os.path.join(root, DIRNAME, SNAPSHOT)
        if not os.path.exists(path):
            return cls(root, config)
        with open(path) as f:
            snap = json.load(f)
        segs = tuple(MediaSegment.open(os.path.join(root, DIRNAME, name)) for name in snap["segments"])
        return cls(root, config, snap["generation"], segs, frozenset(snap["shards"]))

    def candidates(self, fp: MediaFingerprint) -> list[MediaFingerprint]:
        """Settled images sharing a bucket with ``fp``."""
        keys = bucket_keys(fp, self.config)
        out = []
        for seg in self.segments:
            if seg.key_config != (self.config.hamming_radius, self.config.colour_cell):
                raise RuntimeError(f"{seg.path} was keyed with (radius, colour_cell) {seg.key_config}: "
                                   "remove the _media_dedup folder to rebuild it from the stream")
            slots = {s for col, key in enumerate(keys) for s in seg.slots_for(col, key)}
            out.extend(seg.fingerprint(s) for s in sorted(slots))
        return out

    def lookup(self, fp: MediaFingerprint) -> tuple[str, MediaFingerprint, dict] | None:
        """(reason, matched fingerprint, evidence) of the best settled match, never ``fp`` itself."""
        return best_match(fp, self.candidates(fp), self.config)


def _tail(root: str, covered: frozenset[str]) -> tuple[list[MediaFingerprint], set[str]]:
    """Fingerprints of kept images in published shards not yet covered, and those shards."""
    from streams.mds import TailReader

    fps: list[MediaFingerprint] = []
    shards: set[str] = set()
    if not os.path.exists(os.path.join(root, "index.json")):
        return fps, shards
    with TailReader(root, exclude_shards=covered) as reader:
        shards.update(reader.poll())
        for s in reader.samples(timeout_s=0):
            shards.add(s["_shard"])
            if s.get("modality") != "image":
                continue
            lineage = s.get("lineage") or {}
            if isinstance(lineage, str):
                lineage = json.loads(lineage)
            if "media_dedup" in lineage:
                fps.append(decode(lineage["media_dedup"]))
    return fps, shards


def sync(root: str, config: NearDupConfig, *, horizon_images: int | None = None, horizon_age_s: float | None = None,
         max_segments: int = 16, now: float | None = None) -> MediaSettledRef:
    """Fold the tail into a new segment, apply the horizon, write the next snapshot generation."""
    now = time.time() if now is None else now
    index = MediaSettledIndex.load(root, config)
    fps, shards = _tail(root, index.shards)
    if not shards and index.generation:
        with _LOCK:
            _OPEN.setdefault((root, index.generation), index)
        return MediaSettledRef(root, index.generation, config)
    gen = index.generation + 1
    ddir = os.path.join(root, DIRNAME)
    os.makedirs(ddir, exist_ok=True)
    segs = list(index.segments)
    if fps:
        segs.append(MediaSegment.build(os.path.join(ddir, f"seg-{gen:08d}"), fps, config, now))
    if len(segs) > max_segments:  # compact the older half into one segment
        half = len(segs) // 2
        merged = [seg.fingerprint(i) for seg in segs[:half] for i in range(len(seg))]
        segs = [MediaSegment.build(os.path.join(ddir, f"seg-{gen:08d}-m"), merged, config, segs[half - 1].created),
                *segs[half:]]
    while segs and horizon_age_s is not None and now - segs[0].created > horizon_age_s:
        log.info("media dedup horizon (age): forgetting %d images of %s", len(segs[0]), segs[0].path)
        segs.pop(0)
    while len(segs) > 1 and horizon_images is not None and sum(len(s) for s in segs) - len(segs[0]) >= horizon_images:
        log.info("media dedup horizon (count): forgetting %d images of %s", len(segs[0]), segs[0].path)
        segs.pop(0)
    snap = {"version": 1, "generation": gen, "segments": [os.path.basename(s.path) for s in segs],
            "shards": sorted(index.shards | shards), "written_at": now}
    tmp = os.path.join(ddir, f"{SNAPSHOT}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(snap, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ddir, SNAPSHOT))
    keep = set(snap["segments"]) | {SNAPSHOT}
    for name in os.listdir(ddir):
        if name not in keep and not name.startswith(f"{SNAPSHOT}.tmp"):
            shutil.rmtree(os.path.join(ddir, name), ignore_errors=True)
    built = MediaSettledIndex(root, config, gen, tuple(segs), frozenset(snap["shards"]))
    with _LOCK:
        _OPEN[(root, gen)] = built
        for key in [k for k in _OPEN if k[0] == root and k[1] < gen - 1]:
            del _OPEN[key]
    return MediaSettledRef(root, gen, config)
