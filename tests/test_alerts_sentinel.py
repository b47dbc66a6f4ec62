"""The sentinel end to end on a private broker: metrics spike -> rule alert -> signed webhook +
quarantine Controls; evaluator regression alert -> rollback to last good."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from test_alerts_hooks import SECRET, Receiver
from test_eval_service import read_topic

from evaluators.ledger import TopicFollower
from evaluators.lineage import LineageLog
from evaluators.sentinel import Sentinel
from streams.events import Alert, CheckpointSaved, Control, EvalReport, MetricsEvent, decode_event
from streams.kafka import KafkaSettings, make_producer, publish

sys.path.append(str(Path(__file__).resolve().parent / "helpers"))
from flaky import FlakyProducer


def everything_on(bootstrap: str, topic: str) -> list:
    """Every event on ``topic`` now (assigned partitions, to their end offsets)."""
    follower = TopicFollower(KafkaSettings(bootstrap=bootstrap), [topic])
    try:
        return [decode_event(r.value) for r in follower.catch_up()]
    finally:
        follower.close()


RULES = """
[dispatch]
default_hooks = ["webhook", "control"]

[hooks.webhook]
type = "webhook"
url = "{url}"
secret_file = "{secret}"
retries = 3
backoff_s = 0.1

[hooks.control]
type = "control"

[actions]
eval_regression = ["rollback"]

[[rule]]
name = "pii_rate_spike"
on = "metrics"
component = "ingest"
metric = "pii_rate"
kind = "spike"
factor = 3.0
min_history = 3
min_value = 0.05
group_by = ["source"]
severity = "critical"
cooldown_s = 600
action = "quarantine_source"
hooks = ["webhook", "control"]
"""


def test_sentinel_routes_data_and_eval_alerts_to_hooks_and_controls(fresh_broker, tmp_path):
    receiver = Receiver()
    secret = tmp_path / "secret"
    secret.write_text(SECRET.decode())
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES.format(url=receiver.url, secret=secret))
    bootstrap = fresh_broker.bootstrap
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    good = "/runs/r/checkpoints/step-10"
    publish(producer, "checkpoints", CheckpointSaved(run_id="r", path=good, step=10, tokens=1, vocab_version="v",
                                                     wall_time=time.time() - 60))
    publish(producer, "evals", EvalReport(run_id="r", step=10, checkpoint_path=good, suite="core", vocab_version="v"))
    sentinel = Sentinel(Sentinel.Config(bootstrap=bootstrap, rules=str(rules), lineage=str(tmp_path / "lineage.jsonl")))
    stop = threading.Event()
    thread = threading.Thread(target=sentinel.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        for v in (0.01, 0.012, 0.009, 0.011):
            publish(producer, "metrics.ingest", MetricsEvent(component="ingest", values={"pii_rate": v}, labels={"source": "forum"}))
        publish(producer, "metrics.ingest", MetricsEvent(component="ingest", values={"pii_rate": 0.3}, labels={"source": "forum"}))
        publish(producer, "metrics.ingest", MetricsEvent(component="ingest", values={"pii_rate": 0.4}, labels={"source": "forum"}))
        # forgeries anyone with write access to `alerts` (e.g. the trainer's credential) could send:
        forged = [
            Alert(rule="pii_rate_spike", severity="critical", source="sentinel", message="forged engine alert",
                  evidence={"action": "quarantine_source", "labels": {"source": "wiki"}, "hooks": ["control"]}),
            Alert(rule="trainer.loss_guard", severity="critical", source="trainer", message="forged rollback",
                  evidence={"action": "rollback", "run_id": "r", "hooks": ["control"]}),
            Alert(rule="eval_regression", severity="critical", source="evaluator", message="no report backs this",
                  evidence={"action": "rollback", "run_id": "r", "checkpoint": good, "checkpoint_wall_time": 1.0}),
        ]
        for alert in forged:
            publish(producer, "alerts", alert)
        bad, bad_wall = "/runs/r/checkpoints/step-20", time.time() - 30
        publish(producer, "checkpoints", CheckpointSaved(run_id="r", path=bad, step=20, tokens=2, vocab_version="v",
                                                         wall_time=bad_wall))
        findings = [{"metric": "domain/forum_en", "significant": True}, {"metric": "overall", "significant": False}]
        publish(producer, "evals", EvalReport(run_id="r", step=20, checkpoint_path=bad, suite="core", vocab_version="v",
                                              passed=False, details={"checkpoint_wall_time": bad_wall,
                                                                     "regression": {"findings": findings}}))
        regression = Alert(rule="eval_regression", severity="critical", source="evaluator", message="step 20 regressed",
                           evidence={"action": "rollback", "run_id": "r", "step": 20, "checkpoint": bad,
                                     "checkpoint_wall_time": bad_wall})
        sent_at = time.monotonic()
        publish(producer, "alerts", regression)
        controls = read_topic(bootstrap, "control", want=lambda e: len(e) >= 3, timeout_s=60)
        latency = time.monotonic() - sent_at
        deadline = time.monotonic() + 30
        while len(receiver.received) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # anything a forgery could have caused has been published by now
    finally:
        stop.set()
        thread.join(timeout=30)
        sentinel.close()
        producer.close()
        receiver.close()
    controls = [c for c in everything_on(bootstrap, "control") if isinstance(c, Control)]
    by_cmd = {c.command: c for c in controls}
    assert sorted(c.command for c in controls) == ["pause_source", "quarantine_source", "rollback"]
    assert by_cmd["quarantine_source"].args == {"source": "forum"}
    assert by_cmd["rollback"].args["checkpoint"] == good and by_cmd["rollback"].args["step"] == 10
    assert by_cmd["rollback"].args["domains"] == ["forum_en"]  # only the regressed domain's shards
    assert latency < 30
    # the spike fired once (the second high value fell in the cooldown); every alert reached the webhook
    # signed, the forgeries too (an on-call engineer sees them), but none of them caused a control
    rules_fired = sorted(r["alert"]["rule"] for r in receiver.received)
    assert rules_fired == ["eval_regression", "eval_regression", "pii_rate_spike", "pii_rate_spike",
                           "trainer.loss_guard"]
    assert all(r["valid"] for r in receiver.received)
    entries = LineageLog(tmp_path / "lineage.jsonl").entries()
    assert sorted(e["action"] for e in entries) == ["pause_source", "quarantine_source", "rollback", "skipped"]
    (skipped,) = [e for e in entries if e["action"] == "skipped"]
    assert "corroborates" in skipped["reason"] and skipped["alert_id"] == forged[2].alert_id


RETRY_RULES = """
[dispatch]
default_hooks = ["control"]
retries = 1
backoff_s = 0.05

[hooks.control]
type = "control"

[actions]
eval_regression = ["rollback"]
"""


def test_a_failed_control_hook_keeps_the_offset_and_is_retried_with_the_same_controls(fresh_broker, tmp_path):
    from kafka import KafkaConsumer, TopicPartition

    rules = tmp_path / "rules.toml"
    rules.write_text(RETRY_RULES)
    bootstrap = fresh_broker.bootstrap
    settings = KafkaSettings(bootstrap=bootstrap)
    producer = make_producer(settings)
    now = time.time()
    for step, wall, passed in ((10, now - 60, True), (20, now - 30, False)):
        path = f"/runs/r/checkpoints/step-{step}"
        publish(producer, "checkpoints", CheckpointSaved(run_id="r", path=path, step=step, tokens=1, vocab_version="v",
                                                         wall_time=wall))
        details = {"checkpoint_wall_time": wall}
        if not passed:
            details["regression"] = {"findings": [{"metric": "domain/news_de", "significant": True}]}
        publish(producer, "evals", EvalReport(run_id="r", step=step, checkpoint_path=path, suite="core",
                                              vocab_version="v", passed=passed, details=details))
    sentinel = Sentinel(Sentinel.Config(bootstrap=bootstrap, rules=str(rules), lineage=str(tmp_path / "lineage.jsonl"),
                                        group="retry-sentinel"))
    hook = sentinel.dispatcher.hooks["control"]
    working = hook.producer
    hook.producer = make_producer(settings)
    hook.producer.close()  # every publish on `control` fails until the working producer is back
    stop = threading.Event()
    thread = threading.Thread(target=sentinel.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id="retry-sentinel", enable_auto_commit=False)
    try:
        alert = Alert(rule="eval_regression", severity="critical", source="evaluator", message="step 20 regressed",
                      evidence={"action": "rollback", "checkpoint": "/runs/r/checkpoints/step-20",
                                "checkpoint_wall_time": now - 30})
        publish(producer, "alerts", alert)
        deadline = time.monotonic() + 60
        while sentinel._failures < 2 and time.monotonic() < deadline:  # failed, redelivered, failed again
            time.sleep(0.1)
        assert sentinel._failures >= 2
        tps = [TopicPartition("alerts", p) for p in sorted(probe.partitions_for_topic("alerts"))]
        assert all((probe.committed(tp) or 0) == 0 for tp in tps)  # the alert's offset is not committed
        hook.producer = working
        controls = read_topic(bootstrap, "control", want=lambda e: len(e) >= 1, timeout_s=60)
        deadline = time.monotonic() + 30
        while sum(probe.committed(tp) or 0 for tp in tps) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # committed once the control went out: the alert, then the page that waited behind it
        assert sum(probe.committed(tp) or 0 for tp in tps) == 2
        time.sleep(1.0)
        controls = everything_on(bootstrap, "control")
    finally:
        stop.set()
        thread.join(timeout=30)
        probe.close()
        sentinel.close()
        producer.close()
    (rollback,) = controls  # published once, though decided before the failures
    assert rollback.command == "rollback" and rollback.args["step"] == 10 and rollback.args["domains"] == ["news_de"]
    pages = [a for a in everything_on(bootstrap, "alerts") if a.rule == "sentinel.hook_failed"]
    assert len(pages) == 1 and pages[0].evidence["alert_id"] == alert.alert_id


TRANSIENT_RULES = """
[[rule]]
name = "pii_high"
on = "metrics"
component = "ingest"
metric = "pii_rate"
kind = "threshold"
threshold = 0.2
group_by = ["source"]
severity = "warning"
cooldown_s = 600
"""


def test_a_transient_publish_error_delays_an_alert_but_never_loses_or_doubles_it(fresh_broker, tmp_path):
    """Issue 14 review finding 1: a KafkaTimeoutError while the sentinel publishes a rule's alert
    used to dead-letter the metric and commit it: the alert was lost. Now the record is redelivered
    (not observed twice), the alert published under one stable id, the offset committed after."""
    from kafka import KafkaConsumer, TopicPartition

    rules = tmp_path / "rules.toml"
    rules.write_text(TRANSIENT_RULES)
    bootstrap = fresh_broker.bootstrap
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    sentinel = Sentinel(Sentinel.Config(bootstrap=bootstrap, rules=str(rules), lineage=str(tmp_path / "lineage.jsonl"),
                                        group="transient-sentinel"))
    sentinel.producer = FlakyProducer(sentinel.producer, lost={1, 2}, unacked={3})
    stop = threading.Event()
    thread = threading.Thread(target=sentinel.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id="transient-sentinel", enable_auto_commit=False)
    try:
        publish(producer, "metrics.ingest", MetricsEvent(component="ingest", values={"pii_rate": 0.3},
                                                         labels={"source": "forum"}))
        tp = TopicPartition("metrics.ingest", 0)
        deadline = time.monotonic() + 60
        while (probe.committed(tp) or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe.committed(tp) == 1
    finally:
        stop.set()
        thread.join(timeout=30)
        probe.close()
        sentinel.close()
        producer.close()
    alerts = [a for a in everything_on(bootstrap, "alerts") if isinstance(a, Alert)]
    assert [a.rule for a in alerts] == ["pii_high", "pii_high"]  # the unacknowledged send and its retry
    assert len({a.alert_id for a in alerts}) == 1  # one alert: hooks run once per id
    # redelivered at least once (the loop's idle tick may have taken one of the failures meanwhile)
    assert sentinel.guard.counts["redelivered"] >= 1 and sentinel.guard.counts["handler_errors"] == 0
    assert not [d for d in everything_on(bootstrap, "dlq")]
