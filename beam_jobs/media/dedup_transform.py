"""Image and video near-dup dedup as a sharded Beam chain (the media counterpart of ``beam_jobs.dedup``).

1. ``Fingerprint`` (stateless): reads and decodes each image or video record, computes its
   :class:`near_dup.MediaFingerprint` (a video: :class:`video_near_dup.VideoFingerprint`, K
   keyframe fingerprints), looks it up in the *settled* index (what earlier micro-batches
   published; local runner only) and fans out: one probe per bucket key (pHash chunk and
   mean-colour cell, :func:`near_dup.bucket_keys`; a video's are its keyframes' keys, flagged
   so images and videos never meet), a registration of its fingerprint under its id hash, and
   the record itself under its own key. Records of other modalities or that do not decode pass
   through untouched (TokenizeMedia dead-letters or QA-drops them with their reason).
2. ``Buckets`` keyed by bucket: buffers probes until the watermark passes them, then handles
   them in priority order (event time, then offset, partition, id hash): each probe asks every
   id already in the bucket (never its own) to verify, then joins it. State: 8 bytes per id,
   at most ``bucket_cap`` ids per bucket.
3. ``Verify`` keyed by an image's id hash holds its fingerprint (~1.5 KB) and answers queries:
   pHash within the radius (or met on the colour route) AND thumbnail SSIM, colour, coarse
   structure and detail agree (:func:`near_dup.compare`); for videos, most keyframes pair up
   in order (:func:`video_near_dup.compare_video`). A record never matches itself.
4. ``Decide`` keyed by the record: once every probe reported and every query is answered, the
   record is a duplicate iff a settled match or a verified candidate exists. Of two
   near-duplicates in flight, the later in priority order asks about the earlier and never the
   reverse, so exactly one is kept on any number of workers. Beam state commits with its
   bundle, so a retried bundle gives identical output.

Kept image and video records leave with their encoded fingerprint in ``meta[FINGERPRINT_META]``;
``MediaProcessor.image``/``video`` move it into the sample's ``lineage["media_dedup"]``, so every
published shard carries its index delta (:mod:`dedup_settled`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import BytesCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)

from beam_jobs.dedup.keyed import admit, hold_probe, register_or_answer, take_due

from .dedup_settled import MediaSettledRef
from .errors import MediaRejected
from .image_decode import ImageQA, decode_image
from .near_dup import (
    FINGERPRINT_META,
    NearDupConfig,
    bucket_keys,
    compare,
    decode,
    encode,
    fingerprint,
)
from .uri import UriPolicy, read_payload
from .video import VideoDecoder
from .video_near_dup import (
    VideoNearDupConfig,
    compare_video,
    decode_video,
    encode_video,
    fingerprint_video,
    is_video,
    video_bucket_keys,
)

__all__ = ["DROPPED_TAG", "MediaDedup", "MediaDedupConfig"]

DROPPED_TAG = "dropped"


@dataclass(kw_only=True, slots=True)
class MediaDedupConfig:
    """How image and video records are read for fingerprinting and the near-dup thresholds."""

    near: NearDupConfig = field(default_factory=NearDupConfig)
    video: VideoNearDupConfig = field(default_factory=VideoNearDupConfig)
    uri: UriPolicy = field(default_factory=UriPolicy)
    image_qa: ImageQA = field(default_factory=ImageQA)
    video_limits: VideoDecoder.Config = field(default_factory=VideoDecoder.Config)  # tokenization's bounds
    bucket_cap: int = 10_000  # ids kept per bucket (oldest evicted, counted)


class _Probe(NamedTuple):
    reckey: tuple[int, int]
    idh: int
    prio: int  # event time (micros)
    order: tuple[int, int, int]  # ties: (offset, partition, id hash)
    coords: tuple[str, int, int] | None
    fp: str  # encoded fingerprint (what candidates verify against)


class _Query(NamedTuple):
    reckey: tuple[int, int]
    coords: tuple[str, int, int] | None
    fp: str
    replay: bool  # the prober's own id was already in the bucket


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _coords(coords) -> tuple[str, int, int] | None:
    try:
        topic, partition, offset = coords
        return str(topic), int(partition), int(offset)
    except (TypeError, ValueError):
        return None


class _MediaFingerprintFn(beam.DoFn):
    def __init__(self, config: MediaDedupConfig, settled: MediaSettledRef | None):
        self.config, self.settled = config, settled
        self.modalities = ("image", "video") if config.video.enabled else ("image",)

    def setup(self):
        self.index = self.settled.open() if self.settled is not None else None

    def _fingerprint(self, record, c) -> tuple[str, list[int], tuple | None]:
        """(encoded fingerprint, bucket keys, settled match) of an image or video record."""
        payload = read_payload(record, self.config.uri)
        if record.modality == "image":
            fp = fingerprint(decode_image(payload, self.config.image_qa), record.id, c)
            hit = self.index.lookup(fp) if self.index is not None else None
            return encode(fp), bucket_keys(fp, self.config.near), hit
        fp = fingerprint_video(payload, record.id, self.config.video, limits=self.config.video_limits, coords=c)
        hit = self.index.lookup_video(fp) if self.index is not None else None
        return encode_video(fp), video_bucket_keys(fp, self.config.video), hit

    def process(self, element, ts=beam.DoFn.TimestampParam):
        coords, record = element if isinstance(element, tuple) else (None, element)
        if record.modality not in self.modalities:
            yield beam.pvalue.TaggedOutput("passed", element)
            return
        c = _coords(coords)
        try:
            text, keys, hit = self._fingerprint(record, c)
        except MediaRejected as e:  # bad input: TokenizeMedia rejects it with its reason
            Metrics.counter("media_dedup", f"pass_rejected_{e.reason}").inc()
            yield beam.pvalue.TaggedOutput("passed", element)
            return
        except Exception as e:  # an index or code fault: counted and logged, never silent
            Metrics.counter("media_dedup", "fingerprint_failed").inc()
            logging.getLogger(__name__).exception("media dedup: fingerprint of %s failed (%s); it passes undeduplicated",
                                                  record.id, type(e).__name__)
            yield beam.pvalue.TaggedOutput("passed", element)
            return
        Metrics.counter("media_dedup", "in").inc()
        Metrics.counter("media_dedup", f"in_{record.modality}").inc()
        idh = _hash64(record.id)
        reckey = (idh, _hash64(repr(c)) if c else idh)
        prio = ts.micros
        order = (c[2], c[1], idh) if c else (0, 0, idh)
        settled_hit = (hit[0], hit[1].record_id, hit[2]) if hit else None
        yield reckey, ("rec", coords, record, text, settled_hit, prio, len(keys))
        yield beam.pvalue.TaggedOutput("verify", (idh, ("reg", (prio, text, c))))
        for key in keys:
            yield beam.pvalue.TaggedOutput("probe", (key, _Probe(reckey, idh, prio, order, c, text)))


class _ImageBucketFn(beam.DoFn):
    """Keyed by bucket: the ids in it (packed uint64, at most ``bucket_cap``)."""

    IDS = ReadModifyWriteStateSpec("image_ids", BytesCoder())
    PENDING = BagStateSpec("image_pending", PickleCoder())
    NEXT = ReadModifyWriteStateSpec("image_next", PickleCoder())
    WAKE = TimerSpec("image_wake", TimeDomain.WATERMARK)

    def __init__(self, cap: int):
        self.cap = cap

    def process(self, element, pending=beam.DoFn.StateParam(PENDING), nxt=beam.DoFn.StateParam(NEXT),  # noqa: B008
                wake=beam.DoFn.TimerParam(WAKE)):  # noqa: B008
        hold_probe(element[1], pending, nxt, wake)

    @on_timer(WAKE)
    def handle(self, fired=beam.DoFn.TimestampParam, ids_state=beam.DoFn.StateParam(IDS),  # noqa: B008
               pending=beam.DoFn.StateParam(PENDING), nxt=beam.DoFn.StateParam(NEXT),  # noqa: B008
               wake=beam.DoFn.TimerParam(WAKE)):  # noqa: B008
        ready = take_due(fired.micros, pending, nxt, wake)
        ids = np.frombuffer(ids_state.read() or b"", dtype=np.uint64).tolist()
        for p in ready:
            replay = p.idh in ids
            asked = [i for i in ids if i != p.idh]
            for cand in asked:
                yield cand, ("q", _Query(p.reckey, p.coords, p.fp, replay))
            yield beam.pvalue.TaggedOutput("report", (p.reckey, ("bucket", len(asked))))
            if not replay:
                admit(ids, p.idh, self.cap, "media_dedup")
        ids_state.write(np.asarray(ids, dtype=np.uint64).tobytes())


class _ImageVerifyFn(beam.DoFn):
    """Keyed by an image's or video's id hash: its fingerprint; answers queries about it."""

    FP = ReadModifyWriteStateSpec("fp", PickleCoder())
    WAITING = BagStateSpec("waiting", PickleCoder())
    MEMO = 256  # decisions remembered per DoFn instance (a pure function of the pair)

    def __init__(self, near: NearDupConfig, video: VideoNearDupConfig):
        self.near, self.video = near, video

    def setup(self):
        self.memo: dict[tuple, tuple] = {}

    def _judge(self, q: _Query, text: str, coords) -> tuple:
        """(candidate id, match or None) of the query against a held fingerprint. A video
        candidate is met on many of its keyframes' buckets: repeats are answered from a memo."""
        key = (q.fp, q.coords, text, coords)
        if key not in self.memo:
            if len(self.memo) >= self.MEMO:
                self.memo.clear()
            if is_video(text) != is_video(q.fp):  # never met (disjoint keys); never a match
                self.memo[key] = ("", None)
            elif is_video(text):
                cand = decode_video(text, coords)
                self.memo[key] = (cand.record_id, compare_video(decode_video(q.fp, q.coords), cand, self.video))
            else:
                cand = decode(text, coords)
                self.memo[key] = (cand.record_id, compare(decode(q.fp, q.coords), cand, self.near))
        return self.memo[key]

    def _answer(self, held: tuple, q: _Query) -> tuple:
        """Every query is answered (Decide counts answers); a match carries its reason."""
        added, text, coords = held
        cand_id, hit = self._judge(q, text, coords)
        if hit is None:
            return q.reckey, ("v", None, None, cand_id, added, q.replay)
        reason, evidence = hit
        # Deterministic best: exact first, fewest pHash bits, highest SSIM, then the earliest.
        rank = (reason != "exact_duplicate", evidence.get("hamming", 0), -evidence.get("ssim", 1.0), added, cand_id)
        return q.reckey, ("v", reason, rank, cand_id, added, q.replay, evidence)

    def process(self, element, fp_state=beam.DoFn.StateParam(FP), waiting=beam.DoFn.StateParam(WAITING)):  # noqa: B008
        _, (kind, payload) = element
        yield from register_or_answer(kind, payload, fp_state, waiting, self._answer)


class _ImageDecideFn(beam.DoFn):
    """Keyed by the record: collects it, one report per probe and one answer per query asked on
    its behalf; decides once all are in."""

    HELD = BagStateSpec("held", PickleCoder())
    TALLY = ReadModifyWriteStateSpec("tally", PickleCoder())  # [probes due, in, answers due, in, best]

    def process(self, element, held=beam.DoFn.StateParam(HELD), tally=beam.DoFn.StateParam(TALLY)):  # noqa: B008
        _, msg = element
        t = tally.read() or [0, 0, 0, 0, None]
        if msg[0] == "rec":
            held.add(msg[1:6])
            t[0] += msg[6]
        elif msg[0] == "bucket":
            t[1] += 1
            t[2] += msg[1]
        else:
            t[3] += 1
            if msg[1] is not None and (t[4] is None or msg[2] < t[4][0]):
                t[4] = (msg[2], msg[1], msg[3], msg[4], msg[5], msg[6])
        records = list(held.read())
        if not records or t[1] < t[0] or t[3] < t[2]:
            tally.write(t)
            return
        held.clear()
        tally.clear()
        for coords, record, text, settled_hit, prio in records:
            hit = settled_hit
            if hit is None and t[4] is not None:
                _, reason, cand_id, cand_added, replay, evidence = t[4]
                # A replay only counts what was there before it (its first decision's view).
                if not replay or cand_added <= prio:
                    hit = (reason, cand_id, evidence)
            if hit is None:
                Metrics.counter("media_dedup", "out").inc()
                yield coords, dataclasses.replace(record, meta={**record.meta, FINGERPRINT_META: text})
                continue
            reason, original, evidence = hit
            Metrics.counter("media_dedup", f"drop_{reason}").inc()
            # Never reaches TokenizeMedia: counted in the media stage's totals here.
            Metrics.counter("media", f"in_{record.modality}").inc()
            Metrics.counter("media", f"drop_dedup_{reason}").inc()
            yield beam.pvalue.TaggedOutput(DROPPED_TAG, (coords, f"dedup:{reason}", record.id, original, evidence,
                                                            record.source))


class MediaDedup(beam.PTransform):
    """(coords, RawRecord) -> ``{"records": (coords, RawRecord) to tokenize, "dropped":
    (coords, "dedup:<reason>", record id, dup_of id, evidence) of duplicates}``."""

    def __init__(self, config: MediaDedupConfig | None = None, *, settled: MediaSettledRef | None = None):
        """``settled``: the pinned settled index of the stream root (local runner); ``None`` on
        runners whose Beam state outlives the job (Dataflow, Flink): the state is the index."""
        super().__init__()
        self.config = config or MediaDedupConfig()
        self.settled = settled

    def expand(self, records):
        c = self.config
        fp = records | "Fingerprint" >> beam.ParDo(_MediaFingerprintFn(c, self.settled)).with_outputs(
            "probe", "verify", "passed", main="rec")
        buckets = fp.probe | "ImageBuckets" >> beam.ParDo(_ImageBucketFn(c.bucket_cap)).with_input_types(
            tuple[int, Any]).with_outputs("report", main="query")
        verdicts = ((fp.verify, buckets.query) | "ToVerify" >> beam.Flatten()
                    | "ImageVerify" >> beam.ParDo(_ImageVerifyFn(c.near, c.video)).with_input_types(tuple[int, Any]))
        decided = ((fp.rec, buckets.report, verdicts) | "ToDecide" >> beam.Flatten()
                   | "ImageDecide" >> beam.ParDo(_ImageDecideFn()).with_input_types(tuple[tuple[int, int], Any])
                   .with_outputs(DROPPED_TAG, main="kept"))
        kept = (decided.kept, fp.passed) | "Merge" >> beam.Flatten()
        return {"records": kept, DROPPED_TAG: decided[DROPPED_TAG]}
