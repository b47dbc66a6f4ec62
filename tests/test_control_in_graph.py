"""Source control inside the streaming graph (beam_jobs/control_stream.py): controls arriving on the
control stream while the job runs gate the records processed after them.

The graph tests run ``IngestText(streaming=True, controls=...)`` under a two-output TestStream
(records and the control topic's records) on the streaming DirectRunner, and check the real stream
root: samples read by a stock ``StreamingDataset``, settled ranges, the drop log. Each transform
also runs on its own on a TestPipeline with assert_that.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from conftest import stock_ids

from beam_jobs.control import SourceControl
from beam_jobs.control_stream import (
    FOLD_OFFSETS,
    FoldControls,
    GateLive,
    LiveControls,
    ReadControlsXlang,
    VerifyControls,
    _FoldFn,
    _gated,
)
from beam_jobs.ingest import launch_control_state
from beam_jobs.pipeline import IngestConfig, IngestText
from beam_jobs.records import Doc, KafkaCoords
from beam_jobs.sink import SinkConfig
from beam_jobs.sources.kafka import KafkaSourceConfig
from beam_jobs.synthetic import english_doc, raw_record
from streams.events import Control, DeadLetter, RawRecord
from streams.governance import TAKEDOWN_REASON
from streams.guard import CONTROL_MAX_POLL_RECORDS
from streams.mds import settled_ranges
from streams.signing import ControlVerifier, generate_keypair, load_signing_key, sign_control

TOPIC = "raw.text"
RNG = random.Random(5)
TEXTS = [english_doc(RNG) for _ in range(16)]


def _options() -> PipelineOptions:
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    return options


def _config(tmp_path) -> IngestConfig:
    sink = SinkConfig(stream_root=str(tmp_path / "root"), dlq_dir=str(tmp_path / "dlq"),
                      drops_dir=str(tmp_path / "drops"), window_s=1, max_pane=4)
    return IngestConfig(sink=sink, media=False)


def _records(items: list[tuple[int, str]], at: float) -> list[TimestampedValue]:
    """(offset, source) -> the record d<offset> of that source at that offset of raw.text[0]."""
    return [TimestampedValue((KafkaCoords(TOPIC, 0, i), raw_record(f"d{i}", TEXTS[i], source=s)), at) for i, s in items]


def _controls(controls: list[tuple[int, Control]], at: float) -> list[TimestampedValue]:
    return [TimestampedValue((KafkaCoords("control", 0, o), c.to_bytes()), at) for o, c in controls]


def _keys():
    return load_signing_key("sentinel"), load_signing_key("operator")


def _run(config: IngestConfig, stream: TestStream, baseline: SourceControl | None = None) -> None:
    p = beam.Pipeline(options=_options())
    both = p | stream
    live = LiveControls(records=both["control"], baseline=baseline or SourceControl(""),
                        verifier=ControlVerifier.from_env(), shards=2)
    _ = both["records"] | IngestText(config, streaming=True, controls=live)
    p.run().wait_until_finish()


def _drops(tmp_path) -> list[tuple[int, str]]:
    folder = tmp_path / "drops"
    return sorted((json.loads(line)["coords"][2], json.loads(line)["reason"])
                  for f in (folder.iterdir() if folder.exists() else ()) for line in f.read_text().splitlines())


def _settled(root: str) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in settled_ranges(root)]


def _stream() -> TestStream:
    stream = TestStream(output_tags={"records", "control"})
    for tag in ("records", "control"):
        stream = stream.advance_watermark_to(0, tag=tag)
    return stream


def _settle(stream: TestStream, to: float) -> TestStream:
    """Let everything emitted so far reach the gate: watermark and processing time move on."""
    for tag in ("records", "control"):
        stream = stream.advance_watermark_to(to, tag=tag)
    return stream.advance_processing_time(2)


def _finish(stream: TestStream) -> TestStream:
    for tag in ("records", "control"):
        stream = stream.advance_watermark_to(200, tag=tag)
    return stream.advance_processing_time(2).advance_watermark_to_infinity(tag="records") \
        .advance_watermark_to_infinity(tag="control")


def test_a_quarantine_mid_stream_drops_later_records_only_and_forged_controls_are_ignored(tmp_path):
    sentinel, operator = _keys()
    forged = [
        Control(command="quarantine_source", args={"source": "web"}, issued_by=operator.key_id),  # unsigned
        sign_control(Control(command="quarantine_source", args={"source": "web"}),
                     generate_keypair(operator.key_id, "operator")),  # a key not in the keyring
        sign_control(Control(command="resume_source", args={"source": "spam"}), sentinel),  # not permitted
    ]
    quarantine = sign_control(Control(command="quarantine_source", args={"source": "spam"}, reason="t"), sentinel)
    stream = _stream().add_elements(_records([(0, "web"), (1, "spam"), (2, "spam")], at=10), tag="records")
    stream = _settle(stream, 20).add_elements(_controls([(0, forged[0]), (1, quarantine), (2, forged[1]),
                                                         (3, forged[2])], at=21), tag="control")
    stream = _settle(stream, 30).add_elements(_records([(3, "spam"), (4, "web"), (5, "Spam"), (6, "web")], at=31),
                                              tag="records")
    config = _config(tmp_path)
    _run(config, _finish(stream))

    root = config.sink.stream_root
    assert stock_ids(root) == ["d0", "d1", "d2", "d4", "d6"]  # spam before the quarantine kept; web never blocked
    assert _drops(tmp_path) == [(3, "control:source_quarantined"), (5, "control:source_quarantined")]
    assert _settled(root) == [(0, 7)]


def test_a_pause_drops_and_settles_records_as_the_loop_does_and_a_resume_lifts_it(tmp_path):
    sentinel, operator = _keys()
    pause = sign_control(Control(command="pause_source", args={"source": "books"}, reason="t"), sentinel)
    resume = sign_control(Control(command="resume_source", args={"source": "books"}, reason="t"), operator)
    stream = _stream().add_elements(_records([(0, "books"), (1, "web")], at=10), tag="records")
    stream = _settle(stream, 20).add_elements(_controls([(0, pause)], at=21), tag="control")
    stream = _settle(stream, 30).add_elements(_records([(2, "books"), (3, "web"), (4, "books")], at=31), tag="records")
    stream = _settle(stream, 40).add_elements(_controls([(1, resume)], at=41), tag="control")
    stream = _settle(stream, 50).add_elements(_records([(5, "books")], at=51), tag="records")
    config = _config(tmp_path)
    _run(config, _finish(stream))

    root = config.sink.stream_root
    assert stock_ids(root) == ["d0", "d1", "d3", "d5"]
    assert _drops(tmp_path) == [(2, "control:source_paused"), (4, "control:source_paused")]
    assert _settled(root) == [(0, 6)]  # no holes: nothing waits on the topic's retention


def test_the_launch_state_holds_from_the_first_record_and_controls_in_it_are_not_applied_again(tmp_path):
    sentinel, operator = _keys()
    quarantine = sign_control(Control(command="quarantine_source", args={"source": "spam"}), sentinel)
    resume = sign_control(Control(command="resume_source", args={"source": "spam"}), operator)
    baseline = SourceControl("")
    baseline.apply(quarantine)
    baseline.offsets = {"0": 1}  # the launch-time follower read offset 0
    # the first record comes before any control; then the graph replays the topic from its start:
    # offset 0 is skipped (in the baseline), the resume at 1 applies
    stream = _stream().add_elements(_records([(0, "spam")], at=10), tag="records")
    stream = _settle(stream, 20).add_elements(_controls([(0, quarantine), (1, resume)], at=21), tag="control")
    stream = _settle(stream, 30).add_elements(_records([(1, "spam")], at=31), tag="records")
    config = _config(tmp_path)
    config.blocked_sources = dict(baseline.blocked)
    _run(config, _finish(stream), baseline)

    assert stock_ids(config.sink.stream_root) == ["d1"]
    assert _drops(tmp_path) == [(0, "control:source_quarantined")]


# --- each transform on its own -----------------------------------------------------------------

def _pipeline() -> TestPipeline:
    return TestPipeline(runner="FnApiRunner")


def test_verify_controls_passes_only_authentic_ingest_commands():
    sentinel, operator = _keys()
    good = sign_control(Control(command="quarantine_source", args={"source": "a"}), sentinel)
    records = [
        (KafkaCoords("control", 0, 0), good.to_bytes()),
        (KafkaCoords("control", 0, 1), Control(command="quarantine_source", args={"source": "b"}).to_bytes()),
        (KafkaCoords("control", 0, 2), sign_control(Control(command="quarantine_source", args={"source": "c"}),
                                                    generate_keypair(sentinel.key_id, "sentinel")).to_bytes()),
        (KafkaCoords("control", 0, 3), b"\xff not json"),
        (KafkaCoords("control", 0, 4), sign_control(Control(command="rollback", args={"run_id": "r1"}),
                                                    operator).to_bytes()),  # not ingest's
    ]
    with _pipeline() as p:
        out = p | beam.Create(records) | VerifyControls(ControlVerifier.from_env())
        assert_that(out | beam.Map(lambda e: (e[0].offset, e[1].control_id)), equal_to([(0, good.control_id)]))


def test_fold_controls_emits_each_change_to_every_shard_and_ignores_a_redelivered_offset():
    sentinel, operator = _keys()
    log = [
        sign_control(Control(command="quarantine_source", args={"source": "x"}), sentinel),  # in the baseline
        sign_control(Control(command="pause_source", args={"source": "books"}), sentinel),
        sign_control(Control(command="quarantine_source", args={"source": "spam"}), sentinel),
        sign_control(Control(command="resume_source", args={"source": "books"}), operator),
        sign_control(Control(command="pause_source", args={"source": "web"}), sentinel),
    ]
    baseline = SourceControl("")
    baseline.apply(log[0])
    baseline.offsets = {"0": 1}
    elements = [(KafkaCoords("control", 0, i), c) for i, c in enumerate(log)]
    with _pipeline() as p:
        updates = p | beam.Create(elements + elements[2:3]) | FoldControls(baseline, shards=2)  # one redelivered

        def latest(pairs):
            key, values = pairs
            return key, max(values, key=lambda v: v[1][1])[1][0]

        out = updates | beam.GroupByKey() | beam.Map(latest)
        assert_that(out, equal_to([(("books", s), None) for s in (0, 1)] + [(("spam", s), "source_quarantined")
                    for s in (0, 1)] + [(("web", s), "source_paused") for s in (0, 1)]))


class _Cell:
    """A ReadModifyWriteState cell as a runner keeps it: the pickled bytes of the last write."""

    def __init__(self):
        self.stored, self.writes = None, 0

    def read(self):
        return None if self.stored is None else pickle.loads(self.stored)

    def write(self, value):
        self.stored, self.writes = pickle.dumps(value), self.writes + 1


def _fold(fn: _FoldFn, cell: _Cell, offset: int, control: Control) -> list:
    return list(fn.process(("control", (KafkaCoords("control", 0, offset), control)), fold=cell))


def test_the_fold_rejects_a_replay_flood_before_storing_it_and_keeps_bounded_state():
    sentinel, operator = _keys()
    quarantine = sign_control(Control(command="quarantine_source", args={"source": "spam"}), sentinel)
    resume = sign_control(Control(command="resume_source", args={"source": "spam"}, issued_at=quarantine.issued_at + 5),
                          operator)
    fn, cell = _FoldFn(SourceControl(""), shards=2), _Cell()
    fn.setup()
    assert _fold(fn, cell, 0, quarantine) == [(("spam", s), ("update", ("source_quarantined", 1))) for s in (0, 1)]
    assert _fold(fn, cell, 1, resume) == [(("spam", s), ("update", (None, 2))) for s in (0, 1)]
    stored, writes = cell.stored, cell.writes
    for offset in range(2, 2002):  # the captured quarantine, re-published: a new offset each time
        assert _fold(fn, cell, offset, quarantine) == []
    assert _fold(fn, cell, 1, resume) == []  # a redelivered offset
    assert (cell.stored, cell.writes) == (stored, writes)  # nothing stored: the source stays resumed

    # genuine traffic for a long time: the state does not grow with it
    sizes = []
    for i in range(3000):
        command = ("pause_source", "resume_source")[i % 2]
        key = sentinel if command == "pause_source" else operator
        _fold(fn, cell, 2002 + i, sign_control(Control(command=command, args={"source": "books"},
                                                       issued_at=quarantine.issued_at + 60 * (i + 1)), key))
        sizes.append(len(cell.stored))
    assert max(sizes) < 8_000 and sizes[-1] <= sizes[1500] + 64  # bounded (it grew ~400 B a control before)
    st = cell.read()
    assert st["state"].blocked == {} and len(st["folded"]["0"]) <= FOLD_OFFSETS
    # the ids a replay could still act with: spam's two (5 s apart), books' latest only
    assert sorted(s for _, s in st["ids"].values()) == ["books", "spam", "spam"]
    assert st["state"].history == [] and st["state"].seen == {}


def test_rejected_controls_are_counted_and_logged_at_warning_with_their_reason(caplog):
    sentinel, _ = _keys()
    good = sign_control(Control(command="quarantine_source", args={"source": "a"}), sentinel)
    records = [(KafkaCoords("control", 0, 0), good.to_bytes()),
               (KafkaCoords("control", 0, 1), Control(command="quarantine_source", args={"source": "b"}).to_bytes()),
               (KafkaCoords("control", 0, 2), good.to_bytes())]  # an exact replay at a new offset
    p = _pipeline()
    _ = (p | beam.Create(records) | VerifyControls(ControlVerifier.from_env())
         | FoldControls(SourceControl(""), shards=1))
    with caplog.at_level(logging.WARNING, logger="headwater.ingest.control"):
        result = p.run()
        result.wait_until_finish()
    counters = {r.key.metric.name: r.committed for r in result.metrics().query()["counters"]}
    assert counters["controls_rejected_unsigned"] == 1 and counters["controls_rejected_replayed"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "rejected" in r.getMessage()]
    assert any("(unsigned)" in m for m in warned) and any("(replayed)" in m for m in warned)


def test_the_gate_marks_a_copy_and_leaves_its_input_record_alone():
    doc = _doc(0, "spam")
    (out,) = _gated("text", doc, "source_quarantined")
    assert out.dropped == "control:source_quarantined" and out.text == ""
    assert doc.dropped is None and doc.text == "t"


def _doc(i: int, source: str) -> Doc:
    return Doc(coords=KafkaCoords(TOPIC, 0, i), id=f"d{i}", source=source, license="cc", text="t")


def _dead(i: int, source: str | None) -> DeadLetter:
    original = b"{" if source is None else json.dumps({"id": f"x{i}", "source": source}).encode()
    return DeadLetter.of(original, reason="missing_field", stage="validate", record_id=f"x{i}",
                         topic=TOPIC, partition=0, offset=i)


def test_gate_live_applies_the_launch_state_to_text_media_and_dead_letters():
    blocked = {"spam": "source_quarantined", "books": "source_paused", "gone": TAKEDOWN_REASON}
    media = [(KafkaCoords("raw.image", 0, i), RawRecord(id=f"m{i}", modality="image", source=s, license="cc",
                                                                 uri=f"file:///m{i}.png"))
             for i, s in enumerate(["web", "spam", "books"])]
    with _pipeline() as p:
        live = LiveControls(records=None, baseline=SourceControl(""), verifier=ControlVerifier.from_env(), shards=2)
        gated = {
            "controls": p | "NoControls" >> beam.Create([]),
            "text": p | "Text" >> beam.Create([_doc(0, "web"), _doc(1, "Spam"), _doc(2, "books"), _doc(3, "gone")]),
            "dlq": p | "Dead" >> beam.Create([_dead(4, "spam"), _dead(5, "books"), _dead(6, None), _dead(7, "web")]),
            "media": p | "Media" >> beam.Create(media),
        } | GateLive(live, blocked)
        assert_that(gated["text"] | beam.Map(lambda d: (d.id, d.dropped)), equal_to(
            [("d0", None), ("d1", "control:source_quarantined"), ("d2", "control:source_paused"),
             ("d3", f"control:{TAKEDOWN_REASON}")]), label="text")
        assert_that(gated["media"] | beam.Map(lambda m: m[1].id), equal_to(["m0"]), label="media")
        assert_that(gated["outcomes"] | beam.Map(lambda o: (o.coords.offset, o.dropped, o.dead is not None)), equal_to(
            [(4, "control:source_quarantined", False), (5, "control:source_paused", False), (6, None, True),
             (7, None, True), (1, "control:source_quarantined", False), (2, "control:source_paused", False)]),
            label="outcomes")


def test_the_control_topic_consumer_gets_the_sasl_tls_settings(tmp_path, monkeypatch):
    password = tmp_path / "password"
    password.write_text("secret\n")
    for k, v in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                 "SASL_USERNAME": "headwater-ingest", "SASL_PASSWORD_FILE": str(password)}.items():
        monkeypatch.setenv(f"HEADWATER_KAFKA_{k}", v)
    source = KafkaSourceConfig(bootstrap="kafka:9093", topics=["raw.text"], group="headwater-ingest")
    props = ReadControlsXlang(source).consumer_config()
    assert props["security.protocol"] == "SASL_SSL" and props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert 'username="headwater-ingest" password="secret"' in props["sasl.jaas.config"]
    assert props["group.id"] == "headwater-ingest" and props["enable.auto.commit"] == "false"
    assert props["auto.offset.reset"] == "earliest" and props["client.id"] == "headwater-ingest-control"


def test_the_xlang_launch_reads_the_control_topic_into_the_graphs_baseline(fresh_broker, tmp_path):
    from streams.kafka import KafkaSettings, make_producer, publish

    sentinel, _ = _keys()
    producer = make_producer(KafkaSettings(bootstrap=fresh_broker.bootstrap))
    try:
        publish(producer, "control", sign_control(Control(command="quarantine_source", args={"source": "spam"}), sentinel))
        publish(producer, "control", Control(command="quarantine_source", args={"source": "web"}))  # unsigned
    finally:
        producer.close()
    config = _config(tmp_path)
    baseline, _ = launch_control_state(argparse.Namespace(bootstrap=fresh_broker.bootstrap), config)
    assert baseline.blocked == {"spam": "source_quarantined"} == config.blocked_sources
    assert sum(baseline.offsets.values()) == 2  # the graph folds only what comes after these
    assert baseline.path.endswith("control.json") and SourceControl.load(config.sink.stream_root).blocked == baseline.blocked


def test_the_launch_read_reaches_the_end_offsets_or_fails_the_start(fresh_broker, tmp_path):
    from streams.kafka import KafkaSettings, make_producer, publish

    sentinel, _ = _keys()
    producer = make_producer(KafkaSettings(bootstrap=fresh_broker.bootstrap))
    try:  # more than one poll's worth (CONTROL_MAX_POLL_RECORDS), the quarantine last
        for i in range(CONTROL_MAX_POLL_RECORDS * 3):
            publish(producer, "control", sign_control(Control(command="pause_source", args={"source": f"s{i}"}),
                                                      sentinel), flush=False)
        publish(producer, "control", sign_control(Control(command="quarantine_source", args={"source": "spam"}),
                                                  sentinel))
    finally:
        producer.close()
    a = argparse.Namespace(bootstrap=fresh_broker.bootstrap)
    with pytest.raises(SystemExit, match="not read to its end within 0s"):
        launch_control_state(a, _config(tmp_path / "a"), timeout_s=0.0)
    config = _config(tmp_path / "b")
    baseline, _ = launch_control_state(a, config, timeout_s=60.0)
    assert baseline.offsets == {"0": CONTROL_MAX_POLL_RECORDS * 3 + 1}
    assert config.blocked_sources["spam"] == "source_quarantined"


def test_an_object_store_root_keeps_the_control_state_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = SourceControl.load("s3://bucket/stream")
    assert state.path == "" and state.blocked == {}
    state.apply(sign_control(Control(command="pause_source", args={"source": "a"}), _keys()[0]))
    state.save()  # nothing is written anywhere (it used to create ./s3:/bucket/stream/_ingest)
    assert list(tmp_path.iterdir()) == []
