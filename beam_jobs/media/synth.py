"""Procedural test/benchmark media: images, speech-like audio, videos with known shot cuts.

Everything is generated from a seed with numpy and encoded with Pillow/PyAV, so tests and
benchmarks need no downloaded data. ``espeak_wav`` uses the Debian ``espeak-ng`` binary when
installed.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import av
import numpy as np
from PIL import Image

__all__ = ["encode_audio", "encode_image", "encode_video", "espeak_wav", "procedural_image", "speechlike", "train_codebooks"]


def procedural_image(seed: int, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """uint8 RGB [H, W, 3]: random discs and rectangles over a random gradient and stripes."""
    r = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.empty((h, w, 3))
    c0, c1 = r.uniform(0, 255, 3), r.uniform(0, 255, 3)
    ramp = (xx * r.uniform(-1, 1) + yy * r.uniform(-1, 1)) / (h + w) + 0.5
    a[:] = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(r.integers(3, 8)):
        col = r.uniform(0, 255, 3)
        if r.random() < 0.5:
            cx, cy, rad = r.uniform(0, w), r.uniform(0, h), r.uniform(0.05, 0.3) * min(h, w)
            a[(xx - cx) ** 2 + (yy - cy) ** 2 < rad**2] = col
        else:
            x0, y0 = r.uniform(0, w * 0.8), r.uniform(0, h * 0.8)
            a[(xx > x0) & (xx < x0 + r.uniform(5, w / 2)) & (yy > y0) & (yy < y0 + r.uniform(5, h / 2))] = col
    a += (np.sin(xx / r.uniform(1.5, 6) + r.uniform(0, 6)) * r.uniform(0, 25))[..., None]
    return np.clip(a, 0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def speechlike(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """Float32 mono: voiced harmonic bursts (syllables) separated by pauses, over faint noise."""
    r = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = r.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * r.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllable = np.sin(2 * np.pi * r.uniform(3, 5) * t) > 0.2
    wav = 0.2 * voice * syllable + 0.003 * r.standard_normal(n)
    return wav.astype(np.float32)


def encode_audio(wav: np.ndarray, rate: int = 24_000, fmt: str = "wav") -> bytes:
    """Encode mono float audio with PyAV: wav (pcm_s16le), ogg (opus) or mp4 (aac)."""
    codec = {"wav": "pcm_s16le", "ogg": "libopus", "mp4": "aac"}[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=48_000 if codec == "libopus" else rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wav.astype(np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=stream.codec_context.sample_rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            for pkt in stream.encode(f):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    return buf.getvalue()


def espeak_wav(text: str) -> bytes | None:
    """WAV bytes of ``text`` spoken by espeak-ng, or None when it is not installed."""
    exe = shutil.which("espeak-ng")
    if not exe:
        return None
    return subprocess.run([exe, "--stdout", text], check=True, capture_output=True, timeout=30).stdout


def encode_video(shots: list[tuple[float, int]], *, fps: int = 12, size: tuple[int, int] = (96, 64),
                 audio: np.ndarray | None = None, audio_rate: int = 24_000) -> bytes:
    """MP4 (mpeg4) with one procedural scene per (seconds, seed) shot, slowly panning; optional AAC audio."""
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.bit_rate = 2_000_000
        as_ = out.add_stream("aac", rate=audio_rate, layout="mono") if audio is not None else None
        for seconds, seed in shots:
            scene = procedural_image(seed, (h + 16, w + 16))
            for i in range(round(seconds * fps)):
                dx = i % 16
                img = np.ascontiguousarray(scene[8 : 8 + h, dx : dx + w])
                for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
        if as_ is not None:
            frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None], format="flt", layout="mono")
            frame.sample_rate = audio_rate
            res = av.AudioResampler(format=as_.codec_context.format, layout="mono", rate=audio_rate)
            for f in res.resample(frame) + res.resample(None):
                for pkt in as_.encode(f):
                    out.mux(pkt)
            for pkt in as_.encode(None):
                out.mux(pkt)
    return buf.getvalue()


def train_codebooks(root, *, n_images: int = 60, levels: int = 4, nbits: int = 6, side: int = 64, grid: int = 16,
                    seed: int = 0) -> str:
    """Train small image RVQ codebooks on procedural images and save the artifact; returns its path."""
    from .image_rvq import RVQImageTokenizer

    tok = RVQImageTokenizer.Config(side=side, grid=grid, levels=levels, nbits=nbits, seed=seed).build()
    images = np.stack([tok.prepare(procedural_image(10_000 + i)) for i in range(n_images)])
    return str(tok.train(images).save(root, trained_on="synth.procedural_image"))
