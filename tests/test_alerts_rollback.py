"""Rollback both ways: policy decisions, and Controls published on a real broker with lineage."""

from __future__ import annotations

import uuid

from evaluators.alerts.control import ControlHook
from evaluators.lineage import LineageLog
from evaluators.rollback import RollbackPolicy
from streams.events import Alert, CheckpointSaved, Control, EvalReport, ShardPublished, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records


def history(policy: RollbackPolicy, run_id: str = "run1") -> None:
    """Checkpoints 100 (passed), 200 (passed), 300 (failed); shards before and after step 200."""
    for step, wall, passed in ((100, 10.0, True), (200, 20.0, True), (300, 30.0, False)):
        path = f"/runs/{run_id}/step-{step}"
        policy.observe(CheckpointSaved(run_id=run_id, path=path, step=step, tokens=step * 10,
                                       vocab_version="v1", wall_time=wall))
        policy.observe(EvalReport(run_id=run_id, step=step, checkpoint_path=path, suite="core",
                                  vocab_version="v1", passed=passed))
    for name, at in (("old-a", 5.0), ("old-b", 15.0), ("new-a", 21.0), ("new-b", 29.0)):
        policy.observe(ShardPublished(stream_root="/s", shard=name, domain="wiki", samples=10, bytes=100,
                                      vocab_version="v1", writer_id="w", published_at=at))


def regression_alert(run_id: str = "run1") -> Alert:
    return Alert(rule="eval_regression", severity="critical", message="overall logppl +0.3",
                 source="evaluator", evidence={"action": "rollback", "run_id": run_id})


def test_regression_rolls_back_to_last_good_and_quarantines_later_shards():
    policy = RollbackPolicy()
    history(policy)
    rollback, quarantine = policy.decide(regression_alert()).controls
    assert rollback.command == "rollback"
    assert rollback.args == {"target": "last_good", "run_id": "run1", "checkpoint": "/runs/run1/step-200", "step": 200}
    assert quarantine.command == "quarantine_shards"
    assert quarantine.args["shards"] == ["new-a", "new-b"] and quarantine.args["since_step"] == 200
    assert "eval_regression" in rollback.reason


def test_a_checkpoint_with_any_failed_or_errored_report_is_not_good():
    policy = RollbackPolicy()
    history(policy)
    policy.observe(EvalReport(run_id="run1", step=200, checkpoint_path="/runs/run1/step-200", suite="audio",
                              vocab_version="v1", passed=False, error="load failed"))
    assert policy.last_good("run1").step == 100


def test_rollback_without_a_good_checkpoint_is_skipped_with_reason():
    decision = RollbackPolicy().decide(regression_alert("unknown"))
    assert decision.controls == [] and "needs a human" in decision.skipped


def test_data_alert_quarantines_and_pauses_the_source():
    alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                  evidence={"action": "quarantine_source", "labels": {"source": "forum"}})
    cmds = [(c.command, c.args) for c in RollbackPolicy().decide(alert).controls]
    assert cmds == [("quarantine_source", {"source": "forum"}), ("pause_source", {"source": "forum"})]
    no_label = Alert(rule="x", severity="warning", message="m", source="s", evidence={"action": "pause_source"})
    assert "source" in RollbackPolicy().decide(no_label).skipped


def test_control_hook_publishes_on_real_broker_and_records_lineage(broker, tmp_path):
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    policy = RollbackPolicy(issued_by="test")
    history(policy)
    lineage = LineageLog(tmp_path / "lineage.jsonl")
    producer = make_producer(settings)
    consumer = make_consumer(settings, topics=["control"], group_id=f"t-{uuid.uuid4().hex}")
    try:
        alert = regression_alert()
        result = ControlHook(producer=producer, policy=policy, lineage=lineage)(alert)
        assert len(result["controls"]) == 2
        got = {}
        for rec in poll_records(consumer, timeout_s=30, until=lambda seen: len(got) >= 2):
            ev = decode_event(rec.value)
            if isinstance(ev, Control) and ev.control_id in result["controls"]:
                got[ev.control_id] = ev
        assert sorted(c.command for c in got.values()) == ["quarantine_shards", "rollback"]
        entries = lineage.entries()
        assert [e["action"] for e in entries] == ["rollback", "quarantine_shards"]
        assert all(e["alert_id"] == alert.alert_id and e["reason"] for e in entries)
        assert entries[1]["args"]["shards"] == ["new-a", "new-b"]
        ControlHook(producer=producer, policy=RollbackPolicy(), lineage=lineage)(regression_alert("nope"))
        assert lineage.entries()[-1]["action"] == "skipped"
    finally:
        consumer.close()
        producer.close()
