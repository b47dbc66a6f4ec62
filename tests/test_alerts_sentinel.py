"""The sentinel end to end on a private broker: metrics spike -> rule alert -> signed webhook +
quarantine Controls; evaluator regression alert -> rollback to last good."""

from __future__ import annotations

import threading
import time

from test_alerts_hooks import SECRET, Receiver
from test_eval_service import read_topic

from evaluators.lineage import LineageLog
from evaluators.sentinel import Sentinel
from streams.events import Alert, CheckpointSaved, Control, EvalReport, MetricsEvent
from streams.kafka import KafkaSettings, make_producer, publish

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
            publish(producer, "metrics", MetricsEvent(component="ingest", values={"pii_rate": v}, labels={"source": "forum"}))
        publish(producer, "metrics", MetricsEvent(component="ingest", values={"pii_rate": 0.3}, labels={"source": "forum"}))
        publish(producer, "metrics", MetricsEvent(component="ingest", values={"pii_rate": 0.4}, labels={"source": "forum"}))
        regression = Alert(rule="eval_regression", severity="critical", source="evaluator", message="step 20 regressed",
                           evidence={"action": "rollback", "run_id": "r", "step": 20})
        sent_at = time.monotonic()
        publish(producer, "alerts", regression)
        controls = read_topic(bootstrap, "control", want=lambda e: len(e) >= 3, timeout_s=60)
        latency = time.monotonic() - sent_at
    finally:
        stop.set()
        thread.join(timeout=30)
        sentinel.close()
        producer.close()
        receiver.close()
    by_cmd = {c.command: c for c in controls if isinstance(c, Control)}
    assert set(by_cmd) == {"quarantine_source", "pause_source", "rollback"}
    assert by_cmd["quarantine_source"].args == {"source": "forum"}
    assert by_cmd["rollback"].args["checkpoint"] == good and by_cmd["rollback"].args["step"] == 10
    assert latency < 30
    # the spike fired once (the second high value fell in the cooldown), and both alerts reached the webhook signed
    rules_fired = sorted(r["alert"]["rule"] for r in receiver.received)
    assert rules_fired == ["eval_regression", "pii_rate_spike"] and all(r["valid"] for r in receiver.received)
    actions = [e["action"] for e in LineageLog(tmp_path / "lineage.jsonl").entries()]
    assert sorted(actions) == ["pause_source", "quarantine_source", "rollback"]
