"""Per-record media processing without Beam: bytes -> QA -> dedup -> codes -> MDS sample dict.

``MediaProcessor`` holds the built models (EnCodec, image RVQ codebooks, vocab, dedup index)
and is created once per Beam DoFn in ``setup()``. Its ``audio``/``image``/``video`` methods
take lists of (record, payload bytes) so models run batched, and return one
:class:`Result` per input: a sample dict, or a rejection reason (``stage:reason``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.events import RawRecord

from .audio_qa import AudioQA, audio_stats
from .av_decode import decode_audio, open_container
from .encodec_tokenizer import FRAME_RATE, SAMPLE_RATE, EncodecTokenizer
from .errors import MediaConfigError, MediaRejected
from .health import CodebookHealth
from .image_decode import ImageQA, decode_image
from .image_dedup import ImageDeduper
from .image_rvq import RVQImageTokenizer, psnr
from .layout import audio_tokens, default_vocab, image_tokens, video_tokens
from .near_dup import FINGERPRINT_META
from .uri import UriPolicy, read_payload
from .video import VideoDecoder
from .video_near_dup import VideoNearDupConfig

__all__ = ["MediaConfig", "MediaProcessor", "Result", "process_audio", "process_image", "process_video"]


@dataclass(kw_only=True, slots=True)
class MediaConfig:
    """Everything the media path needs; nested component configs build the models."""

    uri: UriPolicy = field(default_factory=UriPolicy)
    audio_qa: AudioQA = field(default_factory=AudioQA)
    encodec: EncodecTokenizer.Config = field(default_factory=EncodecTokenizer.Config)
    image_qa: ImageQA = field(default_factory=ImageQA)
    dedup: ImageDeduper.Config = field(default_factory=ImageDeduper.Config)
    image_codebooks: str = ""  # artifact directory from `headwater discretizer train`
    video: VideoDecoder.Config = field(default_factory=VideoDecoder.Config)
    video_dedup: VideoNearDupConfig = field(default_factory=VideoNearDupConfig)  # MediaDedup's video near-dups
    pipeline_version: str = "media-1"
    recon_every: int = 64  # measure reconstruction error on every n-th item (health)

    def build(self) -> MediaProcessor:
        return MediaProcessor(self)


@dataclass(slots=True)
class Result:
    """Outcome of one record: ``sample`` or ``reason`` (``stage:reason``) + ``detail``."""

    record: RawRecord
    sample: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""
    dead: bool = False  # True: bad input -> DLQ; False with a reason: filtered/deduplicated


class MediaProcessor:
    """Built models + per-modality batch functions."""

    def __init__(self, config: MediaConfig):
        self.config = config
        self.vocab = default_vocab()
        self._encodec: EncodecTokenizer | None = None
        self._image: RVQImageTokenizer | None = None
        self.dedup = config.dedup.build()
        self.video_decoder = config.video.build()
        self.health = CodebookHealth()
        self._seen = 0

    # -- lazily built models (a job without audio never loads EnCodec) ----------------------
    @property
    def encodec(self) -> EncodecTokenizer:
        if self._encodec is None:
            self._encodec = self.config.encodec.build()
        return self._encodec

    @property
    def image_tokenizer(self) -> RVQImageTokenizer:
        if self._image is None:
            if not self.config.image_codebooks:
                raise MediaConfigError("image/video records need image codebooks: train them with `headwater "
                                       "discretizer train --modality image` and pass --image-codebooks DIR "
                                       "(or leave raw.image/raw.video out of the job)")
            self._image = RVQImageTokenizer.load(self.config.image_codebooks)
            if self._image.codebook_size > self.vocab.codebook("image").codes:
                raise ValueError(f"{self._image.name}: {self._image.codebook_size} codes exceed the vocab's image range")
        return self._image

    def manifest(self) -> dict[str, Any]:
        """StreamManifest fields naming the discretizers (pass into the stream writer's manifest)."""
        names = {"audio": self.config.encodec.version()}
        if self.config.image_codebooks:
            names["image"] = names["video"] = self.image_tokenizer.name
        return {"discretizer_version": "+".join(sorted(set(names.values()))), "extra": {"discretizers": names}}

    # -- shared -------------------------------------------------------------------------------
    def payload(self, record: RawRecord) -> bytes:
        return read_payload(record, self.config.uri)

    def _sample(self, record: RawRecord, tokens: np.ndarray, lineage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": record.id,
            "domain": _domain(record),
            "modality": record.modality,
            "tokens": tokens.astype(np.int32),
            "source": record.source,
            "license": record.license,
            "pipeline_version": self.config.pipeline_version,
            "language": str(record.meta.get("language", "")),
            "produced_at": time.time(),
            "lineage": json.dumps({"source_id": record.id, "source": record.source, "vocab": self.vocab.version,
                                   **lineage}, sort_keys=True),
        }

    def _recon_due(self) -> bool:
        self._seen += 1
        return self.config.recon_every > 0 and self._seen % self.config.recon_every == 1

    # -- audio --------------------------------------------------------------------------------
    def decode_audio(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        """Bytes -> (24 kHz mono waveform, QA stats); MediaRejected on bad input or failed QA."""
        with open_container(data) as container:
            wav = decode_audio(container, rate=SAMPLE_RATE, max_seconds=self.config.audio_qa.max_seconds)
        if wav is None:
            raise MediaRejected("no_audio_stream", "container has no audio stream")
        stats = audio_stats(wav, SAMPLE_RATE)
        reason = self.config.audio_qa.check(stats)
        if reason:
            raise MediaRejected(reason, ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
        return wav, stats

    def audio(self, items: list[tuple[RawRecord, bytes]]) -> list[Result]:
        """Tokenize a batch of audio records; EnCodec runs once over all their chunks."""
        results: list[Result] = []
        ok: list[tuple[int, np.ndarray, dict]] = []
        for record, data in items:
            try:
                wav, stats = self.decode_audio(data)
            except MediaRejected as e:
                results.append(_rejected(record, "audio", e))
                continue
            ok.append((len(results), wav, stats))
            results.append(Result(record))
        if not ok:
            return results
        t0 = time.perf_counter()
        codes = self.encodec.encode_many([w for _, w, _ in ok])
        busy = (time.perf_counter() - t0) / len(ok)
        for (i, wav, stats), c in zip(ok, codes):
            record = results[i].record
            tokens = audio_tokens(self.vocab, c, record.meta.get("caption"))
            self.health.add_codes("audio", c, domain=_domain(record))
            self.health.add_sample(tokens=int(c.size), media_seconds=stats["duration_s"], busy_seconds=busy)
            if self._recon_due():
                self.health.add_recon("audio", _snr_db(wav, self.encodec.decode(c)[: wav.size]))
            lineage = {"tokenizer": self.encodec.version, "qa": {k: round(v, 4) for k, v in stats.items()},
                       "levels": int(c.shape[0]), "frames": int(c.shape[1])}
            results[i].sample = self._sample(record, tokens, lineage)
        return results

    # -- image --------------------------------------------------------------------------------
    def image(self, items: list[tuple[RawRecord, bytes]]) -> list[Result]:
        """Decode, QA, dedup and tokenize a batch of images (one RVQ encode call)."""
        results: list[Result] = []
        ok: list[tuple[int, np.ndarray, dict]] = []
        tok = self.image_tokenizer
        for record, data in items:
            try:
                rgb = decode_image(data, self.config.image_qa)
            except MediaRejected as e:
                results.append(_rejected(record, "image", e))
                continue
            checked = record.meta.get(FINGERPRINT_META)
            if checked is not None:  # MediaDedup (keyed state) already decided: keep its fingerprint
                record = dataclasses.replace(record, meta={k: v for k, v in record.meta.items() if k != FINGERPRINT_META})
                evidence = {"media_dedup": checked}
            else:
                dup, evidence = self.dedup.check(rgb, record.id)
                if dup:
                    results.append(Result(record, reason=f"dedup:{dup}", detail=json.dumps(evidence)))
                    continue
            ok.append((len(results), tok.prepare(rgb), evidence))
            results.append(Result(record))
        if not ok:
            return results
        t0 = time.perf_counter()
        images = np.stack([im for _, im, _ in ok])
        codes = tok.encode(images)
        busy = (time.perf_counter() - t0) / len(ok)
        for (i, im, evidence), c in zip(ok, codes):
            record = results[i].record
            tokens = image_tokens(self.vocab, c, record.meta.get("caption") or record.meta.get("alt"))
            self.health.add_codes("image", c, domain=_domain(record))
            self.health.add_sample(tokens=int(c.size), media_seconds=0.0, busy_seconds=busy)
            if self._recon_due():
                self.health.add_recon("image", psnr(im, tok.decode(c[None])[0]))
            lineage = {"tokenizer": tok.name, **evidence, "levels": int(c.shape[0]), "positions": int(c.shape[1])}
            results[i].sample = self._sample(record, tokens, lineage)
        return results

    # -- video --------------------------------------------------------------------------------
    def video(self, items: list[tuple[RawRecord, bytes]]) -> list[Result]:
        """Decode, segment and tokenize videos one by one (each is already a batch of frames)."""
        return [self._video_one(record, data) for record, data in items]

    def _video_one(self, record: RawRecord, data: bytes) -> Result:
        tok = self.image_tokenizer
        checked = record.meta.get(FINGERPRINT_META)  # MediaDedup kept it: publish its fingerprint
        if checked is not None:
            record = dataclasses.replace(record, meta={k: v for k, v in record.meta.items() if k != FINGERPRINT_META})
        try:
            clip = self.video_decoder.decode(data)
        except MediaRejected as e:
            return _rejected(record, "video", e)
        t0 = time.perf_counter()
        keyframes = np.stack([tok.prepare(clip.frames[k]) for k in clip.keyframes])
        frame_codes = tok.encode(keyframes)
        audio_codes = None
        if clip.audio is not None and clip.audio.size >= SAMPLE_RATE // 10:
            audio_codes = self.encodec.encode(clip.audio)
        starts = [float(clip.times[k]) for k in clip.keyframes]
        ends = starts[1:] + [clip.duration_s]
        segments = []
        for c, a, b in zip(frame_codes, starts, ends):
            seg_audio = audio_codes[:, round(a * FRAME_RATE) : round(b * FRAME_RATE)] if audio_codes is not None else None
            segments.append((c, seg_audio))
        tokens = video_tokens(self.vocab, segments, record.meta.get("caption"))
        busy = time.perf_counter() - t0
        for c in frame_codes:
            self.health.add_codes("video", c, domain=_domain(record))
        if audio_codes is not None:
            self.health.add_codes("audio", audio_codes, domain=_domain(record))
        n_codes = int(frame_codes.size + (audio_codes.size if audio_codes is not None else 0))
        self.health.add_sample(tokens=n_codes, media_seconds=clip.duration_s, busy_seconds=busy,
                               dropped_frames=clip.dropped_frames)
        lineage = {"tokenizer": tok.name, "audio_tokenizer": self.encodec.version if audio_codes is not None else "",
                   "keyframe_times": [round(t, 3) for t in starts], "shot_cuts": [round(float(clip.times[i]), 3) for i in clip.cuts],
                   "duration_s": round(clip.duration_s, 3), "dropped_frames": clip.dropped_frames}
        if checked is not None:
            lineage["media_dedup"] = checked
        return Result(record, sample=self._sample(record, tokens, lineage))


def _domain(record: RawRecord) -> str:
    return str(record.meta.get("domain") or record.modality)


def _rejected(record: RawRecord, stage: str, e: MediaRejected) -> Result:
    """QA failures are filter drops; undecodable/unsafe input goes to the DLQ."""
    dead = e.reason not in QA_DROPS
    return Result(record, reason=f"{stage}:{e.reason}", detail=e.detail, dead=dead)


#: Reasons that mean "valid media we choose not to train on" (counted drops, not dead letters).
QA_DROPS = frozenset({"too_short", "silence", "clipping", "low_activity", "low_snr", "too_small", "bad_aspect"})


def _snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    n = min(ref.size, est.size)
    noise = np.sum((ref[:n] - est[:n]) ** 2) + 1e-12
    return float(10 * np.log10(np.sum(ref[:n] ** 2) / noise + 1e-12))


def _one(proc: MediaProcessor, modality: str, record: RawRecord, data: bytes | None) -> Result:
    try:
        payload = data if data is not None else proc.payload(record)
    except MediaRejected as e:
        return _rejected(record, "read", e)
    return getattr(proc, modality)([(record, payload)])[0]


def process_audio(record: RawRecord, proc: MediaProcessor, data: bytes | None = None) -> Result:
    """One audio record end to end (payload read via the URI policy unless ``data`` is given)."""
    return _one(proc, "audio", record, data)


def process_image(record: RawRecord, proc: MediaProcessor, data: bytes | None = None) -> Result:
    """One image record end to end."""
    return _one(proc, "image", record, data)


def process_video(record: RawRecord, proc: MediaProcessor, data: bytes | None = None) -> Result:
    """One video record end to end."""
    return _one(proc, "video", record, data)
