"""Rollback both ways: policy decisions, and Controls published on a real broker with lineage."""

from __future__ import annotations

import time
import uuid

from evaluators.alerts.control import ControlHook
from evaluators.lineage import LineageLog
from evaluators.rollback import RollbackPolicy
from streams.events import Alert, CheckpointSaved, Control, EvalReport, ShardPublished, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records


def history(policy: RollbackPolicy, run_id: str = "run1") -> None:
    """Checkpoints 100 (passed), 200 (passed), 300 (failed)."""
    for step, wall, passed in ((100, 10.0, True), (200, 20.0, True), (300, 30.0, False)):
        path = f"/runs/{run_id}/step-{step}"
        policy.observe(CheckpointSaved(run_id=run_id, path=path, step=step, tokens=step * 10,
                                       vocab_version="v1", wall_time=wall))
        policy.observe(EvalReport(run_id=run_id, step=step, checkpoint_path=path, suite="core",
                                  vocab_version="v1", passed=passed,
                                  details={"checkpoint_wall_time": wall}))


def regression_alert(run_id: str = "run1", saved_at: float | None = 30.0) -> Alert:
    return Alert(rule="eval_regression", severity="critical", message="overall logppl +0.3",
                 source="evaluator", evidence={"action": "rollback", "run_id": run_id,
                                               "checkpoint_wall_time": saved_at})


def test_regression_rolls_back_to_last_good_and_asks_the_trainer_to_quarantine_what_it_read_since():
    policy = RollbackPolicy()
    history(policy)
    (rollback,) = policy.decide(regression_alert()).controls
    assert rollback.command == "rollback"
    assert rollback.args == {"target": "last_good", "run_id": "run1", "checkpoint": "/runs/run1/step-200",
                             "step": 200, "quarantine": "since"}
    assert "eval_regression" in rollback.reason


def test_a_regression_is_not_acted_on_twice():
    now = [100.0]
    policy = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(policy)
    (first,) = policy.decide(regression_alert(saved_at=30.0)).controls
    policy.observe(first)
    # a later checkpoint of the abandoned branch regresses while the trainer has not applied it yet
    assert "not applied yet" in policy.decide(regression_alert(saved_at=31.0)).skipped
    policy.observe(Alert(rule="trainer.rollback", severity="warning", message="rolled back", source="trainer",
                         evidence={"run_id": "run1", "to_step": 200}, created_at=first.issued_at + 1))
    assert "already rolled back" in policy.decide(regression_alert(saved_at=first.issued_at + 0.5)).skipped
    # a checkpoint of the new branch that regresses again is rolled back again
    assert policy.decide(regression_alert(saved_at=first.issued_at + 5)).controls[0].args["step"] == 200
    # a pending rollback that the trainer never applies stops blocking after pending_s
    other = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(other)
    other.observe(other.decide(regression_alert()).controls[0])
    now[0] = time.time() + 61
    assert other.decide(regression_alert(saved_at=time.time() + 1)).controls


def test_a_rechecked_checkpoint_at_the_same_path_is_judged_on_its_own_reports():
    policy = RollbackPolicy()
    history(policy)
    # after a rollback the trainer saves step-300 again at the same path; its new report passes
    policy.observe(CheckpointSaved(run_id="run1", path="/runs/run1/step-300", step=300, tokens=1,
                                   vocab_version="v1", wall_time=40.0))
    policy.observe(EvalReport(run_id="run1", step=300, checkpoint_path="/runs/run1/step-300", suite="core",
                              vocab_version="v1", passed=True, details={"checkpoint_wall_time": 40.0}))
    good = policy.last_good("run1")
    assert (good.step, good.wall_time) == (300, 40.0)


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


def test_data_alert_with_rollback_returns_runs_to_before_the_source_appeared():
    policy = RollbackPolicy()
    history(policy)  # good at wall 10 and 20, failed at 30
    alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                  evidence={"action": "quarantine_source_and_rollback", "labels": {"source": "forum"}})
    assert "nothing to roll back" in policy.decide(alert).skipped  # no shard of the source yet
    for domain, at in (("forum_en", 15.0), ("forum_de", 12.0), ("forumx_en", 5.0), ("wiki_en", 1.0)):
        policy.observe(ShardPublished(stream_root="/s", shard=f"{domain}-{at}", domain=domain, samples=1, bytes=1,
                                      vocab_version="v1", writer_id="w", published_at=at))
    cmds = [(c.command, c.args) for c in policy.decide(alert).controls]
    assert cmds[:2] == [("quarantine_source", {"source": "forum"}), ("pause_source", {"source": "forum"})]
    assert cmds[2] == ("rollback", {"target": "step", "run_id": "run1", "checkpoint": "/runs/run1/step-100",
                                    "step": 100, "quarantine": "none"})
    assert len(cmds) == 3


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
        assert len(result["controls"]) == 1
        got = {}
        for rec in poll_records(consumer, timeout_s=30, until=lambda seen: len(got) >= 1):
            ev = decode_event(rec.value)
            if isinstance(ev, Control) and ev.control_id in result["controls"]:
                got[ev.control_id] = ev
        assert [c.command for c in got.values()] == ["rollback"]
        entries = lineage.entries()
        assert [e["action"] for e in entries] == ["rollback"]
        assert entries[0]["alert_id"] == alert.alert_id and entries[0]["reason"]
        assert entries[0]["args"]["step"] == 200
        ControlHook(producer=producer, policy=RollbackPolicy(), lineage=lineage)(regression_alert("nope"))
        assert lineage.entries()[-1]["action"] == "skipped"
    finally:
        consumer.close()
        producer.close()
