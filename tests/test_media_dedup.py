"""Image near-dup dedup: verified pHash signals, the keyed-state MediaDedup transform, and the
settled index that carries it across micro-batches and restarts."""

import base64
import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.media import MediaConfig, TokenizeMedia, dedup_settled, synth
from beam_jobs.media.dedup_settled import sync
from beam_jobs.media.dedup_transform import MediaDedup, MediaDedupConfig
from beam_jobs.media.lookalikes import distinct_image, generate, near_duplicate, score
from beam_jobs.media.near_dup import FINGERPRINT_META, NearDupConfig, decode, encode, fingerprint
from beam_jobs.records import KafkaCoords
from streams.events import RawRecord
from streams.mds import LiveStreamWriter


def _rec(rid: str, rgb, fmt: str = "PNG") -> RawRecord:
    data = synth.encode_image(rgb, fmt)
    return RawRecord(id=rid, modality="image", source="test", license="cc0", data_b64=base64.b64encode(data).decode())


def test_verified_near_dup_meets_target_on_fixed_seed():
    images = generate(90, seed=11)  # not a tuning seed (1, 3, 7)
    verified = score(images, NearDupConfig())
    phash_only = score(images, NearDupConfig(verify=False, colour_cell=0))
    assert verified.planted >= 30
    assert verified.precision >= 0.99, verified.false_drops
    assert verified.recall >= 0.95, verified.missed
    assert phash_only.precision < verified.precision  # what verification buys on look-alikes


def test_fingerprint_round_trips_and_never_matches_itself():
    fp = fingerprint(synth.procedural_image(5), "img-5", ("raw.image", 0, 9))
    assert decode(encode(fp), fp.coords) == fp
    index_config = NearDupConfig()
    from beam_jobs.media.near_dup import compare

    assert compare(fp, fp, index_config) is None
    assert compare(fp._replace(record_id="other", coords=("raw.image", 0, 10)), fp, index_config)[0] == "exact_duplicate"


def _elements(records):
    return [(KafkaCoords("raw.image", 0, i), r) for i, r in enumerate(records)]


def test_media_dedup_transform_keeps_one_of_each_cluster_and_names_the_original():
    base = distinct_image("procedural", 1)
    gradient = distinct_image("linear_gradient", 2)
    records = [
        _rec("a", base),
        _rec("b", distinct_image("checkerboard", 3)),
        _rec("a-jpeg", near_duplicate(base, "jpeg", 0)),
        _rec("g", gradient),
        _rec("g-crop", near_duplicate(gradient, "crop", 1)),
        _rec("a-again", base),
        RawRecord(id="broken", modality="image", source="test", license="cc0", data_b64=base64.b64encode(b"xx").decode()),
        RawRecord(id="aud", modality="audio", source="test", license="cc0", data_b64="AAAA"),
    ]

    def kept_ids(got):
        ids = sorted(r.id for _, r in got)
        assert ids == ["a", "aud", "b", "broken", "g"], ids
        for _, r in got:
            assert (FINGERPRINT_META in r.meta) == (r.id in {"a", "b", "g"})

    with TestPipeline() as p:
        out = p | beam.Create(_elements(records)) | MediaDedup(MediaDedupConfig())
        assert_that(out["records"], kept_ids, label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d[0].offset, d[1], d[2], d[3])), equal_to([
            (2, "dedup:near_duplicate", "a-jpeg", "a"),
            (4, "dedup:near_duplicate", "g-crop", "g"),
            (5, "dedup:exact_duplicate", "a-again", "a"),
        ]), label="dropped")


def test_a_replayed_record_is_never_its_own_duplicate():
    base = distinct_image("smooth_noise", 7)
    a = _rec("a", base)
    elements = [(KafkaCoords("raw.image", 0, 0), a), (KafkaCoords("raw.image", 0, 0), a),  # a retry
                (KafkaCoords("raw.image", 0, 1), _rec("a", near_duplicate(base, "noise", 2))),  # same id
                (KafkaCoords("raw.image", 0, 2), _rec("copy", base)),
                (KafkaCoords("raw.image", 0, 0), _rec("a-renamed", base))]  # same offset, new id
    with TestPipeline() as p:
        out = p | beam.Create(elements) | MediaDedup(MediaDedupConfig())
        assert_that(out["records"] | beam.Map(lambda e: (e[0].offset, e[1].id)),
                    equal_to([(0, "a"), (0, "a"), (0, "a-renamed")]), label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d[0].offset, d[1], d[3])),
                    equal_to([(1, "dedup:near_duplicate", "a-renamed"), (2, "dedup:exact_duplicate", "a")]),
                    label="dropped")


def test_streaming_event_time_decides_and_late_duplicate_is_dropped():
    """TestStream on the streaming DirectRunner: the earlier event is kept even when it arrives
    second; a near-dup arriving behind the watermark is the one dropped."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    base, other = distinct_image("procedural", 31), distinct_image("stripes", 32)
    first, second = (KafkaCoords("raw.image", 0, 0), _rec("early", base)), (
        KafkaCoords("raw.image", 0, 1), _rec("later", near_duplicate(base, "jpeg", 4)))
    late = (KafkaCoords("raw.image", 0, 2), _rec("late", near_duplicate(base, "resize", 5)))
    stream = (TestStream().add_elements([TimestampedValue(second, 15)])  # the later event arrives first
              .add_elements([TimestampedValue(first, 10), TimestampedValue((KafkaCoords("raw.image", 0, 3),
                                                                           _rec("other", other)), 12)])
              .advance_watermark_to(20).advance_watermark_to(30)  # nothing in between: an empty pane
              .add_elements([TimestampedValue(late, 5)])  # behind the watermark
              .advance_watermark_to_infinity())
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        out = p | stream | MediaDedup(MediaDedupConfig())
        assert_that(out["records"] | beam.Map(lambda e: e[1].id), equal_to(["early", "other"]), label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d[2], d[3])),
                    equal_to([("later", "early"), ("late", "early")]), label="dropped")


@pytest.fixture(scope="module")
def codebooks(tmp_path_factory):
    return synth.train_codebooks(tmp_path_factory.mktemp("codebooks"))


_OUT: dict[str, list] = {}  # the DirectRunner runs in this process: outputs collected here


def _collect(element, name):
    _OUT.setdefault(name, []).append(element)


def _micro_batch(root, records, first_offset, codebooks):
    """One micro-batch as the local runner runs it: sync the settled index (a settlement point),
    dedup + tokenize, then publish the samples in a shard that settles the batch's offsets."""
    from streams.events import OffsetRange

    ref = sync(str(root), NearDupConfig())
    elements = [(KafkaCoords("raw.image", 0, first_offset + i), r) for i, r in enumerate(records)]
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
        w.write_shard(samples, domain="image",
                      settled=[OffsetRange(topic="raw.image", partition=0, start=first_offset,
                                           end=first_offset + len(records))])
    return samples, sorted(dropped)


def test_index_survives_micro_batch_boundary_and_restart(tmp_path, codebooks):
    root = tmp_path / "stream"
    base, other = distinct_image("procedural", 21), distinct_image("radial_gradient", 22)
    samples, dropped = _micro_batch(root, [_rec("first", base), _rec("other", other)], 0, codebooks)
    assert sorted(s["id"] for s in samples) == ["first", "other"] and dropped == []
    assert all("media_dedup" in json.loads(s["lineage"]) for s in samples)
    assert FINGERPRINT_META not in json.dumps([json.loads(s["lineage"]) for s in samples])

    dedup_settled._OPEN.clear()  # a restart: nothing in memory, the snapshot is read from disk
    samples, dropped = _micro_batch(root, [_rec("first-resized", near_duplicate(base, "resize", 3)),
                                           _rec("new", distinct_image("stripes", 23))], 2, codebooks)
    assert [s["id"] for s in samples] == ["new"]
    assert dropped == [("first-resized", "dedup:near_duplicate", "first")]
    index = dedup_settled.MediaSettledIndex.load(str(root), NearDupConfig())
    assert len(index) == 2 and index.nbytes() < 2 * 2_000  # bounded bytes per image
