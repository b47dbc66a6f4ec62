"""PyAV decoding shared by audio and video: containers opened from bytes, errors mapped to reasons."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import av
import numpy as np

from .errors import MediaRejected

__all__ = ["av_errors", "decode_audio", "open_container"]


@contextmanager
def av_errors(stage: str) -> Iterator[None]:
    """Map PyAV/FFmpeg failures inside the block to MediaRejected('corrupt'|'unsupported_codec')."""
    try:
        yield
    except MediaRejected:
        raise
    except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError, NotImplementedError) as e:
        raise MediaRejected("unsupported_codec", f"{stage}: {e}") from None
    except (av.error.FFmpegError, ValueError, EOFError, OSError, IndexError) as e:
        raise MediaRejected("corrupt", f"{stage}: {type(e).__name__}: {e}") from None


@contextmanager
def open_container(data: bytes) -> Iterator[av.container.InputContainer]:
    """Open an in-memory media container; unknown formats become MediaRejected('wrong_container')."""
    try:
        container = av.open(io.BytesIO(data), mode="r", options={"probesize": "5000000"})
    except av.error.FFmpegError as e:
        raise MediaRejected("wrong_container", f"not a media container FFmpeg can read: {e}") from None
    try:
        yield container
    finally:
        container.close()


def decode_audio(
    container: av.container.InputContainer, *, rate: int, max_seconds: float
) -> np.ndarray | None:
    """Decode the first audio stream to float32 mono at ``rate``; None when there is no audio stream.

    Decoding stops with MediaRejected('too_long') once more than ``max_seconds`` were produced,
    so an enormous file never lands in memory.
    """
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    limit = int(max_seconds * rate)
    chunks: list[np.ndarray] = []
    n = 0
    with av_errors("audio decode"):
        for frame in container.decode(stream):
            frame.pts = None  # let the resampler re-time; broken pts must not fail it
            for out in resampler.resample(frame):
                arr = out.to_ndarray().reshape(-1)
                chunks.append(arr)
                n += arr.size
            if n > limit:
                raise MediaRejected("too_long", f"audio longer than {max_seconds:.0f} s")
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
