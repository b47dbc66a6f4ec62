"""Settled video fingerprints: the video segments of the settled media index (:mod:`dedup_settled`).

A segment holds, per video, the whole id (a byte blob and offsets) and its 64-bit hash
(:func:`~beam_jobs.dedup.sketch.id_hash`: takedown purges), the 16-byte digest, the duration,
the 512-byte audio signature (:mod:`audio_print`; a flag when there is none)
and K keyframe columns (pixel digest, pHash, 32×32 grey and 4×4 RGB thumbnails, detail, spread: ~1.1 KB each,
~8.8 KB for K = 8), plus one sorted ``(key, slot)`` table of the videos' bucket keys
(:func:`video_near_dup.video_bucket_keys`, a variable number per video).
"""

from __future__ import annotations

import numpy as np

from beam_jobs.dedup.sketch import id_hash
from beam_jobs.dedup.snapshot import ColumnSegment, read_segment, write_segment

from .audio_print import BANDS, SLOTS
from .near_dup import COLOUR, THUMB, MediaFingerprint
from .video_near_dup import VideoFingerprint, VideoNearDupConfig, video_bucket_keys

__all__ = ["VideoSegment"]


class VideoSegment(ColumnSegment):
    """An immutable, memory-mapped set of settled video fingerprints."""

    FIELDS = ("idblob", "idoff", "idh", "audio", "has_audio", "digest", "duration", "fdigest", "phash", "thumb", "colour", "detail", "spread", "keys", "slots")

    def __len__(self) -> int:
        return len(self.idh)

    @staticmethod
    def key_config(config: VideoNearDupConfig) -> list:
        """What the key tables depend on: a segment keyed otherwise cannot be searched."""
        return [config.keyframes, config.frame.hamming_radius, config.frame.colour_cell,
                config.keyframes - config.min_matched + config.max_shift + 1]

    @classmethod
    def build(cls, path: str, fps: list[VideoFingerprint], config: VideoNearDupConfig, created: float) -> VideoSegment:
        k = config.keyframes
        frames = [f for fp in fps for f in fp.frames]
        pairs = sorted((key, slot) for slot, fp in enumerate(fps) for key in video_bucket_keys(fp, config))
        ids = [fp.record_id.encode("utf-8", "surrogatepass") for fp in fps]
        arrays = {
            "idblob": np.frombuffer(b"".join(ids), np.uint8),
            "idoff": np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.uint64),
            "idh": np.array([id_hash(fp.record_id) for fp in fps], np.uint64),
            "audio": np.array([np.frombuffer(fp.audio or bytes(SLOTS * BANDS), np.uint8) for fp in fps],
                              np.uint8).reshape(len(fps), SLOTS * BANDS),
            "has_audio": np.array([bool(fp.audio) for fp in fps], bool),
            "digest": np.array([fp.digest for fp in fps], "S16"),
            "duration": np.array([fp.duration for fp in fps], np.float32),
            "fdigest": np.array([f.digest for f in frames], "S16").reshape(len(fps), k),
            "phash": np.array([f.phash for f in frames], np.uint64).reshape(len(fps), k),
            "thumb": np.frombuffer(b"".join(f.thumb for f in frames), np.uint8).reshape(len(fps), k, THUMB * THUMB),
            "colour": np.frombuffer(b"".join(f.colour for f in frames), np.uint8).reshape(len(fps), k, COLOUR * COLOUR * 3),
            "detail": np.array([f.detail for f in frames], np.float16).reshape(len(fps), k),
            "spread": np.array([f.spread for f in frames], np.float16).reshape(len(fps), k, 3),
            "keys": np.array([p[0] for p in pairs], np.uint64),
            "slots": np.array([p[1] for p in pairs], np.uint32),
        }
        write_segment(path, arrays, {"created": created, "videos": len(fps), "key_config": cls.key_config(config)})
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> VideoSegment:
        arrays, meta = read_segment(path, cls.FIELDS)
        seg = cls(path, arrays, meta["created"])
        seg.keyed = meta["key_config"]
        return seg

    def fingerprint(self, slot: int) -> VideoFingerprint:
        rid = self.record_id(slot)
        frames = tuple(MediaFingerprint(rid, None, bytes(self.fdigest[slot, i]).ljust(16, b"\0"), int(self.phash[slot, i]), self.thumb[slot, i].tobytes(),
                                        self.colour[slot, i].tobytes(), float(self.detail[slot, i]),
                                        tuple(float(v) for v in self.spread[slot, i]))
                       for i in range(self.phash.shape[1]))
        audio = self.audio[slot].tobytes() if self.has_audio[slot] else b""
        return VideoFingerprint(rid, None, bytes(self.digest[slot]).ljust(16, b"\0"), float(self.duration[slot]), frames,
                                audio)

    def record_id(self, slot: int) -> str:
        """The whole id of ``slot``."""
        return bytes(self.idblob[int(self.idoff[slot]) : int(self.idoff[slot + 1])]).decode("utf-8", "surrogatepass")

    def slots_for(self, keys: list[int]) -> set[int]:
        """Slots of the videos sharing any of ``keys``."""
        want = np.asarray(keys, np.uint64)
        lo, hi = np.searchsorted(self.keys, want, "left"), np.searchsorted(self.keys, want, "right")
        return {int(s) for a, b in zip(lo, hi) for s in self.slots[a:b]}
