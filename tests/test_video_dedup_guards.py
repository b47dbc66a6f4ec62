"""Regression tests of the video near-dup review (notes/review_dedup2.md): the audio half of the
decision and the duration check on the exact route (H1), bounded decoded frames (H2), takedown
purges of the media index and their re-run after a failed purge (H4), whole ids (M1), the media
sync lock (M3)."""

import io
import json
import time

import av
import numpy as np
import pytest

from beam_jobs.dedup.snapshot import SnapshotBusy, read_purged
from beam_jobs.media import dedup_settled
from beam_jobs.media.dedup_settled import MediaSettledIndex, sync
from beam_jobs.media.near_dup import NearDupConfig, encode, fingerprint
from beam_jobs.media.video import VideoDecoder
from beam_jobs.media.video_lookalikes import distinct_video
from beam_jobs.media.video_near_dup import (
    VideoNearDupConfig,
    compare_video,
    decode_video,
    encode_video,
    fingerprint_video,
)
from beam_jobs.media.video_settled import VideoSegment
from streams.mds import LiveStreamWriter

C = VideoNearDupConfig()
_Y, _X = np.mgrid[0:64, 0:96]
ART = np.stack([(_X * 2) % 256, (_Y * 4) % 256, ((_X + _Y) * 3) % 256], -1).astype(np.uint8)  # a "cover"
ART[20:44, 30:66] = [200, 40, 40]


def _mux(seconds: int, pcm: np.ndarray | None, rate: int = 16_000, bit_rate: int | None = None) -> bytes:
    """MP4: the still ART at 2 fps for ``seconds``, plus an AAC track of ``pcm`` (mono, ``rate``)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("mpeg4", rate=2)
        vs.width, vs.height, vs.pix_fmt = 96, 64, "yuv420p"
        aus = out.add_stream("aac", rate=rate) if pcm is not None else None
        if aus is not None and bit_rate:
            aus.bit_rate = bit_rate
        for _ in range(2 * seconds):
            for p in vs.encode(av.VideoFrame.from_ndarray(ART, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if aus is not None:
            x = pcm.astype(np.float32)[None]
            for i in range(0, x.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i : i + 1024]), format="flt", layout="mono")
                fr.sample_rate = rate
                for p in aus.encode(fr):
                    out.mux(p)
            for p in aus.encode(None):
                out.mux(p)
    return buf.getvalue()


def _speech(seed: int, seconds: float, rate: int = 16_000) -> np.ndarray:
    """Speech-like audio: tilted noise under a random syllable-rate envelope (one 'voice' for every seed)."""
    r = np.random.default_rng(seed)
    n = int(seconds * rate)
    env = np.repeat(r.uniform(0, 1, int(seconds * 4) + 1) ** 2, rate // 4)[:n]
    spec = np.fft.rfft(r.standard_normal(n)) / (1 + np.fft.rfftfreq(n, 1 / rate) / 300)
    x = np.fft.irfft(spec, n)
    return 0.3 * env * x / np.abs(x).max()


def _tone(freq: float, seconds: float, rate: int = 16_000) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


@pytest.fixture(scope="module")
def podcast():
    s1 = _speech(1, 10)
    resampled = np.interp(np.arange(10 * 22_050) * 16_000 / 22_050, np.arange(s1.size), s1)
    return {name: fingerprint_video(data, name, C) for name, data in {
        "ep1": _mux(10, s1),
        "ep1-reencode": _mux(10, 0.7 * resampled, rate=22_050, bit_rate=48_000),
        "ep1-trim": _mux(9, s1[16_000:]),  # the first second cut
        "ep2": _mux(10, _speech(2, 10)),  # same cover, same "voice", other words
        "tone440": _mux(10, _tone(440, 10)),
        "tone440-reencode": _mux(10, _tone(440, 10, 22_050) * 0.5, rate=22_050, bit_rate=48_000),
        "tone300": _mux(11, _tone(300, 11)),
        "silent": _mux(10, np.zeros(160_000)),
        "no-track": _mux(10, None),
    }.items()}


def test_same_frames_with_other_audio_are_kept_and_copies_of_the_audio_are_dropped(podcast):
    f = podcast
    assert f["ep1"].audio and f["tone440"].audio and not f["silent"].audio and not f["no-track"].audio
    for a, b in [("ep2", "ep1"), ("tone300", "tone440"), ("tone440", "ep1"), ("silent", "ep1"), ("ep1", "no-track")]:
        assert compare_video(f[a], f[b], C) is None, (a, b)  # the keyframes alone match all of these
    for a, b in [("ep1-reencode", "ep1"), ("ep1-trim", "ep1"), ("tone440-reencode", "tone440"),
                 ("silent", "no-track")]:
        hit = compare_video(f[a], f[b], C)
        assert hit is not None, (a, b)
    assert compare_video(f["ep1-reencode"], f["ep1"], C)[1]["audio_temporal"] > 0.8
    assert decode_video(encode_video(f["ep1"])) == f["ep1"]._replace(coords=None)


def test_the_exact_route_checks_durations_too():
    fp = fingerprint_video(distinct_video("motion", 11), "a", C)
    longer = fp._replace(record_id="b", duration=fp.duration * 1.67)  # pixel-identical keyframes, other length
    assert compare_video(longer, fp, C) is None
    assert compare_video(fp._replace(record_id="b"), fp, C)[0] == "exact_duplicate"


def test_a_wide_raw_stream_with_no_duration_holds_few_small_frames():
    buf = io.BytesIO()  # 4096×16, 60 s, raw m4v: the container claims no duration
    with av.open(buf, "w", format="m4v") as out:
        vs = out.add_stream("mpeg4", rate=8)
        vs.width, vs.height, vs.pix_fmt = 4096, 16, "yuv420p"
        fr = np.zeros((16, 4096, 3), np.uint8)
        fr[:, ::7] = 255
        for _ in range(8 * 60):
            for p in vs.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    data = buf.getvalue()
    decoder = VideoDecoder.Config(fps=C.fps, side=C.side).build()
    _, frames, _ = decoder.sample(data, square=False, max_kept=C.max_frames)
    assert max(f.shape[1] for f in frames) <= 8 * C.side and all(min(f.shape[:2]) == 2 * C.side for f in frames)
    assert len(frames) <= C.max_frames
    assert sum(f.nbytes for f in frames) <= C.max_frames * (2 * C.side) * (8 * C.side) * 3  # ~4.7 MB, was ~1.5 GB
    assert fingerprint_video(data, "wide", C).duration > 50


def test_long_and_cut_ids_are_kept_whole(tmp_path):
    clip = distinct_video("motion", 21)
    for rid in ["s3://bucket/ingest/2026/11/30/partner-feed/video-000000000000001.mp4", "é" * 24 + "x", "a" * 47 + "é"]:
        fp = fingerprint_video(clip, rid, C)
        assert decode_video(encode_video(fp)).record_id == rid
        seg = VideoSegment.build(str(tmp_path / "vseg"), [fp], C, time.time())
        index = MediaSettledIndex(str(tmp_path), NearDupConfig(), video=C, videos=(seg,))
        assert index.lookup_video(fp) is None  # a replay: never its own duplicate
        assert index.lookup_video(fp._replace(record_id=rid + "-copy"))[1].record_id == rid
    prefix = "https://cdn.example.com/uploads/2026/11/30/user-"  # 48 bytes
    x = decode_video(encode_video(fingerprint_video(clip, prefix + "111", C)))
    y = decode_video(encode_video(fingerprint_video(clip, prefix + "222", C)))
    assert compare_video(y, x, C)[0] == "exact_duplicate" and x.record_id == prefix + "111"


def _publish(root, items: list[tuple[str, str, str, str]], offset: int) -> None:
    """One shard of kept samples ``(id, modality, source, encoded fingerprint)``."""
    from streams.events import OffsetRange

    samples = [{"id": rid, "domain": "media", "modality": mod, "tokens": np.arange(4, dtype=np.int32), "source": src,
                "license": "cc0", "pipeline_version": "p", "language": "", "produced_at": time.time(),
                "lineage": json.dumps({"media_dedup": text})} for rid, mod, src, text in items]
    with LiveStreamWriter(root, writer_id="test", manifest={"vocab_version": "v", "tokenizer_version": "t",
                                                             "pipeline_version": "p"}) as w:
        w.write_shard(samples, domain="media", settled=[OffsetRange(topic="raw.media", partition=0, start=offset,
                                                                   end=offset + len(items))])


@pytest.fixture
def media_root(tmp_path):
    clips = {"x": distinct_video("motion", 31), "y": distinct_video("gradient", 32)}
    vfp = {k: fingerprint_video(v, k, C) for k, v in clips.items()}
    img = fingerprint(ART, "img-x")
    root = tmp_path / "stream"
    _publish(root, [("x", "video", "spam", encode_video(vfp["x"])), ("y", "video", "web", encode_video(vfp["y"])),
                    ("img-x", "image", "spam", encode(img))], 0)
    sync(str(root), NearDupConfig(), video=C)
    index = MediaSettledIndex.load(str(root), NearDupConfig(), C)
    assert index.lookup_video(vfp["x"]._replace(record_id="x2"))[1].record_id == "x" and len(index) == 1
    return root, vfp, img


def _held(root) -> tuple[list[str], int]:
    index = MediaSettledIndex.load(str(root), NearDupConfig(), C)
    return sorted(seg.record_id(i) for seg in index.videos for i in range(len(seg))), len(index)


def test_a_media_purge_leaves_the_snapshot_and_a_rewritten_shard_is_not_refolded(media_root):
    root, vfp, img = media_root
    assert dedup_settled.purge(str(root), ["x", "img-x"]) == 2
    ref = sync(str(root), NearDupConfig(), video=C)  # no new shard: the purge alone makes a generation
    assert ref.generation == 2 and _held(root) == (["y"], 0)
    index = MediaSettledIndex.load(str(root), NearDupConfig(), C)
    assert index.lookup_video(vfp["x"]._replace(record_id="x2")) is None and index.lookup(img._replace(record_id="i2")) is None
    _publish(root, [("y", "video", "web", encode_video(vfp["y"])), ("x", "video", "spam", encode_video(vfp["x"]))], 3)
    sync(str(root), NearDupConfig(), video=C)  # a survivor re-read, and a purged id: neither folded again
    assert _held(root) == (["y"], 0)


def test_a_takedown_rerun_after_a_failed_purge_purges(media_root, monkeypatch):
    import infra.takedown as td

    root, _, _ = media_root

    def busy(*_, **__):
        raise SnapshotBusy("another sync held the lock")

    monkeypatch.setattr(dedup_settled, "purge", busy)
    with pytest.raises(SnapshotBusy):
        td.takedown("spam", str(root))
    monkeypatch.undo()
    report = td.takedown("spam", str(root))  # the operator re-runs it: the samples are already gone
    assert report["samples_removed"] == 0 and report["media_ids_purged"] == 2
    assert len(read_purged(str(root / dedup_settled.DIRNAME))) == 2
    sync(str(root), NearDupConfig(), video=C)
    assert _held(root) == (["y"], 0)


def test_the_media_sync_waits_for_the_snapshot_lock(media_root):
    from beam_jobs.dedup.snapshot import snapshot_lock

    root, _, _ = media_root
    with snapshot_lock(str(root / dedup_settled.DIRNAME), 1.0), pytest.raises(SnapshotBusy):
        sync(str(root), NearDupConfig(), video=C, lock_wait_s=0.2)  # another process is folding
