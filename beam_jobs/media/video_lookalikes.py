"""A generated video near-dup set: planted near-duplicates among distinct look-alike videos.

Videos are real MP4 files encoded with FFmpeg's libraries (PyAV, as ``synth.encode_video``).
Distinct videos come in groups that share what a frame-level hash sees:

- ``motion``: one background scene per group of four, a disc moving along different paths
  (including the same path reversed in time);
- ``gradient``: a linear gradient rotating slowly, different colours, directions and speeds;
- ``pan``: a procedural scene panning (``synth.procedural_image``), different scenes;
- ``shots``: two or three procedural shots with cuts.

Planted near-duplicates are decoded and re-encoded: ``reencode`` (MPEG-4 at 60-200 kb/s),
``rescale`` (×0.5-0.75 or ×1.5, low bitrate), ``trim`` (3-8 % of the frames cut from the start
and/or end) and ``trim_rescale`` (both). Used to tune and test the video near-dup thresholds
(``bench/bench_media_dedup.py --videos``, tests), never on evaluation data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from .lookalikes import Score, tally
from .synth import procedural_image

__all__ = ["EDITS", "FAMILIES", "LabelledVideo", "distinct_video", "generate", "near_duplicate", "score",
           "write_frames"]

FAMILIES = ("motion", "gradient", "pan", "shots")
EDITS = ("reencode", "rescale", "trim", "trim_rescale")
FPS = 12
SIZE = (96, 64)  # width, height of originals


@dataclass(frozen=True, slots=True)
class LabelledVideo:
    """One video of the set: ``cluster`` groups an original with its planted duplicates."""

    name: str
    cluster: int
    data: bytes  # MP4
    edit: str = ""  # "" for an original


def write_frames(frames: list[np.ndarray], *, fps: int = FPS, codec: str = "mpeg4", bit_rate: int = 1_000_000) -> bytes:
    """MP4 bytes of uint8 RGB frames (even sizes)."""
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.bit_rate = bit_rate
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
    return buf.getvalue()


def _read_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _disc_path(r: np.random.Generator, n: int, w: int, h: int) -> np.ndarray:
    """[n, 2] centres: a straight or slightly curved path between two random points at least
    0.4 × width apart (a shorter path would make a video its own time-reversed look-alike)."""
    a, b = r.uniform(0.1, 0.9, 2) * (w, h), r.uniform(0.1, 0.9, 2) * (w, h)
    while np.hypot(*(b - a)) < 0.4 * w:
        b = r.uniform(0.1, 0.9, 2) * (w, h)
    t = np.linspace(0, 1, n)[:, None]
    bend = r.uniform(-0.15, 0.15) * np.array([h, w]) * np.sin(np.pi * t)
    return a + (b - a) * t + bend


def _frames(family: str, seed: int, n: int) -> list[np.ndarray]:
    r = np.random.default_rng(seed)
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if family == "motion":  # background shared by a group of four consecutive seeds
        background = procedural_image(seed // 4 * 4 + 7_777, (h, w)).astype(np.float64)
        colour = np.random.default_rng(seed // 4).uniform(0, 255, 3)
        path = _disc_path(r, n, w, h)
        if seed % 4 == 3:  # the group's first path, reversed in time
            path = _disc_path(np.random.default_rng(seed - 3), n, w, h)[::-1]
        rad = r.uniform(0.15, 0.25) * h
        out = []
        for cx, cy in path:
            f = background.copy()
            f[(xx - cx) ** 2 + (yy - cy) ** 2 < rad**2] = colour
            out.append(f)
    elif family == "gradient":
        c0, c1 = r.uniform(0, 255, (2, 3))
        a0, speed = r.uniform(0, 2 * np.pi), r.uniform(-0.6, 0.6)
        out = []
        for i in range(n):
            ang = a0 + speed * i / FPS
            t = np.clip(((xx / w - 0.5) * np.cos(ang) + (yy / h - 0.5) * np.sin(ang)) / 0.71 + 0.5, 0, 1)
            out.append(c0 + (c1 - c0) * t[..., None])
    elif family == "pan":
        scene = procedural_image(seed, (h + 24, w + 48)).astype(np.float64)
        dx, dy = r.uniform(-1.2, 1.2), r.uniform(-0.5, 0.5)
        offsets = [(int(np.clip(12 + dy * i / 2, 0, 24)), int(24 + dx * i) % 48) for i in range(n)]
        out = [scene[oy : oy + h, ox : ox + w] for oy, ox in offsets]
    elif family == "shots":
        cuts = np.sort(r.choice(np.arange(n // 4, 3 * n // 4), int(r.integers(1, 3)), replace=False))
        scenes = [procedural_image(seed * 31 + k, (h + 16, w + 16)).astype(np.float64) for k in range(len(cuts) + 1)]
        out = [scenes[int(np.searchsorted(cuts, i, "right"))][8 : 8 + h, i * 16 // n : i * 16 // n + w] for i in range(n)]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return [np.clip(f, 0, 255).astype(np.uint8) for f in out]


def distinct_video(family: str, seed: int, seconds: float | None = None) -> bytes:
    """MP4 of one look-alike family at 12 fps, 3-5 s unless ``seconds``, parameters drawn from ``seed``."""
    n = round(seconds * FPS) if seconds else int(np.random.default_rng(seed + 99).integers(3 * FPS, 5 * FPS + 1))
    return write_frames(_frames(family, seed, n))


def near_duplicate(data: bytes, edit: str, seed: int) -> bytes:
    """A planted near-duplicate of the MP4 ``data`` made by one ``edit`` (decode, edit, re-encode)."""
    r = np.random.default_rng(seed)
    frames = _read_frames(data)
    if edit in ("trim", "trim_rescale"):
        cut = max(1, round(len(frames) * r.uniform(0.03, 0.08)))
        head = int(r.integers(0, cut + 1))
        frames = frames[head : len(frames) - (cut - head)]
    if edit in ("rescale", "trim_rescale"):
        f = float(r.choice([r.uniform(0.5, 0.75), 1.5]))
        h, w = frames[0].shape[:2]
        size = (max(16, round(w * f)) // 2 * 2, max(16, round(h * f)) // 2 * 2)
        frames = [np.asarray(Image.fromarray(x).resize(size, Image.Resampling.BILINEAR)) for x in frames]
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
    # mpeg4, not libx264: libx264 through PyAV gave different bytes run to run (threads=1 too),
    # which made the set irreproducible; tests/test_video_near_dup.py covers libx264 copies.
    return write_frames(frames, bit_rate=int(r.integers(60_000, 200_001)))


def generate(n_distinct: int, *, dup_fraction: float = 0.5, seed: int = 0) -> list[LabelledVideo]:
    """``n_distinct`` originals (families round-robin in groups of four), then 1-2 planted
    near-duplicates of a ``dup_fraction`` of them; shuffled."""
    r = np.random.default_rng(seed)
    out: list[LabelledVideo] = []
    for i in range(n_distinct):
        family = FAMILIES[(i // 4) % len(FAMILIES)]
        data = distinct_video(family, seed * 1_000_003 + i)
        out.append(LabelledVideo(f"{family}-{i}", i, data))
        if r.random() < dup_fraction:
            for edit in r.choice(EDITS, size=int(r.integers(1, 3)), replace=False):
                out.append(LabelledVideo(f"{family}-{i}~{edit}", i, near_duplicate(data, str(edit), int(r.integers(1 << 31))),
                                         str(edit)))
    return [out[j] for j in r.permutation(len(out))]


def score(videos: list[LabelledVideo], config) -> Score:
    """Run the videos in order through a :class:`video_near_dup.VideoNearDupIndex`."""
    from .video_near_dup import VideoNearDupIndex, fingerprint_video

    return tally(videos, VideoNearDupIndex(config), lambda v: fingerprint_video(v.data, v.name, config))
