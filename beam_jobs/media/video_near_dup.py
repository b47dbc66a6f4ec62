"""Video near-dup signals: the pHash machinery of :mod:`near_dup` applied to K keyframes.

A :class:`VideoFingerprint` is K image :class:`near_dup.MediaFingerprint` s of frames taken at
fixed fractions ``(i + 0.5) / K`` of the decoded duration (:func:`fingerprint_video`: the
tokenizer's ``VideoDecoder``, aspect kept), plus the duration and a digest over the keyframes'
pixel digests (exact duplicates).

- **Candidates** meet on the image bucket keys (pHash chunks and mean-colour cells,
  :func:`near_dup.bucket_keys`) of the first ``K - min_matched + max_shift + 1`` keyframes
  (:func:`video_bucket_keys`: enough for any pair the verification can confirm), flagged with
  :data:`VIDEO_KEY` so images and videos never meet.
- **Verification**: keyframe pairs ``(i, j)`` with ``|i - j| <= max_shift`` (a trimmed copy
  shifts the fractions) are confirmed by :func:`near_dup.compare` (the image decision) plus two
  local checks, since motion on one background keeps whole-frame signals alike: the worst 4×4
  colour cell (:func:`near_dup.cell_colour_distance`) and the worst 8×8 block's SSIM allowing
  a ±2 px shift (:func:`near_dup.local_ssim`); the longest order-preserving chain of
  confirmed pairs must hold ``min_matched`` of K keyframes, and the durations must agree within
  ``max_duration_ratio``.
- **Audio** (:mod:`audio_print`): a video whose track is not silent carries a 512-byte band-energy
  signature. Both routes (exact and near) require the durations to agree and the audio to agree:
  both silent/absent, or both present with the spectrum correlating ``>= min_audio_spectrum``
  and the temporal deviations ``>= min_audio_temporal``. A video with audio and one without are
  never duplicates (a soundtrack added or stripped is a different sample to train on), and a
  still image over different audio (podcasts, music uploads) is never dropped.

Ids are kept whole (encoded fingerprints and settled segments), so a replay is never its own
duplicate and ``dup_of`` names the full id.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .audio_print import RATE as AUDIO_RATE
from .audio_print import SLOTS as AUDIO_SLOTS
from .audio_print import audio_agreement, audio_signature
from .av_decode import decode_audio, open_container
from .near_dup import (
    MediaFingerprint,
    NearDupConfig,
    NearDupIndex,
    best_match,
    bucket_keys,
    cell_colour_distance,
    compare,
    decode,
    encode,
    fingerprint,
    local_ssim,
)
from .video import VideoDecoder

__all__ = [
    "VIDEO_KEY",
    "VIDEO_TAG",
    "VideoFingerprint",
    "VideoNearDupConfig",
    "VideoNearDupIndex",
    "audio_evidence",
    "best_video_match",
    "compare_video",
    "decode_video",
    "encode_video",
    "fingerprint_video",
    "is_video",
    "video_bucket_keys",
    "video_fingerprint",
]

VIDEO_KEY = 1 << 62  # set on every video bucket key: image keys stay below 1 << 46
VIDEO_TAG = "V2:"  # prefix of an encoded video fingerprint (image fingerprints are bare base64)
_HEAD = "<IBfH"  # id length, keyframes, duration (float32 seconds), audio signature length


@dataclass(kw_only=True, slots=True)
class VideoNearDupConfig:
    """Keyframe sampling and the video near-dup decision (tuned on ``video_lookalikes`` seeds 1, 2)."""

    keyframes: int = 8  # K frames at fractions (i + 0.5) / K of the duration
    fps: float = 8.0  # decode rate the keyframes are picked from...
    max_frames: int = 96  # ...lowered for videos longer than max_frames / fps (12 s) to hold this many
    # (the decoder halves the kept frames whenever they exceed it: no duration needed)
    side: int = 32  # decoded frames keep their aspect with the short side 2 * side, the long side <= 8 * side
    min_matched: int = 6  # keyframes of the order-preserving chain for a near-duplicate
    max_shift: int = 1  # keyframe i may pair with keyframes i - shift .. i + shift
    max_duration_ratio: float = 1.25  # longer / shorter duration
    frame: NearDupConfig = field(default_factory=NearDupConfig)  # one keyframe pair, as images...
    min_local_ssim: float = 0.72  # ...its worst 8×8 block within ±2 px (0: off), see near_dup.local_ssim
    max_cell_colour: float = 45.0  # ...and its worst 4×4 colour cell (near_dup.cell_colour_distance)
    audio: bool = True  # decode the audio track into the fingerprint (False: every video counts as silent)
    min_audio_spectrum: float = 0.9  # long-term band spectrum correlation (audio_print.audio_agreement)
    min_audio_temporal: float = 0.6  # per-band temporal deviation correlation, best shift
    audio_max_shift: int = 2  # slots of 32 a track may shift by beyond the length difference
    audio_steady_db: float = 0.5  # deviation RMS below which a track is steady (a tone, a drone)
    # Settled index (local runner): beyond either, the oldest whole segments are forgotten
    # (None: no limit). 1M videos at ~12.5 KB each: ~12.5 GB on disk.
    horizon_videos: int | None = 1_000_000
    horizon_age_s: float | None = None
    enabled: bool = True  # False: videos pass MediaDedup untouched


class VideoFingerprint(NamedTuple):
    """What the near-dup index keeps per video (Beam state, snapshots, lineage)."""

    record_id: str
    coords: tuple[str, int, int] | None
    digest: bytes  # 16-byte BLAKE2b over the keyframes' pixel digests
    duration: float  # seconds covered by the decoded frames
    frames: tuple[MediaFingerprint, ...]  # K keyframes in time order (record_id = the video's)
    audio: bytes = b""  # audio_print.audio_signature (b"": no audio track, or a silent one)

    def same_record(self, other: VideoFingerprint) -> bool:
        """Same id or same source coordinates: a retry or replay of one record."""
        return self.record_id == other.record_id or (self.coords is not None and self.coords == other.coords)


def fingerprint_video(data: bytes, record_id: str, config: VideoNearDupConfig, *,
                      limits: VideoDecoder.Config | None = None,
                      coords: tuple[str, int, int] | None = None) -> VideoFingerprint:
    """Decode a video with the tokenizer's decoder and bounds (``limits``; MediaRejected on bad
    input) and fingerprint it. The sampling rate is ``config.fps``, lowered for long videos
    (from the container's duration) to hold about ``max_frames`` small frames: a 10-minute
    video holds ~96 (~2 MB), not 4,800."""
    limits = limits or VideoDecoder.Config()
    with open_container(data) as container:
        seconds = container.duration / 1e6 if container.duration else 0.0
        if seconds <= 0 and container.streams.video:  # no container duration: the stream's
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
        wav = decode_audio(container, rate=AUDIO_RATE, max_seconds=limits.max_seconds) if config.audio else None
    fps = config.fps
    if seconds > 0:
        fps = min(fps, config.max_frames / seconds)
    decoder = dataclasses.replace(limits, fps=fps, side=config.side).build()
    times, frames, _ = decoder.sample(data, square=False, max_kept=config.max_frames)
    return video_fingerprint(times, frames, record_id, config, coords, fps=fps, audio=audio_signature(wav))


def video_fingerprint(times: np.ndarray, frames: list[np.ndarray], record_id: str, config: VideoNearDupConfig,
                      coords: tuple[str, int, int] | None = None, *, fps: float | None = None,
                      audio: bytes = b"") -> VideoFingerprint:
    """Fingerprint of decoded frames (``VideoDecoder.sample`` output, at ``fps``, default
    ``config.fps``) and an audio signature (:func:`audio_print.audio_signature`)."""
    t = np.asarray(times, np.float64)
    duration = float(t[-1] - t[0] + 1.0 / (fps or config.fps))
    targets = t[0] + duration * (np.arange(config.keyframes) + 0.5) / config.keyframes
    picks = np.abs(t[None, :] - targets[:, None]).argmin(1)
    kfs = tuple(fingerprint(frames[i], record_id) for i in picks)
    digest = hashlib.blake2b(b"".join(f.digest for f in kfs), digest_size=16).digest()
    c = tuple(coords) if coords is not None else None
    return VideoFingerprint(record_id, c, digest, float(np.float32(duration)), kfs, audio)


def is_video(text: str) -> bool:
    """Whether an encoded fingerprint is a video's (else an image's, :func:`near_dup.encode`)."""
    return text.startswith(VIDEO_TAG)


def encode_video(fp: VideoFingerprint) -> str:
    """Compact text form (~12.4 KB for K = 8 with audio): a head (the whole id, the digest, the
    audio signature), then each keyframe's :func:`near_dup.encode`."""
    rid = fp.record_id.encode("utf-8", "surrogatepass")
    head = struct.pack(_HEAD, len(rid), len(fp.frames), fp.duration, len(fp.audio)) + rid + fp.digest + fp.audio
    frames = (encode(f._replace(record_id="")) for f in fp.frames)
    return VIDEO_TAG + ",".join([base64.b64encode(head).decode("ascii"), *frames])


def decode_video(text: str, coords: tuple[str, int, int] | None = None) -> VideoFingerprint:
    """Inverse of :func:`encode_video`."""
    if not is_video(text):
        raise ValueError(f"not a video fingerprint (expected the {VIDEO_TAG!r} prefix)")
    head, *frames = text[len(VIDEO_TAG) :].split(",")
    data = base64.b64decode(head)
    n, k, duration, na = struct.unpack_from(_HEAD, data)
    off = struct.calcsize(_HEAD)
    rid = data[off : off + n].decode("utf-8", "surrogatepass")
    if len(frames) != k:
        raise ValueError(f"video fingerprint names {k} keyframes and holds {len(frames)}")
    kfs = tuple(decode(f)._replace(record_id=rid) for f in frames)
    digest = data[off + n : off + n + 16]
    return VideoFingerprint(rid, coords, digest, float(duration), kfs, data[off + n + 16 : off + n + 16 + na])


def video_bucket_keys(fp: VideoFingerprint, config: VideoNearDupConfig) -> list[int]:
    """The distinct image bucket keys of the first ``K - min_matched + max_shift + 1`` keyframes,
    flagged :data:`VIDEO_KEY`, sorted.

    That many suffice (pigeonhole): at most ``K - min_matched`` keyframes of a near-duplicate
    are unpaired, so one of its first ``K - min_matched + 1`` is paired, with a keyframe at most
    ``max_shift`` later; a paired keyframe passed :func:`near_dup.compare`, so the two share a
    pHash chunk (within the radius) or a mean-colour cell (beyond it, colour RMS <= 10)."""
    n = min(len(fp.frames), config.keyframes - config.min_matched + config.max_shift + 1)
    return sorted({VIDEO_KEY | key for f in fp.frames[:n] for key in bucket_keys(f, config.frame)})


def _chain(pairs: dict[tuple[int, int], tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The longest chain of confirmed pairs increasing in both videos (ties: higher SSIM sum)."""
    best: dict[tuple[int, int], tuple[int, float, list]] = {}
    for i in range(k):
        for j in range(k):
            up = best.get((i - 1, j), (0, 0.0, []))
            left = best.get((i, j - 1), (0, 0.0, []))
            cand = max(up, left, key=lambda b: b[:2])
            if (i, j) in pairs:
                diag = best.get((i - 1, j - 1), (0, 0.0, []))
                hit = pairs[(i, j)]
                here = (diag[0] + 1, diag[1] + hit[1], [*diag[2], hit])
                cand = max(cand, here, key=lambda b: b[:2])
            best[(i, j)] = cand
    return best[(k - 1, k - 1)][2] if k else []


def compare_video(fp: VideoFingerprint, kept: VideoFingerprint, config: VideoNearDupConfig) -> tuple[str, dict] | None:
    """(reason, evidence) when ``fp`` duplicates ``kept``; None otherwise (or when it is itself)."""
    if fp.same_record(kept):
        return None
    ratio = max(fp.duration, kept.duration) / max(min(fp.duration, kept.duration), 1e-6)
    if ratio > config.max_duration_ratio:  # both routes
        return None
    audio = audio_evidence(fp, kept, config)
    if audio is None:
        return None
    if config.frame.exact and fp.digest == kept.digest:
        return "exact_duplicate", {"duration_ratio": round(ratio, 3), **audio}
    k = len(fp.frames)
    if not config.frame.near or k != len(kept.frames) or not k:
        return None
    pairs: dict[tuple[int, int], tuple[int, float]] = {}
    unmatched = 0
    for i in range(k):  # a keyframe with no confirmed partner can never join the chain
        for j in range(max(0, i - config.max_shift), min(k, i + config.max_shift + 1)):
            a, b = fp.frames[i], kept.frames[j]
            if cell_colour_distance(a.colour, b.colour) > config.max_cell_colour:  # cheapest first
                continue
            hit = compare(a, b, config.frame)
            if hit is None or (config.min_local_ssim and local_ssim(a.thumb, b.thumb) < config.min_local_ssim):
                continue
            pairs[(i, j)] = (hit[1].get("hamming", 0), hit[1].get("ssim", 1.0))
        unmatched += not any(key[0] == i for key in pairs)
        if unmatched > k - config.min_matched:
            return None
    chain = _chain(pairs, k)
    if len(chain) < config.min_matched:
        return None
    evidence = {"hamming": round(sum(h for h, _ in chain) / len(chain), 2),
                "ssim": round(sum(s for _, s in chain) / len(chain), 4),
                "matched": len(chain), "keyframes": k, "duration_ratio": round(ratio, 3), **audio}
    return "near_duplicate", evidence


def audio_evidence(fp: VideoFingerprint, kept: VideoFingerprint, config: VideoNearDupConfig) -> dict | None:
    """The audio half of the decision: ``{}`` when both are silent, the scores when both tracks
    agree, None when they differ or only one has audio."""
    if not fp.audio and not kept.audio:
        return {}
    if not fp.audio or not kept.audio or len(fp.audio) != len(kept.audio):
        return None
    spectrum, temporal = audio_agreement(fp.audio, kept.audio, seconds=(fp.duration, kept.duration),
                                         max_shift=min(config.audio_max_shift, AUDIO_SLOTS // 2),
                                         steady_db=config.audio_steady_db)
    if spectrum < config.min_audio_spectrum or temporal < config.min_audio_temporal:
        return None
    return {"audio_spectrum": round(spectrum, 3), "audio_temporal": round(temporal, 3)}


def best_video_match(fp: VideoFingerprint, candidates, config: VideoNearDupConfig) -> tuple[str, Any, dict] | None:
    """The closest confirmed duplicate among ``candidates`` (ranked as :func:`near_dup.best_match`)."""
    return best_match(fp, candidates, config, compare_video)


@dataclass(slots=True)
class VideoNearDupIndex(NearDupIndex):
    """In-memory index of video fingerprints: :class:`near_dup.NearDupIndex` with video keys and
    the video decision."""

    config: VideoNearDupConfig = field(default_factory=VideoNearDupConfig)

    def keys(self, fp: VideoFingerprint) -> list[int]:
        return video_bucket_keys(fp, self.config)

    def judge(self, fp: VideoFingerprint, candidates: list) -> tuple[str, Any, dict] | None:
        return best_video_match(fp, candidates, self.config)
