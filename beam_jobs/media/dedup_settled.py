"""The settled media index: what the local runner knows about images and videos already published.

Every kept image or video sample carries its fingerprint in ``lineage["media_dedup"]``
(:func:`near_dup.encode`), so a shard publishes its index delta atomically with itself.
:func:`sync` (called at a settlement point: when a micro-batch's pipeline is built, after the
previous one published) folds the shards published since the last snapshot into one new
immutable segment under ``<stream_root>/_media_dedup/`` and atomically rewrites
``snapshot.json``. A restart memory-maps the segments and reads only the tail of shards
published after the snapshot, so its cost does not grow with history.

A segment holds, per image, the fingerprint columns (~1.2 KB: 1024-byte grey thumbnail,
48-byte colour thumbnail, pHash, digest, the whole id and its 64-bit hash) and, per bucket column, a
sorted ``(key, slot)`` table. Videos have their own segments in the same snapshot generation
(:class:`video_settled.VideoSegment`, named by the snapshot's ``video_segments``). Horizon:
beyond ``horizon_images`` images (``VideoNearDupConfig.horizon_videos`` videos) or segments
older than ``horizon_age_s``, the oldest whole segments are forgotten (a later near-dup of them
is kept).

Object-store roots keep the folder in this machine's cache and the purge list in the root, as
the text index does (:mod:`beam_jobs.dedup.settled`).

Takedown: :func:`purge` puts the removed samples' id hashes on ``_media_dedup/purged.npy``; the
next :func:`sync` rewrites the segments holding any of them without them (even with no new
shard) and never folds them again, nor an id the index already holds (a takedown's rewritten
shard is re-read whole). Syncs and purges of one root take turns
(:func:`~beam_jobs.dedup.snapshot.snapshot_lock`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from beam_jobs.dedup.sketch import id_hash
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
    read_tails,
    snapshot_lock,
    write_segment,
    write_snapshot,
)

from .near_dup import (
    COLOUR,
    THUMB,
    MediaFingerprint,
    NearDupConfig,
    best_match,
    bucket_keys,
    decode,
)
from .video_near_dup import (
    VideoFingerprint,
    VideoNearDupConfig,
    best_video_match,
    decode_video,
    video_bucket_keys,
)
from .video_settled import VideoSegment

__all__ = ["DIRNAME", "LOCK_WAIT_S", "MediaSegment", "MediaSettledIndex", "MediaSettledRef", "purge", "sync"]

log = logging.getLogger(__name__)
DIRNAME = "_media_dedup"
LOCK_WAIT_S = 300.0  # how long a sync or purge waits for another process folding the same root
_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], MediaSettledIndex] = {}


@dataclass(frozen=True, slots=True)
class MediaSettledRef:
    """A pinned generation of a stream root's settled media index (picklable); ``home`` holds
    its ``_media_dedup`` (the root itself, or an object-store root's cache folder)."""

    root: str
    generation: int
    home: str
    config: NearDupConfig
    video: VideoNearDupConfig = field(default_factory=VideoNearDupConfig)

    def open(self) -> MediaSettledIndex:
        """This generation's index: the in-process one when this process built it, else loaded."""
        return open_generation(_OPEN, _LOCK, self.home, self.generation,
                               lambda: MediaSettledIndex.load(self.home, self.config, self.video), "media dedup")


class MediaSegment(ColumnSegment):
    """An immutable, memory-mapped set of settled image fingerprints."""

    FIELDS = ("idblob", "idoff", "idh", "digest", "phash", "thumb", "colour", "detail", "spread", "keys", "slots")

    def __len__(self) -> int:
        return len(self.idh)

    @classmethod
    def build(cls, path: str, fps: list[MediaFingerprint], config: NearDupConfig, created: float) -> MediaSegment:
        keys = np.array([bucket_keys(fp, config) for fp in fps], dtype=np.uint64).T  # [columns, n]
        ids = [fp.record_id.encode("utf-8", "surrogatepass") for fp in fps]
        order = np.argsort(keys, axis=1, kind="stable")
        arrays = {
            "idblob": np.frombuffer(b"".join(ids), np.uint8),
            "idoff": np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.uint64),
            "idh": np.array([id_hash(fp.record_id) for fp in fps], np.uint64),
            "digest": np.array([fp.digest for fp in fps], "S16"),
            "phash": np.array([fp.phash for fp in fps], np.uint64),
            "thumb": np.frombuffer(b"".join(fp.thumb for fp in fps), np.uint8).reshape(len(fps), THUMB * THUMB),
            "colour": np.frombuffer(b"".join(fp.colour for fp in fps), np.uint8).reshape(len(fps), COLOUR * COLOUR * 3),
            "detail": np.array([fp.detail for fp in fps], np.float16),
            "spread": np.array([fp.spread for fp in fps], np.float16).reshape(len(fps), 3),
            "keys": np.take_along_axis(keys, order, axis=1),
            "slots": order.astype(np.uint32),
        }
        write_segment(path, arrays, {"created": created, "images": len(fps), "radius": config.hamming_radius,
                                     "colour_cell": config.colour_cell})
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> MediaSegment:
        arrays, meta = read_segment(path, cls.FIELDS)
        seg = cls(path, arrays, meta["created"])
        seg.key_config = (meta["radius"], meta["colour_cell"])
        return seg

    def fingerprint(self, slot: int) -> MediaFingerprint:
        rid = bytes(self.idblob[int(self.idoff[slot]) : int(self.idoff[slot + 1])]).decode("utf-8", "surrogatepass")
        return MediaFingerprint(rid, None, bytes(self.digest[slot]).ljust(16, b"\0"),
                                int(self.phash[slot]), self.thumb[slot].tobytes(), self.colour[slot].tobytes(),
                                float(self.detail[slot]), tuple(float(v) for v in self.spread[slot]))

    def slots_for(self, column: int, key: int) -> list[int]:
        row = self.keys[column]
        lo, hi = np.searchsorted(row, np.uint64(key), "left"), np.searchsorted(row, np.uint64(key), "right")
        return [int(s) for s in self.slots[column][lo:hi]]


@dataclass(slots=True)
class MediaSettledIndex(SegmentSet):
    """Segments of one snapshot generation, newest last; read-only once built. ``len`` and
    ``nbytes`` count images; ``videos`` are the video segments. ``home``: the folder holding
    ``_media_dedup``."""

    home: str
    config: NearDupConfig
    generation: int = 0
    segments: tuple[MediaSegment, ...] = ()
    shards: frozenset[str] = frozenset()
    video: VideoNearDupConfig = field(default_factory=VideoNearDupConfig)
    videos: tuple[VideoSegment, ...] = ()

    @classmethod
    def load(cls, home: str, config: NearDupConfig, video: VideoNearDupConfig | None = None) -> MediaSettledIndex:
        """The snapshot under ``home`` as last written (empty if none)."""
        video = video or VideoNearDupConfig()
        snap = read_snapshot(os.path.join(home, DIRNAME))
        if snap is None:
            return cls(home, config, video=video)
        segs = tuple(MediaSegment.open(os.path.join(home, DIRNAME, name)) for name in snap["segments"])
        vsegs = tuple(VideoSegment.open(os.path.join(home, DIRNAME, name)) for name in snap.get("video_segments", ()))
        return cls(home, config, snap["generation"], segs, frozenset(snap["shards"]), video, vsegs)

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

    def lookup_video(self, fp: VideoFingerprint) -> tuple[str, VideoFingerprint, dict] | None:
        """(reason, matched fingerprint, evidence) of the best settled video match, never ``fp`` itself."""
        keys = video_bucket_keys(fp, self.video)
        out = []
        for seg in self.videos:
            if seg.keyed != VideoSegment.key_config(self.video):
                raise RuntimeError(f"{seg.path} was keyed with (keyframes, radius, colour_cell) {seg.keyed}: "
                                   "remove the _media_dedup folder to rebuild it from the stream")
            out.extend(seg.fingerprint(s) for s in sorted(seg.slots_for(keys)))
        return best_video_match(fp, out, self.video)


def _decoded(found: list[tuple[str, str]], decoder, skip: np.ndarray) -> list:
    """The fingerprints ``found`` in the tail, but not those whose id hash is in ``skip``
    (purged or already held)."""
    return [decoder(text) for sid, text in found if not np.isin(np.uint64(id_hash(sid)), skip)]


def _without(seg, purged: np.ndarray, build, path: str):
    """``seg`` rebuilt at ``path`` (same age) without the ids in ``purged``; ``seg`` itself when it
    holds none of them, None when it holds nothing else."""
    gone = np.isin(np.asarray(seg.idh), purged)
    if not gone.any():
        return seg
    left = [seg.fingerprint(i) for i in np.flatnonzero(~gone)]
    if not left:
        return None
    return build(path, left, seg.created)


def purge(root: str, ids: list[str], *, lock_wait_s: float = LOCK_WAIT_S) -> int:
    """Forget the images and videos ``ids`` (a takedown): their id hashes join
    ``<root>/_media_dedup/purged.npy`` (atomic, fsynced, under the sync lock; for an object-store
    root that object); the next :func:`sync` rewrites the snapshot without them. Until then a
    pipeline pinned to an older generation may still drop a near-copy as ``dup_of`` one of them.
    Returns the number added."""
    return add_purged_to(root, DIRNAME, (id_hash(i) for i in ids), lock_wait_s=lock_wait_s)


def _fold(segs: list, fps: list, build, path: str, *, max_segments: int, now: float, horizon_age_s: float | None,
          horizon_count: int | None, unit: str) -> list:
    """``segs`` plus a segment of ``fps`` (``build(path, fps, created)``), the older half compacted
    into one beyond ``max_segments``, then the horizon applied."""
    segs = list(segs)
    if fps:
        segs.append(build(path, fps, now))
    if len(segs) > max_segments:  # compact the older half into one segment
        half = len(segs) // 2
        merged = [seg.fingerprint(i) for seg in segs[:half] for i in range(len(seg))]
        segs = [build(f"{path}-m", merged, segs[half - 1].created), *segs[half:]]
    apply_horizon(segs, now=now, horizon_age_s=horizon_age_s, horizon_count=horizon_count,
                  log=log, what="media dedup", unit=unit)
    return segs


def sync(root: str, config: NearDupConfig, *, horizon_images: int | None = None, horizon_age_s: float | None = None,
         video: VideoNearDupConfig | None = None, max_segments: int = 16, now: float | None = None,
         lock_wait_s: float = LOCK_WAIT_S, cache_dir: str | None = None) -> MediaSettledRef:
    """Fold the tail into new segments (images, videos), drop purged ids, apply the horizons,
    write the next snapshot generation (under the index folder's snapshot lock). ``video`` also
    sets the video horizon (``horizon_videos``, ``horizon_age_s``); ``cache_dir``: where an
    object-store root's index is kept (:func:`~beam_jobs.dedup.snapshot.index_home`)."""
    now = time.time() if now is None else now
    video = video or VideoNearDupConfig()
    home = index_home(root, cache_dir)
    ddir = os.path.join(home, DIRNAME)
    os.makedirs(ddir, exist_ok=True)
    with snapshot_lock(ddir, lock_wait_s):
        index = MediaSettledIndex.load(home, config, video)
        purged = read_purged_of(root, home, DIRNAME)
        gen = index.generation + 1
        build_img = lambda p, f, t: MediaSegment.build(p, f, config, t)
        build_vid = lambda p, f, t: VideoSegment.build(p, f, video, t)
        segs = [s for i, seg in enumerate(index.segments)
                if (s := _without(seg, purged, build_img, os.path.join(ddir, f"seg-{gen:08d}-p{i:02d}"))) is not None]
        vsegs = [s for i, seg in enumerate(index.videos)
                 if (s := _without(seg, purged, build_vid, os.path.join(ddir, f"vseg-{gen:08d}-p{i:02d}"))) is not None]
        dirty = segs != list(index.segments) or vsegs != list(index.videos)
        held = [np.asarray(seg.idh) for seg in (*segs, *vsegs)]
        skip = np.union1d(purged, np.concatenate(held)) if held else purged
        tail, shards = read_tails(root, index.shards, ("image", "video"), "media_dedup")
        fps, vfps = _decoded(tail["image"], decode, skip), _decoded(tail["video"], decode_video, skip)
        if not shards and not dirty and index.generation:
            with _LOCK:
                _OPEN.setdefault((home, index.generation), index)
            return MediaSettledRef(root, index.generation, home, config, video)
        segs = _fold(segs, fps, build_img, os.path.join(ddir, f"seg-{gen:08d}"), max_segments=max_segments, now=now,
                     horizon_age_s=horizon_age_s, horizon_count=horizon_images, unit="images")
        vsegs = _fold(vsegs, vfps, build_vid, os.path.join(ddir, f"vseg-{gen:08d}"), max_segments=max_segments,
                      now=now, horizon_age_s=video.horizon_age_s, horizon_count=video.horizon_videos, unit="videos")
        names = [os.path.basename(s.path) for s in vsegs]
        snap = write_snapshot(ddir, gen, segs, index.shards | shards, now, meta={"video_segments": names},
                              keep=(*names, PURGED))
    built = MediaSettledIndex(home, config, gen, tuple(segs), frozenset(snap["shards"]), video, tuple(vsegs))
    with _LOCK:
        _OPEN[(home, gen)] = built
        for key in [k for k in _OPEN if k[0] == home and k[1] < gen - 1]:
            del _OPEN[key]
    return MediaSettledRef(root, gen, home, config, video)
