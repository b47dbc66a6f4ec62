"""Streaming ingest on a real broker: per-source data metrics (metrics.ingest + RUN/ingest/metrics.jsonl)
and the control topic (quarantine_source / pause_source / resume_source, persisted across restarts):
signed controls are applied, forged/replayed/superseded ones are not (and raise control.rejected)."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
from kafka import TopicPartition

from beam_jobs.control import ControlFollower, SourceControl
from beam_jobs.ingest import run
from beam_jobs.synthetic import english_doc, raw_record
from evaluators.alerts.rules import load_rules
from infra.control_cli import main as control_cli
from infra.run_dir import RunDir
from streams.events import Alert, Control, MetricsEvent, decode_event
from streams.kafka import (
    KafkaSettings,
    make_consumer,
    make_producer,
    poll_records,
    publish,
)
from streams.signing import (
    ControlRejected,
    ControlVerifier,
    generate_keypair,
    load_signing_key,
    sign_control,
)

sys.path.append(str(Path(__file__).resolve().parent / "helpers"))
from kafka_topics import create_topic

RULES = "infra/alerts/rules.toml"


def stream_samples(root: str) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=root, batch_size=1, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def _produce(bootstrap: str, topic: str, values: list[bytes], controls: list[Control] = ()) -> None:
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    try:
        for v in values:
            producer.send(topic, value=v)
        producer.flush()
        for c in controls:
            publish(producer, "control", c)
    finally:
        producer.close()


def _metrics_events(bootstrap: str, since: dict, topic: str = "metrics.ingest") -> list[MetricsEvent]:
    tps = [TopicPartition(topic, p) for p in sorted(since)]
    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=tps)
    try:
        for tp in tps:
            consumer.seek(tp, since[tp.partition])
        return [decode_event(r.value) for r in poll_records(consumer, timeout_s=3)]
    finally:
        consumer.close()


def _metrics_ends(bootstrap: str, topic: str = "metrics.ingest") -> dict[int, int]:
    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[])
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _args(bootstrap: str, topic: str, tmp_path) -> list[str]:
    return ["--bootstrap", bootstrap, "--topics", topic, "--stream-root", str(tmp_path / "stream"),
            "--run-dir", str(tmp_path / "run" / "ingest"), "--until-caught-up", "--window-s", "1",
            "--min-doc-words", "50", "--no-media"]


def test_streaming_source_metrics_and_control(fresh_broker, tmp_path):
    rng = random.Random(7)
    bootstrap = fresh_broker.bootstrap
    topic = create_topic(bootstrap, "test.ctl", 1)
    web = [english_doc(rng) for _ in range(4)]
    batch1 = (
        [raw_record(f"w{i}", t, source="web") for i, t in enumerate(web)]
        + [raw_record("w0-dup", web[0], source="web"), raw_record("w1-dup", web[1], source="web")]
        + [raw_record(f"m{i}", english_doc(rng) + f" Mail me at person{i}@example.com today.", source="mail")
           for i in range(3)]
        + [raw_record(f"s{i}", english_doc(rng), source="spam") for i in range(2)]
        + [raw_record(f"b{i}", english_doc(rng), source="books") for i in range(2)]
    )
    ends, alert_ends = _metrics_ends(bootstrap), _metrics_ends(bootstrap, "alerts")
    sentinel, operator = load_signing_key("sentinel"), load_signing_key("operator")
    quarantine_spam = sign_control(Control(command="quarantine_source", args={"source": "spam"}, reason="t"), sentinel)
    forged = [Control(command="quarantine_source", args={"source": "web"}, issued_by=operator.key_id),  # unsigned
              sign_control(Control(command="quarantine_source", args={"source": "web"}),
                           generate_keypair(operator.key_id, "operator")),  # a key not in the keyring
              sign_control(Control(command="resume_source", args={"source": "spam"}), sentinel)]  # not permitted
    _produce(bootstrap, topic, batch1, [
        quarantine_spam,
        sign_control(Control(command="pause_source", args={"source": "books"}, reason="test"), sentinel),
        sign_control(Control(command="rollback", args={"target": "last_good", "run_id": "other"}), operator),
        *forged,
    ])
    summary = run(_args(bootstrap, topic, tmp_path))
    ids = {s["id"] for s in stream_samples(str(tmp_path / "stream"))}
    assert ids == {"w0", "w1", "w2", "w3", "m0", "m1", "m2"}  # the forged quarantine of web was ignored
    assert summary["stages"]["control"] == {"in": 13, "out": 9, "drop_source_quarantined": 2, "drop_source_paused": 2}
    rejected = [e for e in _metrics_events(bootstrap, alert_ends, "alerts")
                if isinstance(e, Alert) and e.rule == "control.rejected"]
    assert sorted(a.evidence["reason"] for a in rejected) == ["bad_signature", "not_permitted", "unsigned"]
    assert {a.evidence["consumer"] for a in rejected} == {"ingest"} and {a.severity for a in rejected} == {"critical"}

    # per-source MetricsEvents, as the ingest rules of rules.toml read them
    events = [e for e in _metrics_events(bootstrap, ends) if isinstance(e, MetricsEvent)]
    per_source = {e.labels["source"]: e for e in events if "source" in e.labels}
    assert set(per_source) == {"web", "mail", "spam", "books"}
    assert per_source["web"].values["dup_rate"] == 2 / 6 and per_source["web"].values["pii_rate"] == 0.0
    assert per_source["mail"].values["pii_rate"] == 1.0 and per_source["mail"].values["dup_rate"] == 0.0
    assert any("source" not in e.labels and "records_in" in e.values for e in events), "job-level event missing"
    for rule in load_rules(RULES):
        if rule.name in ("dup_rate_spike", "pii_rate_spike"):
            assert rule.component == "ingest" == per_source["web"].component
            assert rule.metric in per_source["web"].values and set(rule.group_by) <= set(per_source["web"].labels)

    # live snapshots in the run directory, readable by `headwater status` / `report`
    snaps = RunDir(tmp_path / "run").ingest_snapshots()
    assert snaps, "no ingest/metrics.jsonl snapshot"
    last = snaps[-1]
    assert last["stages"]["control"]["drop"] == {"source_quarantined": 2, "source_paused": 2}
    assert last["stages"]["validate"]["in"] == 13 and last["shards_published"] >= 1
    assert last["dup_rate"] > 0 and last["pii_rate"] > 0 and last["languages"] == {"en": 7}
    assert last["modalities"] == {"text": 13} and isinstance(last["time"], float)
    # the control consumer's guard counters are exported (review finding 5): at least our 6 controls
    assert last["consumer_guard"].get("decoded", 0) >= 6 and last["consumer_guard"].get("handler_errors", 0) == 0
    job = next(e for e in events if "source" not in e.labels and "records_in" in e.values)
    assert job.values["consumer_guard.decoded"] >= 6

    # restart: state persisted; resume books, quarantine of spam still holds
    state = SourceControl.load(str(tmp_path / "stream"))
    assert state.blocked == {"spam": "source_quarantined", "books": "source_paused"}
    assert [h["command"] for h in state.history] == ["quarantine_source", "pause_source"]
    batch2 = [raw_record("b9", english_doc(rng), source="books"), raw_record("s9", english_doc(rng), source="spam"),
              raw_record("m9", english_doc(rng), source="mail")]
    # an operator's signed resume of spam issued before its quarantine (replayed now) is superseded,
    # and the quarantine itself replayed is rejected: neither undoes nor repeats anything
    old_resume = sign_control(Control(command="resume_source", args={"source": "spam"},
                                      issued_at=quarantine_spam.issued_at - 60), operator)
    _produce(bootstrap, topic, batch2, [old_resume, quarantine_spam])
    alert_ends = _metrics_ends(bootstrap, "alerts")
    for argv in (["resume-source", "--source", "books"], ["quarantine-source", "--source", "mail"]):
        assert control_cli([*argv, "--bootstrap", bootstrap, "--reason", "operator test"]) == 0
    run(_args(bootstrap, topic, tmp_path))
    ids = {s["id"] for s in stream_samples(str(tmp_path / "stream"))}
    assert "b9" in ids and "s9" not in ids and "m9" not in ids and not {"b0", "b1", "s0", "s1"} & ids
    state = SourceControl.load(str(tmp_path / "stream"))
    assert state.blocked == {"spam": "source_quarantined", "mail": "source_quarantined"}
    assert [h["command"] for h in state.history] == ["quarantine_source", "pause_source", "resume_source",
                                                     "resume_source", "quarantine_source"]
    assert state.history[2]["superseded_by"] == quarantine_spam.control_id
    assert {h["issued_by"] for h in state.history[3:]} == {operator.key_id}
    rejected = [e for e in _metrics_events(bootstrap, alert_ends, "alerts")
                if isinstance(e, Alert) and e.rule == "control.rejected"]
    assert [(a.evidence["reason"], a.evidence["control_id"]) for a in rejected] == [
        ("replayed", quarantine_spam.control_id)]
    assert len(RunDir(tmp_path / "run").ingest_snapshots()) == len(snaps) + 1
    drops = "".join(p.read_text() for p in (tmp_path / "run" / "ingest" / "drops").glob("*.jsonl"))
    reasons = [json.loads(line)["reason"] for line in drops.splitlines()]
    assert reasons.count("control:source_quarantined") == 4 and reasons.count("control:source_paused") == 2


def test_source_control_state_rules():
    state = SourceControl(path="/nonexistent/control.json")
    assert state.apply(Control(command="quarantine_source", args={"source": "a"}))
    assert not state.apply(Control(command="pause_source", args={"source": "a"}))  # never weakens a quarantine
    assert state.blocked == {"a": "source_quarantined"}
    assert not state.apply(Control(command="pause_source", args={}))  # no source: ignored
    assert not state.apply(Control(command="pause_domain", args={"domain": "x"}))  # not ingest's
    assert state.apply(Control(command="resume_source", args={"source": "a"})) and state.blocked == {}


def test_source_control_last_writer_wins_and_replays():
    state = SourceControl(path="/nonexistent/control.json")
    quarantine = Control(command="quarantine_source", args={"source": "a"}, issued_at=100.0)
    assert state.apply(quarantine)
    with pytest.raises(ControlRejected, match="replayed"):
        state.apply(quarantine)
    assert not state.apply(Control(command="resume_source", args={"source": "a"}, issued_at=69.0))  # > 30 s older
    assert state.blocked == {"a": "source_quarantined"}
    later = Control(command="resume_source", args={"source": "a"}, issued_at=101.0)
    assert state.apply(later) and state.blocked == {}
    # the log is applied in offset order: within the skew allowance (30 s) clocks do not matter
    fresh = SourceControl(path="/nonexistent/control.json")
    for c in (later, dataclasses.replace(quarantine, control_id="q2")):
        fresh.apply(c)
    assert fresh.blocked == {"a": "source_quarantined"}


def test_ingest_applies_in_offset_order_within_the_clock_skew_allowance():
    """An operator's resume sent after a sentinel quarantine wins even if the sentinel's clock runs
    25 s ahead; only a command issued more than the skew allowance before the latest applied one
    for its source (an old one replayed) is superseded."""
    t = 1_000_000.0
    state = SourceControl(path="/nonexistent/control.json", max_skew_s=30.0)
    assert state.apply(Control(command="quarantine_source", args={"source": "S"}, issued_at=t + 25))  # clock +25 s
    assert state.apply(Control(command="resume_source", args={"source": "S"}, issued_at=t + 10))  # sent later
    assert state.blocked == {}
    assert state.since["s"][0] == t + 25  # kept (by canonical name) for the superseded check
    old = Control(command="quarantine_source", args={"source": "S"}, issued_at=t - 100)
    assert not state.apply(old) and state.blocked == {}
    assert state.history[-1]["superseded_by"] and not state.history[-1]["changed"]


def test_a_flood_of_forged_controls_raises_one_alert_per_reason_and_short_log_lines(broker, tmp_path, caplog):
    bootstrap = broker.bootstrap
    topic = create_topic(bootstrap, "test.ctl", 1)
    operator = load_signing_key("operator")
    evil = "x\nERROR forged log line " + "y" * 5000
    forged = [Control(command="quarantine_source", args={"source": "web"}, control_id=f"{evil}-{i}",
                      issued_by=operator.key_id) for i in range(40)]  # unsigned, each with its own id
    forged += [sign_control(Control(command="quarantine_source", args={"source": "web"}, control_id=f"f{i}"),
                            generate_keypair(operator.key_id, "operator")) for i in range(20)]  # foreign key
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    try:
        for c in forged:
            publish(producer, topic, c)
        producer.flush()
    finally:
        producer.close()
    alert_ends = _metrics_ends(bootstrap, "alerts")
    follower = ControlFollower(bootstrap, SourceControl.load(str(tmp_path)), ControlVerifier.from_env(), topic=topic)
    try:
        with caplog.at_level("ERROR", logger="headwater.ingest.control"):
            while follower.poll(timeout_s=2.0):
                pass
    finally:
        follower.close()
    assert follower.state.blocked == {}
    rejected = [e for e in _metrics_events(bootstrap, alert_ends, "alerts")
                if isinstance(e, Alert) and e.rule == "control.rejected"]
    assert sorted(a.evidence["reason"] for a in rejected) == ["bad_signature", "unsigned"]
    assert all(a.dedup_key.endswith(a.evidence["reason"]) for a in rejected)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 60 and all("\n" not in m and len(m) < 600 for m in lines)


def test_streaming_ingest_refuses_to_start_without_a_keyring(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADWATER_KEYRING_FILE")
    with pytest.raises(SystemExit, match="HEADWATER_KEYRING_FILE"):
        run(_args("127.0.0.1:1", "raw.text", tmp_path))


def test_a_transient_alert_publish_error_keeps_the_offset_and_loses_nothing(broker, tmp_path):
    """Issue 14 review finding 1: the follower stored a record's offset before handling it, and the
    guard dead-lettered a broker timeout as the record's error: the rejection alert was lost. Now
    the record is redelivered and its offset stored only once handled."""
    from flaky import FlakyProducer

    bootstrap = broker.bootstrap
    topic = create_topic(bootstrap, "test.ctl", 1)
    operator = load_signing_key("operator")
    forged = Control(command="quarantine_source", args={"source": "web"}, issued_by=operator.key_id)  # unsigned
    valid = sign_control(Control(command="quarantine_source", args={"source": "spam"}, reason="t"), operator)
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    try:
        for c in (forged, valid):
            publish(producer, topic, c)
    finally:
        producer.close()
    alert_ends = _metrics_ends(bootstrap, "alerts")
    follower = ControlFollower(bootstrap, SourceControl.load(str(tmp_path)), ControlVerifier.from_env(), topic=topic)
    follower.producer = FlakyProducer(follower.producer, lost={1})  # the rejection alert's first send
    try:
        follower.poll(timeout_s=5.0)
        assert follower.state.offsets.get("0", 0) == 0  # the forged control was not handled yet
        while follower.poll(timeout_s=2.0):
            pass
    finally:
        follower.close()
    assert follower.state.blocked == {"spam": "source_quarantined"}
    assert follower.state.offsets == {"0": 2}
    assert follower.guard.counts["redelivered"] == 1 and follower.guard.counts["handler_errors"] == 0
    rejected = [e for e in _metrics_events(bootstrap, alert_ends, "alerts")
                if isinstance(e, Alert) and e.rule == "control.rejected"]
    assert [a.evidence["reason"] for a in rejected] == ["unsigned"]
