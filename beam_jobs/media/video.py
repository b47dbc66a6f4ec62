"""Video decoding for tokenization: fps resampling, shot cuts, keyframes, and the audio track."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .av_decode import av_errors, decode_audio, open_container
from .errors import MediaRejected
from .image_rvq import square_resize

__all__ = ["VideoClip", "VideoDecoder", "frame_histogram", "shot_cuts"]


def frame_histogram(rgb: np.ndarray, bins: int = 8) -> np.ndarray:
    """Normalised joint RGB histogram (bins³) of one frame."""
    q = (rgb.reshape(-1, 3).astype(np.int64) * bins) // 256
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return h / h.sum()


def shot_cuts(frames: list[np.ndarray] | np.ndarray, threshold: float) -> list[int]:
    """Indices i where a new shot starts at frame i: total-variation histogram distance > threshold."""
    hists = [frame_histogram(f) for f in frames]
    return [i for i in range(1, len(hists)) if 0.5 * np.abs(hists[i] - hists[i - 1]).sum() > threshold]


@dataclass(slots=True)
class VideoClip:
    """What the tokenizer needs from a video."""

    duration_s: float
    times: np.ndarray  # seconds of each sampled frame
    frames: np.ndarray  # uint8 [n, side, side, 3] at the sampling fps
    cuts: list[int]  # sampled-frame indices that start a new shot
    keyframes: list[int]  # sampled-frame indices that are tokenized
    audio: np.ndarray | None  # mono float32 at the audio rate, or None
    dropped_frames: int = 0
    shots: list[tuple[int, int]] = field(default_factory=list)


class VideoDecoder:
    """Bytes -> :class:`VideoClip` with bounds on size, duration and frame count."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        fps: float = 2.0  # sampling rate for shot detection/keyframes
        side: int = 64  # frame resolution handed to the image tokenizer
        cut_threshold: float = 0.5  # histogram total-variation distance
        keyframe_every_s: float = 2.0  # extra keyframes inside long shots (tubelets)
        max_keyframes: int = 64
        max_seconds: float = 600.0
        max_frames: int = 20_000  # decoded frames, before resampling
        max_pixels: int = 8_294_400  # 4K UHD per frame
        audio_rate: int = 24_000

        def build(self) -> VideoDecoder:
            return VideoDecoder(self)

    def __init__(self, config: VideoDecoder.Config):
        self.config = config

    def sample(self, data: bytes, *, square: bool = True,
               max_kept: int | None = None) -> tuple[np.ndarray, list[np.ndarray], int]:
        """Bounds-checked frames at ``fps`` only (no audio, no cuts): ``(times, frames, dropped)``.
        Frames are ``side``×``side`` (centre crop) or, with ``square=False``, keep their aspect
        with the short side ``2 * side`` and the long side at most ``8 * side`` (a 4096×16
        stream is squeezed, never held at 64×16384). ``max_kept``: whenever more frames are kept,
        every other one is dropped and the rate halved, so at most ``max_kept`` are ever held
        whatever duration the container claims."""
        c = self.config
        with open_container(data) as container:
            if not container.streams.video:
                raise MediaRejected("no_video_stream", "container has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > c.max_pixels:
                raise MediaRejected("too_many_pixels", f"{w}x{h} frames exceed {c.max_pixels} pixels")
            if container.duration and container.duration / 1e6 > c.max_seconds:
                raise MediaRejected("too_long", f"{container.duration / 1e6:.0f} s exceeds {c.max_seconds:.0f} s")
            times, frames, dropped = self._sample(container, stream, square, max_kept)
        if not frames:
            raise MediaRejected("corrupt", "no decodable video frames")
        return np.asarray(times), frames, dropped

    def decode(self, data: bytes) -> VideoClip:
        c = self.config
        times_a, frames, dropped = self.sample(data)
        with open_container(data) as container:
            audio = decode_audio(container, rate=c.audio_rate, max_seconds=c.max_seconds)
        cuts = shot_cuts(frames, c.cut_threshold)
        bounds = [0, *cuts, len(frames)]
        shots = list(itertools.pairwise(bounds))
        keyframes: list[int] = []
        for a, b in shots:  # first frame of each shot, then one per keyframe_every_s inside it
            last = None
            for i in range(a, b):
                if last is None or times_a[i] - times_a[last] >= c.keyframe_every_s - 1e-6:
                    keyframes.append(i)
                    last = i
        duration = float(times_a[-1] + 1.0 / c.fps)
        return VideoClip(duration, times_a, np.stack(frames), cuts, keyframes[: c.max_keyframes], audio,
                         dropped_frames=dropped, shots=shots)

    def _sample(self, container, stream, square: bool,
                max_kept: int | None = None) -> tuple[list[float], list[np.ndarray], int]:
        """Decode and keep one frame per 1/fps seconds; returns (times, frames, dropped)."""
        c = self.config
        step = 1.0 / c.fps
        times: list[float] = []
        frames: list[np.ndarray] = []
        next_t, decoded, dropped, last_t = 0.0, 0, 0, -1.0
        with av_errors("video decode"):
            for frame in container.decode(stream):
                decoded += 1
                if decoded > c.max_frames:
                    raise MediaRejected("too_many_frames", f"more than {c.max_frames} frames")
                t = frame.time
                if t is None or t <= last_t:
                    dropped += 1  # no or non-monotonic timestamp
                    continue
                last_t = t
                if t > c.max_seconds:
                    raise MediaRejected("too_long", f"frames beyond {c.max_seconds:.0f} s")
                if t + 1e-6 < next_t:
                    continue
                scale = 2 * c.side / min(frame.width, frame.height)
                long_cap = 1 << 30 if square else 8 * c.side  # kept long side (aspect squeezed beyond 4:1)
                small = frame.to_ndarray(format="rgb24",
                                         width=min(long_cap, max(c.side, round(frame.width * scale))) // 2 * 2,
                                         height=min(long_cap, max(c.side, round(frame.height * scale))) // 2 * 2)
                frames.append(square_resize(small, c.side) if square else small)
                times.append(t)
                while next_t <= t + 1e-6:
                    next_t += step
                if max_kept is not None and len(frames) > max_kept:  # halve: memory never follows the length
                    frames, times, step = frames[::2], times[::2], 2 * step
                    next_t = times[-1] + step
        return times, frames, dropped
