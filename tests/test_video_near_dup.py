"""Video near-dup dedup: keyframe pHash signatures verified per keyframe, the keyed-state
MediaDedup transform on video records, and the settled index across micro-batches and restarts."""

import base64
import json
import shutil
import subprocess

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.media import MediaConfig, TokenizeMedia, dedup_settled, synth
from beam_jobs.media.dedup_settled import sync
from beam_jobs.media.dedup_transform import MediaDedup, MediaDedupConfig
from beam_jobs.media.near_dup import FINGERPRINT_META, NearDupConfig
from beam_jobs.media.video_lookalikes import distinct_video, generate, near_duplicate, score
from beam_jobs.media.video_near_dup import (
    VIDEO_KEY,
    VideoNearDupConfig,
    VideoNearDupIndex,
    compare_video,
    decode_video,
    encode_video,
    fingerprint_video,
    video_bucket_keys,
)
from beam_jobs.records import KafkaCoords
from streams.events import RawRecord
from streams.mds import LiveStreamWriter

CONFIG = VideoNearDupConfig()


def _fp(data: bytes, rid: str, coords=None):
    return fingerprint_video(data, rid, CONFIG, coords=coords)


def _rec(rid: str, data: bytes) -> RawRecord:
    return RawRecord(id=rid, modality="video", source="test", license="cc0", data_b64=base64.b64encode(data).decode())


@pytest.fixture(scope="module")
def clips():
    """A motion video, its planted near-dups, and distinct look-alikes on the same background."""
    a = distinct_video("motion", 2_000_036)  # seeds 4k..4k+3 share a background; 4k+3 is 4k's path reversed
    return {"a": a, "a-reencode": near_duplicate(a, "reencode", 1), "a-trim": near_duplicate(a, "trim", 2),
            "a-rescale": near_duplicate(a, "rescale", 3), "b": distinct_video("motion", 2_000_038),
            "a-reversed": distinct_video("motion", 2_000_039), "g": distinct_video("gradient", 7)}


def test_fingerprint_round_trips_keys_are_video_only_and_never_matches_itself(clips):
    fp = _fp(clips["a"], "vid-a", ("raw.video", 0, 3))
    assert len(fp.frames) == CONFIG.keyframes and fp.duration > 2.5
    assert decode_video(encode_video(fp), fp.coords) == fp
    assert all(k & VIDEO_KEY for k in video_bucket_keys(fp, CONFIG))
    assert compare_video(fp, fp, CONFIG) is None
    other = fp._replace(record_id="other", coords=("raw.video", 0, 4))
    assert compare_video(other, fp, CONFIG)[0] == "exact_duplicate"


def test_edits_are_near_dups_and_lookalikes_are_not(clips):
    a = _fp(clips["a"], "a")
    for name in ("a-reencode", "a-trim", "a-rescale"):
        hit = compare_video(_fp(clips[name], name), a, CONFIG)
        assert hit is not None and hit[0] == "near_duplicate", name
        assert hit[1]["matched"] >= CONFIG.min_matched
    for name in ("b", "a-reversed", "g"):  # another path / the same path reversed on one background
        assert compare_video(_fp(clips[name], name), a, CONFIG) is None, name
    # Without the local checks, their keyframes pass the image decision in order: a false drop.
    loose = VideoNearDupConfig(min_local_ssim=0, max_cell_colour=1e9)
    for name in ("b", "a-reversed"):
        assert compare_video(_fp(clips[name], name), a, loose) is not None, name


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command")
def test_ffmpeg_cli_copies_are_dropped(tmp_path, clips):
    """Copies made by the ffmpeg command line (not our re-encoder): trim with -ss/-t, rescale and
    re-encode at another bitrate, and a lossless-ish re-mux."""
    src = tmp_path / "a.mp4"
    src.write_bytes(clips["a"])
    a = _fp(clips["a"], "a")
    keep = f"{a.duration - 0.4:.2f}"  # 0.15 s off the start, 0.25 s off the end (of 3-5 s)
    jobs = {"trim_x264": ["-ss", "0.15", "-t", keep, "-c:v", "libx264", "-b:v", "150k"],
            "scale_mpeg4": ["-vf", "scale=160:106", "-c:v", "mpeg4", "-b:v", "300k"]}
    for name, args in jobs.items():
        out = tmp_path / f"{name}.mp4"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), *args, "-pix_fmt", "yuv420p", "-an",
                        str(out)], check=True, timeout=60)
        hit = compare_video(_fp(out.read_bytes(), name), a, CONFIG)
        assert hit is not None and hit[0] == "near_duplicate", (name, hit)


def test_long_video_is_sampled_sparsely_and_still_matches_its_trimmed_copy():
    data = distinct_video("motion", 2_000_036, seconds=30)  # decoded at 96 / 30 s = 3.2 fps, not 8
    fp = _fp(data, "long")
    assert fp.duration > 28
    hit = compare_video(_fp(near_duplicate(data, "trim_rescale", 5), "copy"), fp, CONFIG)
    assert hit is not None and hit[0] == "near_duplicate", hit
    assert compare_video(_fp(distinct_video("motion", 2_000_039, seconds=30), "reversed"), fp, CONFIG) is None


def _quality(n: int, seed: int):
    videos = generate(n, seed=seed)
    return videos, score(videos, CONFIG)


def test_precision_recall_on_planted_near_dups_among_lookalikes():
    videos, s = _quality(24, seed=5)  # not a tuning seed (1, 2)
    assert s.planted >= 10 and len(videos) >= 34
    assert s.precision >= 0.99, s.false_drops
    assert s.recall >= 0.95, s.missed


@pytest.mark.slow
def test_precision_recall_on_a_larger_set():
    _, s = _quality(100, seed=4)
    assert s.planted >= 40
    assert s.precision >= 0.99, s.false_drops
    assert s.recall >= 0.95, s.missed


def test_in_memory_index_keeps_one_per_cluster(clips):
    index = VideoNearDupIndex(CONFIG)
    decisions = {}
    for name in ("a", "b", "a-trim", "a-reversed", "a-rescale", "g"):
        fp = _fp(clips[name], name)
        hit = index.check(fp)
        decisions[name] = hit[1].record_id if hit else None
        if hit is None:
            index.add(fp)
    assert decisions == {"a": None, "b": None, "a-trim": "a", "a-reversed": None, "a-rescale": "a", "g": None}


def _elements(records, topic="raw.video"):
    return [(KafkaCoords(topic, 0, i), r) for i, r in enumerate(records)]


def test_media_dedup_transform_drops_video_near_dups_and_names_the_original(clips):
    image = synth.procedural_image(3)
    records = [
        _rec("a", clips["a"]),
        _rec("b", clips["b"]),
        _rec("a-trim", clips["a-trim"]),
        _rec("a-reversed", clips["a-reversed"]),
        _rec("a-again", clips["a"]),
        _rec("broken", b"not a video"),
        RawRecord(id="img", modality="image", source="test", license="cc0",
                  data_b64=base64.b64encode(synth.encode_image(image)).decode()),
        _rec("a-rescale", clips["a-rescale"]),
    ]

    def kept_ids(got):
        ids = sorted(r.id for _, r in got)
        assert ids == ["a", "a-reversed", "b", "broken", "img"], ids
        for _, r in got:
            assert (FINGERPRINT_META in r.meta) == (r.id != "broken")

    with TestPipeline() as p:
        out = p | beam.Create(_elements(records)) | MediaDedup(MediaDedupConfig())
        assert_that(out["records"], kept_ids, label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d[0].offset, d[1], d[2], d[3])), equal_to([
            (2, "dedup:near_duplicate", "a-trim", "a"),
            (4, "dedup:exact_duplicate", "a-again", "a"),
            (7, "dedup:near_duplicate", "a-rescale", "a"),
        ]), label="dropped")


def test_a_retried_video_is_never_its_own_duplicate(clips):
    a = _rec("a", clips["a"])
    elements = [(KafkaCoords("raw.video", 0, 0), a), (KafkaCoords("raw.video", 0, 0), a),  # a retry
                (KafkaCoords("raw.video", 0, 1), _rec("a", clips["a-reencode"])),  # same id, re-encoded
                (KafkaCoords("raw.video", 0, 2), _rec("copy", clips["a"]))]
    with TestPipeline() as p:
        out = p | beam.Create(elements) | MediaDedup(MediaDedupConfig())
        assert_that(out["records"] | beam.Map(lambda e: (e[0].offset, e[1].id)),
                    equal_to([(0, "a"), (0, "a"), (1, "a")]), label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d[0].offset, d[1], d[3])),
                    equal_to([(2, "dedup:exact_duplicate", "a")]), label="dropped")


@pytest.fixture(scope="module")
def codebooks(tmp_path_factory):
    return synth.train_codebooks(tmp_path_factory.mktemp("codebooks"), n_images=30)


_OUT: dict[str, list] = {}  # the DirectRunner runs in this process: outputs collected here


def _collect(element, name):
    _OUT.setdefault(name, []).append(element)


def _micro_batch(root, records, first_offset, codebooks):
    """One micro-batch as the local runner runs it: sync the settled index (a settlement point),
    dedup + tokenize, then publish the samples in a shard that settles the batch's offsets."""
    from streams.events import OffsetRange

    ref = sync(str(root), NearDupConfig(), video=CONFIG)
    elements = [(KafkaCoords("raw.video", 0, first_offset + i), r) for i, r in enumerate(records)]
    _OUT.clear()
    with TestPipeline() as p:
        out = p | beam.Create(elements) | MediaDedup(MediaDedupConfig(), settled=ref)
        tok = out["records"] | TokenizeMedia(MediaConfig(image_codebooks=codebooks))
        _ = tok.samples | "CollectSamples" >> beam.Map(_collect, "samples")
        _ = out["dropped"] | "CollectDropped" >> beam.Map(_collect, "dropped")
    samples = [e[1] for e in _OUT.get("samples", [])]
    dropped = [(d[2], d[1], d[3]) for d in _OUT.get("dropped", [])]
    with LiveStreamWriter(root, writer_id="test", manifest={"vocab_version": "v", "tokenizer_version": "t",
                                                             "pipeline_version": "p"}) as w:
        w.write_shard(samples, domain="video",
                      settled=[OffsetRange(topic="raw.video", partition=0, start=first_offset,
                                           end=first_offset + len(records))])
    return samples, sorted(dropped)


def test_video_index_survives_micro_batch_boundary_and_restart(tmp_path, clips, codebooks):
    root = tmp_path / "stream"
    samples, dropped = _micro_batch(root, [_rec("first", clips["a"]), _rec("other", clips["b"])], 0, codebooks)
    assert sorted(s["id"] for s in samples) == ["first", "other"] and dropped == []
    assert all(json.loads(s["lineage"])["media_dedup"].startswith("V2:") for s in samples)

    dedup_settled._OPEN.clear()  # a restart: nothing in memory, the snapshot is read from disk
    samples, dropped = _micro_batch(root, [_rec("first-trimmed", clips["a-trim"]), _rec("new", clips["g"])], 2,
                                    codebooks)
    assert [s["id"] for s in samples] == ["new"]
    assert dropped == [("first-trimmed", "dedup:near_duplicate", "first")]
    sync(str(root), NearDupConfig(), video=CONFIG)  # folds the second shard
    index = dedup_settled.MediaSettledIndex.load(str(root), NearDupConfig(), CONFIG)
    assert len(index) == 0 and sum(len(s) for s in index.videos) == 3
    assert index.lookup_video(_fp(clips["a"], "first")) is None  # a replay of "first": never itself
    assert index.lookup_video(_fp(clips["a"], "elsewhere"))[1].record_id == "first"
    per_video = sum(s.nbytes() for s in index.videos) / 3
    assert per_video < 12_000, per_video  # K=8 keyframes of ~1.1 KB + ids and key tables
    assert np.all(np.diff(index.videos[0].keys.astype(np.float64)) >= 0)
