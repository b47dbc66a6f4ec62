"""Issue 5 "done when": `headwater ingest --input mixed.jsonl` with text+audio+image+video and trained
image codebooks -> one live stream read by the stock StreamingDataset, samples decode back to
modality spans with valid vocab ids; discretization health reaches metrics.jsonl, the metrics
topic (codebook_usage per modality/level) and the alerts topic (collapse, with its action)."""

from __future__ import annotations

import base64
import json
import random

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from kafka import TopicPartition

from beam_jobs.media import CodebookHealth, synth
from beam_jobs.media_hook import HealthConfig, ReportHealthFn
from beam_jobs.synthetic import english_doc, raw_record
from evaluators.alerts.rules import AlertEngine, load_rules
from evaluators.rollback import RollbackPolicy
from infra.cli import main as headwater
from infra.run_dir import RunDir
from streams.events import Alert, CheckpointSaved, MetricsEvent, RawRecord, decode_event
from streams.kafka import KafkaSettings, make_consumer, poll_records
from streams.mds import read_sidecar
from streams.vocab import Vocab

MEDIA_OPEN = {"<img>": "image", "<aud>": "audio", "<vid>": "video"}


def _media(rid: str, modality: str, data: bytes, **meta) -> bytes:
    return RawRecord(id=rid, modality=modality, source="synth", license="cc0",
                     data_b64=base64.b64encode(data).decode(), meta=meta).to_bytes()


def _spans(vocab: Vocab, ids: np.ndarray) -> list[tuple[str, set[tuple[str, int]]]]:
    """[(open special, {(modality, level)})] in order; fails on an id outside the vocab or a media
    id outside a span, or a span holding ids of another modality (video may nest <aud>/<seg>)."""
    specials = {v: k for k, v in vocab.specials.items()}
    out, stack = [], []
    for i in map(int, ids):
        assert 0 <= i < vocab.size, i
        name = specials.get(i)
        if name in MEDIA_OPEN:
            out.append((name, set()))
            stack.append(name)
        elif name in ("</img>", "</aud>", "</vid>"):
            assert stack and stack.pop() == "<" + name[2:], name
        elif name is None:
            kind, level = vocab.locate(i)
            if level is not None:
                assert stack, f"media id {i} outside a span"
                assert kind == MEDIA_OPEN[stack[-1]], (kind, stack)
                out[-1][1].add((kind, level))
    assert not stack, stack
    return out


def test_headwater_ingest_mixed_modalities(tmp_path):
    rng = random.Random(3)
    images = tmp_path / "train_images"
    images.mkdir()
    for i in range(24):
        (images / f"{i}.png").write_bytes(synth.encode_image(synth.procedural_image(500 + i)))
    assert headwater(["discretizer", "train", "--modality", "image", "--input", str(images), "--out",
                      str(tmp_path / "cb"), "--levels", "4", "--nbits", "6", "--iters", "8"]) == 0
    texts = {f"t{i}": english_doc(rng) for i in range(2)}
    lines = [raw_record(k, v) for k, v in texts.items()] + [
        _media("a1", "audio", synth.encode_audio(synth.speechlike(1.0, seed=1))),
        _media("i1", "image", synth.encode_image(synth.procedural_image(1)), caption="a procedural picture"),
        _media("i2", "image", synth.encode_image(synth.procedural_image(2), "JPEG", quality=90)),
        _media("i1-dup", "image", synth.encode_image(synth.procedural_image(1), "JPEG", quality=85)),
        _media("v1", "video", synth.encode_video([(1.0, 4), (1.0, 5)], audio=synth.speechlike(2.0, seed=2))),
        _media("bad", "image", b"not an image"),
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    root, run_dir = tmp_path / "run" / "stream", tmp_path / "run" / "ingest"
    assert headwater(["ingest", "--input", str(src), "--stream-root", str(root), "--run-dir", str(run_dir),
                      "--image-codebooks", str(tmp_path / "cb"), "--audio-bandwidth", "1.5",
                      "--min-doc-words", "50"]) == 0

    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(root), batch_size=1, shuffle=False)
    got = {row["id"]: row for row in (ds[i] for i in range(len(ds)))}
    assert set(got) == {"t0", "t1", "a1", "i1", "i2", "v1"}  # near-dup i1-dup dropped, bad dead-lettered
    vocab = Vocab.default()
    for k, text in texts.items():
        assert vocab.decode([int(t) for t in got[k]["tokens"][:-1]]) == text and got[k]["modality"] == "text"
    assert _spans(vocab, got["a1"]["tokens"]) == [("<aud>", {("audio", 0), ("audio", 1)})]
    image_levels = {("image", lv) for lv in range(4)}
    assert _spans(vocab, got["i1"]["tokens"]) == [("<img>", image_levels)]
    caption = vocab.encode("a procedural picture")
    assert got["i1"]["tokens"][: len(caption)].tolist() == caption  # caption before the media
    vid = _spans(vocab, got["v1"]["tokens"])
    assert vid[0] == ("<vid>", {("video", lv) for lv in range(4)}) and {k for k, _ in vid[1:]} == {"<aud>"}
    assert {got[k]["domain"] for k in ("a1", "i1", "v1")} == {"audio", "image", "video"}

    manifests = {json.dumps(e["manifest"], sort_keys=True) for e in read_sidecar(str(root))["shards"].values()}
    assert len(manifests) == 1
    manifest = json.loads(manifests.pop())
    art = next((tmp_path / "cb").iterdir()).name
    assert art in manifest["discretizer_version"] and "encodec_24khz-1.5kbps" in manifest["discretizer_version"]
    dead = [json.loads(line) for p in (run_dir / "dlq").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [d["record_id"] for d in dead] == ["bad"]
    drops = [json.loads(line) for p in (run_dir / "drops").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [(d["id"], d["reason"], d["dup_of"]) for d in drops] == [("i1-dup", "dedup:near_duplicate", "i1")]

    (snap,) = RunDir(tmp_path / "run").ingest_snapshots()
    assert set(snap["codebook_usage"]) == {f"image/{lv}" for lv in range(4)} | {f"video/{lv}" for lv in range(4)} | {
        "audio/0", "audio/1"}
    assert all(0 < v <= 1 for v in snap["codebook_usage"].values())
    assert snap["modalities"] == {"text": 2, "audio": 1, "image": 4, "video": 1}
    assert any(k.startswith("dedup") for k in snap["stages"]["media"]["drop"]), snap["stages"]["media"]


def test_health_reaches_metrics_and_alerts_topics(broker):
    healthy = CodebookHealth(codebook_size=64)
    healthy.add_codes("image", np.tile(np.arange(64), (2, 40)), domain="pictures")
    collapsed = CodebookHealth(codebook_size=64)
    collapsed.add_codes("audio", np.zeros((2, 3000), np.int64), domain="speech")
    stream = f"test-health-{np.random.default_rng().integers(1 << 30)}"
    config = HealthConfig(stream=stream, bootstrap=broker.bootstrap, min_codes_seen=1000)
    with TestPipeline() as p:
        _ = p | beam.Create([healthy.merge(collapsed)]) | beam.ParDo(ReportHealthFn(config))

    consumer = make_consumer(KafkaSettings(bootstrap=broker.bootstrap), assign=[])
    tps = [TopicPartition(t, q) for t in ("metrics.ingest", "alerts") for q in sorted(consumer.partitions_for_topic(t))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    events = [decode_event(r.value) for r in poll_records(consumer, timeout_s=4)]
    consumer.close()
    usage = {(e.labels["modality"], e.labels["level"]): e for e in events
             if isinstance(e, MetricsEvent) and e.labels.get("stream") == stream}
    assert set(usage) == {("image", "0"), ("image", "1"), ("audio", "0"), ("audio", "1")}
    assert usage[("image", "0")].values["codebook_usage"] == 1.0
    assert usage[("audio", "1")].values["codebook_usage"] == 1 / 64
    alerts = [e for e in events if isinstance(e, Alert) and e.source == f"media/{stream}"]
    assert sorted(a.evidence["labels"]["level"] for a in alerts) == ["0", "1"]

    # the sentinel's rule matches the published usage events, and the alert's action is acted on
    engine = AlertEngine([r for r in load_rules("infra/alerts/rules.toml") if r.name == "codebook_collapse"])
    fired = [a for e in usage.values() for a in engine.observe_metrics(e, producer="ingest")]
    assert sorted(a.evidence["labels"]["modality"] for a in fired) == ["audio", "audio"]
    assert {a.evidence["action"] for a in alerts} == {fired[0].evidence["action"]} == {"pause_domain"}
    # the sentinel acts on its own rule's alert with the rule's action (the media alert itself only pages)
    # a data-side pause names each run the policy knows of (trainer commands always name their run)
    policy = RollbackPolicy(issued_by="pytest")
    assert "no run known" in policy.decide(fired[0], "pause_domain").skipped
    for run in ("r2", "r1"):
        policy.observe(CheckpointSaved(run_id=run, path=f"/{run}/step-1", step=1, tokens=1, vocab_version="v"))
    decision = policy.decide(fired[0], "pause_domain")
    assert [(c.command, c.args) for c in decision.controls] == [
        ("pause_domain", {"domain": "speech", "run_id": "r1"}), ("pause_domain", {"domain": "speech", "run_id": "r2"})]
