"""TokenizeMedia / MediaHealth on the Beam DirectRunner with TestPipeline + assert_that."""

import base64
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.media import (
    CodebookHealth,
    HealthThresholds,
    MediaConfig,
    MediaHealth,
    TokenizeMedia,
    synth,
)
from beam_jobs.media.encodec_tokenizer import EncodecTokenizer
from beam_jobs.media.uri import UriPolicy
from beam_jobs.records import KafkaCoords
from streams.events import Alert, DeadLetter, MetricsEvent, RawRecord
from streams.vocab import Vocab


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    art = synth.train_codebooks(root / "cb")
    (root / "files").mkdir()
    (root / "files" / "ok.png").write_bytes(synth.encode_image(synth.procedural_image(42)))
    return MediaConfig(
        image_codebooks=art,
        encodec=EncodecTokenizer.Config(bandwidth=1.5, threads=1),
        uri=UriPolicy(allowed_schemes=("file",), allowed_prefixes=(f"file://{root}/files/",)),
    ), root


def _rec(rid: str, modality: str, data: bytes | None = None, **kw) -> RawRecord:
    if data is not None:
        kw["data_b64"] = base64.b64encode(data).decode()
    return RawRecord(id=rid, modality=modality, source="test", license="cc0", **kw)


def test_tokenize_media_mixed_batch(config):
    cfg, root = config
    img = synth.procedural_image(1, (128, 128))
    records = [
        _rec("img", "image", synth.encode_image(img), meta={"caption": "alt text"}),
        _rec("img-dup", "image", synth.encode_image(img, "JPEG", quality=60)),
        _rec("img-uri", "image", uri=f"file://{root}/files/ok.png"),
        _rec("passwd", "image", uri="file:///etc/passwd"),
        _rec("bomb", "image", synth.encode_image(np.zeros((10000, 10000), bool))),
        _rec("broken", "image", synth.encode_image(synth.procedural_image(3))[:900]),
        _rec("aud", "audio", synth.encode_audio(synth.speechlike(0.8), fmt="ogg")),
        _rec("quiet", "audio", synth.encode_audio(np.zeros(24_000, np.float32))),
        _rec("vid", "video", synth.encode_video([(1.0, 5), (1.0, 6)])),
    ]
    elements = [(KafkaCoords("raw.media", 0, i), r) for i, r in enumerate(records)]
    vocab = Vocab.default()
    opens = {"image": vocab.special("<img>"), "audio": vocab.special("<aud>"), "video": vocab.special("<vid>")}

    def check_samples(got):
        ids = sorted(s["id"] for _, s in got)
        assert ids == ["aud", "img", "img-uri", "vid"], ids
        for coords, s in got:
            assert isinstance(coords, KafkaCoords)
            t = s["tokens"]
            assert t.dtype == np.int32 and 0 <= t.min() and t.max() < vocab.size
            assert opens[s["modality"]] in t.tolist()
            assert set(s) == {"id", "domain", "modality", "tokens", "source", "license", "pipeline_version",
                              "language", "produced_at", "lineage"}
            assert json.loads(s["lineage"])["source_id"] == s["id"]

    def check_dlq(got):
        assert all(isinstance(d, DeadLetter) for d in got)
        assert sorted((d.record_id, d.stage, d.reason, d.offset) for d in got) == [
            ("bomb", "media_image", "too_many_pixels", 4), ("broken", "media_image", "corrupt", 5),
            ("passwd", "media_read", "uri_not_allowed", 3)]
        assert RawRecord.from_json(next(d for d in got if d.record_id == "bomb").original()).id == "bomb"

    with TestPipeline() as p:
        out = p | beam.Create(elements) | TokenizeMedia(cfg, max_batch_size=16)
        assert_that(out.samples, check_samples, label="samples")
        assert_that(out.dlq, check_dlq, label="dlq")
        assert_that(out.dropped | beam.Map(lambda e: (e[0].offset, e[1])),
                    equal_to([(1, "dedup:near_duplicate"), (7, "audio:silence")]), label="dropped")
        health = out.health | MediaHealth("test", HealthThresholds(min_codes_seen=10**9))
        assert_that(health | beam.Map(lambda e: (type(e).__name__, e.values["media/samples"], "codebook/image/0/utilization" in e.values)),
                    equal_to([("MetricsEvent", 4.0, True)]), label="health")


def test_health_alerts_on_collapse():
    h = CodebookHealth(codebook_size=1024)
    rng = np.random.default_rng(0)
    h.add_codes("image", np.stack([rng.integers(0, 1024, 4096), np.full(4096, 7)]))  # level 1 collapsed
    h.add_sample(tokens=8192, media_seconds=0.0, busy_seconds=0.5)
    metrics, alerts = h.report(stream="s", thresholds=HealthThresholds(min_utilization=0.2))
    assert metrics.values["codebook/image/0/utilization"] > 0.9 and metrics.values["codebook/image/1/utilization"] < 0.01
    assert metrics.values["codebook/image/1/perplexity"] == pytest.approx(1.0)
    assert metrics.values["codebook/image/0/perplexity"] > 800 and metrics.values["media/tokens_per_s"] == 16384
    assert [(a.rule, a.evidence["codes_seen"]) for a in alerts] == [("codebook_collapse", 4096)]
    assert isinstance(MetricsEvent.from_json(metrics.to_json()), MetricsEvent) and Alert.from_json(alerts[0].to_json())


def test_media_health_transform_emits_alert():
    rng = np.random.default_rng(1)
    parts = []
    for _ in range(3):
        h = CodebookHealth(codebook_size=1024)
        h.add_codes("audio", np.stack([rng.integers(0, 1024, 1000), np.zeros(1000, int)]))
        h.add_sample(tokens=2000, media_seconds=1.0, busy_seconds=0.1)
        parts.append(h)
    with TestPipeline() as p:
        events = p | beam.Create(parts) | MediaHealth("s", HealthThresholds(min_codes_seen=2048))
        assert_that(events | beam.Map(lambda e: e.KIND if isinstance(e, MetricsEvent) else (e.KIND, e.dedup_key)),
                    equal_to(["MetricsEvent", ("Alert", "codebook_collapse/s/audio/1")]))
