"""Rollback both ways: policy decisions, and Controls published on a real broker with lineage."""

from __future__ import annotations

import time
import uuid

import pytest

from evaluators.alerts.control import ControlHook
from evaluators.lineage import LineageLog
from evaluators.rollback import CIRCUIT_RULE, RollbackPolicy
from streams.events import Alert, CheckpointSaved, Control, EvalReport, ShardPublished, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records
from streams.signing import ControlVerifier, load_signing_key


def saved(policy: RollbackPolicy, step: int, wall: float, *, passed: bool, run_id: str = "run1",
          regressed: tuple[str, ...] = ("domain/forum_en",)) -> None:
    """A checkpoint and its report; a failed one carries significant findings for ``regressed``."""
    path = f"/runs/{run_id}/step-{step}"
    policy.observe(CheckpointSaved(run_id=run_id, path=path, step=step, tokens=step * 10, vocab_version="v1",
                                   wall_time=wall))
    findings = [{"metric": m, "significant": True} for m in regressed] + [{"metric": "domain/wiki_en",
                                                                          "significant": False}]
    details = {"checkpoint_wall_time": wall, **({} if passed else {"regression": {"findings": findings}})}
    policy.observe(EvalReport(run_id=run_id, step=step, checkpoint_path=path, suite="core", vocab_version="v1",
                              passed=passed, details=details))


def history(policy: RollbackPolicy, run_id: str = "run1") -> None:
    """Checkpoints 100 (passed), 200 (passed), 300 (failed: forum_en regressed)."""
    for step, wall, passed in ((100, 10.0, True), (200, 20.0, True), (300, 30.0, False)):
        saved(policy, step, wall, passed=passed, run_id=run_id)


def regression_alert(run_id: str = "run1", saved_at: float = 30.0, step: int = 300, **evidence) -> Alert:
    return Alert(rule="eval_regression", severity="critical", message="domain/forum_en logppl +0.3",
                 source="evaluator", evidence={"action": "rollback", "run_id": run_id, "step": step,
                                               "checkpoint": f"/runs/{run_id}/step-{step}",
                                               "checkpoint_wall_time": saved_at, **evidence})


def test_regression_rolls_back_to_last_good_and_quarantines_only_the_regressed_domain():
    policy = RollbackPolicy()
    history(policy)
    (rollback,) = policy.decide(regression_alert(), "rollback").controls
    assert rollback.command == "rollback"
    assert rollback.args == {"target": "last_good", "run_id": "run1", "checkpoint": "/runs/run1/step-200",
                             "checkpoint_wall_time": 20.0, "step": 200, "quarantine": "since",
                             "regression": ["domain/forum_en"], "domains": ["forum_en"]}
    assert "eval_regression" in rollback.reason


def test_with_confirm_checkpoints_2_a_transient_regression_rolls_nothing_back():
    policy = RollbackPolicy(confirm_checkpoints=2)
    history(policy)  # 100 and 200 passed, 300 failed
    decision = policy.decide(regression_alert(), "rollback")
    assert decision.controls == [] and "1 of 2 consecutive" in decision.skipped
    saved(policy, 400, 40.0, passed=True)  # the next checkpoint recovered: the bump was transient
    saved(policy, 500, 50.0, passed=False)  # a new failure starts a new streak
    assert "1 of 2" in policy.decide(regression_alert(saved_at=50.0, step=500), "rollback").skipped
    saved(policy, 600, 60.0, passed=False)  # two in a row: confirmed, back to the last good (400)
    (rollback,) = policy.decide(regression_alert(saved_at=60.0, step=600), "rollback").controls
    assert rollback.args["step"] == 400 and rollback.args["target"] == "last_good"


def test_confirm_checkpoints_below_1_is_a_config_error():
    with pytest.raises(ValueError, match="confirm_checkpoints"):
        RollbackPolicy(confirm_checkpoints=0)


def test_a_regression_needs_a_failed_report_on_evals_to_corroborate_it():
    policy = RollbackPolicy()
    history(policy)
    # names a checkpoint that passed, one never evaluated, or none at all: nothing happens
    for alert in (regression_alert(saved_at=20.0, step=200), regression_alert(saved_at=99.0),
                  Alert(rule="eval_regression", severity="critical", message="m", source="trainer",
                        evidence={"action": "rollback", "run_id": "run1", "checkpoint_wall_time": "nan!"})):
        decision = policy.decide(alert, "rollback")
        assert decision.controls == [] and "corroborates" in decision.skipped
    # the run, metrics and domains come from the report, not from what the alert claims
    (rollback,) = policy.decide(regression_alert(run_id="run1", domains=["wiki_en"]), "rollback").controls
    assert rollback.args["domains"] == ["forum_en"]


def test_a_regression_is_not_acted_on_twice():
    now = [time.time()]
    policy = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(policy)
    (first,) = policy.decide(regression_alert(saved_at=30.0), "rollback").controls
    policy.observe(first)
    now[0] += 2  # the policy clock runs on from when the controls are issued
    # a later checkpoint of the abandoned branch regresses while the trainer has not applied it yet
    saved(policy, 310, 31.0, passed=False)
    assert "not applied yet" in policy.decide(regression_alert(saved_at=31.0, step=310), "rollback").skipped
    policy.observe(Alert(rule="trainer.rollback", severity="warning", message="rolled back", source="trainer",
                         evidence={"run_id": "run1", "to_step": 200, "control_id": first.control_id},
                    created_at=first.issued_at + 1))
    saved(policy, 320, first.issued_at + 0.5, passed=False)
    decision = policy.decide(regression_alert(saved_at=first.issued_at + 0.5, step=320), "rollback")
    assert "already rolled back" in decision.skipped
    # a checkpoint of the new branch that regresses on another domain is rolled back again
    saved(policy, 300, first.issued_at + 5, passed=False, regressed=("domain/news_de",))
    again = policy.decide(regression_alert(saved_at=first.issued_at + 5), "rollback").controls[0]
    assert again.args["step"] == 200 and again.args["domains"] == ["news_de"]
    # a pending rollback that the trainer never applies stops blocking after pending_s
    other = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(other)
    (in_flight,) = other.decide(regression_alert(), "rollback").controls
    other.observe(in_flight)
    now[0], later = in_flight.issued_at + 61, in_flight.issued_at + 1
    saved(other, 300, later, passed=False, regressed=("domain/code",))
    assert other.decide(regression_alert(saved_at=later), "rollback").controls


def test_circuit_breaker_pauses_the_domain_and_pages_instead_of_rolling_back_again():
    policy = RollbackPolicy(issued_by="sentinel")
    history(policy)
    (first,) = policy.decide(regression_alert(), "rollback").controls
    applied = Alert(rule="trainer.rollback", severity="warning", message="rolled back", source="trainer",
                    evidence={"run_id": "run1", "to_step": 200, "control_id": first.control_id},
                    created_at=first.issued_at + 1)
    policy.observe(first)
    policy.observe(applied)
    # the re-trained step 300 regresses on forum_en again, against the same good step 200
    saved(policy, 300, first.issued_at + 5, passed=False)
    decision = policy.decide(regression_alert(saved_at=first.issued_at + 5), "rollback")
    assert [(c.command, c.args) for c in decision.controls] == [
        ("pause_domain", {"domain": "forum_en", "run_id": "run1"})]
    (page,) = decision.alerts
    assert page.rule == CIRCUIT_RULE and page.severity == "critical"
    assert page.evidence["metrics"] == ["domain/forum_en"] and page.evidence["step"] == 200
    for control in decision.controls:
        policy.observe(control)
    # further regressions of that metric: skipped, no new page, no rollback
    saved(policy, 310, first.issued_at + 9, passed=False)
    later = policy.decide(regression_alert(saved_at=first.issued_at + 9, step=310), "rollback")
    assert later.controls == [] and later.alerts == [] and "circuit open" in later.skipped
    # the breaker survives a restart: a new policy replaying the topics decides the same
    fresh = RollbackPolicy()
    history(fresh)
    fresh.observe(first)
    fresh.observe(applied)
    for control in decision.controls:
        fresh.observe(control)
    saved(fresh, 310, first.issued_at + 9, passed=False)
    assert "circuit open" in fresh.decide(regression_alert(saved_at=first.issued_at + 9, step=310),
                                          "rollback").skipped
    # a person resumes the domain: the circuit closes, and a new good checkpoint is a new target
    fresh.observe(Control(command="resume_domain", args={"domain": "forum_en", "run_id": "run1"}))
    saved(fresh, 400, first.issued_at + 20, passed=True)
    saved(fresh, 500, first.issued_at + 30, passed=False)
    (rollback,) = fresh.decide(regression_alert(saved_at=first.issued_at + 30, step=500), "rollback").controls
    assert rollback.command == "rollback" and rollback.args["step"] == 400


def test_checkpoints_of_an_abandoned_branch_are_never_a_rollback_target():
    policy = RollbackPolicy()
    history(policy)
    saved(policy, 250, 25.0, passed=True)  # good, but beyond the target of the rollback below
    policy.observe(Control(command="rollback", issued_at=26.0,
                           args={"target": "step", "run_id": "run1", "step": 100, "quarantine": "none"}))
    assert policy.last_good("run1").step == 100
    saved(policy, 200, 40.0, passed=True)  # re-trained on the new branch
    assert (policy.last_good("run1").step, policy.last_good("run1").wall_time) == (200, 40.0)


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
    policy = RollbackPolicy()
    saved(policy, 300, 30.0, passed=False, run_id="unknown")
    decision = policy.decide(regression_alert("unknown"), "rollback")
    assert decision.controls == [] and "needs a human" in decision.skipped


def test_data_alert_quarantines_and_pauses_the_source():
    alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                  evidence={"action": "quarantine_source", "labels": {"source": "forum"}})
    cmds = [(c.command, c.args) for c in RollbackPolicy().decide(alert, "quarantine_source").controls]
    assert cmds == [("quarantine_source", {"source": "forum"}), ("pause_source", {"source": "forum"})]
    no_label = Alert(rule="x", severity="warning", message="m", source="s", evidence={"source": "wiki"})
    assert "source" in RollbackPolicy().decide(no_label, "pause_source").skipped
    # the action is the caller's (from rules.toml), never the alert's own
    assert RollbackPolicy().decide(alert, "none").controls == []


def test_a_data_side_domain_pause_names_every_known_run_and_each_is_verifiable():
    collapse = Alert(rule="codebook_collapse", severity="critical", message="codebook_usage=0.01 < 0.05",
                     source="sentinel", evidence={"labels": {"domain": "speech", "modality": "a", "level": "0"}})
    policy = RollbackPolicy()
    assert "no run known" in policy.decide(collapse, "pause_domain").skipped
    history(policy, "run2")
    history(policy, "run1")
    controls = policy.decide(collapse, "pause_domain").controls
    assert [(c.command, c.args) for c in controls] == [("pause_domain", {"domain": "speech", "run_id": "run1"}),
                                                       ("pause_domain", {"domain": "speech", "run_id": "run2"})]
    verifier = ControlVerifier(None, insecure=True)
    for c in controls:  # trainer-only commands must name their run: these pass the verifier's run check
        verifier.verify(c)


def test_data_alert_with_rollback_returns_runs_to_before_the_source_appeared():
    policy = RollbackPolicy()
    history(policy)  # good at wall 10 and 20, failed at 30
    alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                  evidence={"action": "quarantine_source_and_rollback", "labels": {"source": "forum"}})
    assert "no checkpoint trained on 'forum'" in policy.decide(alert, "quarantine_source_and_rollback").skipped
    for domain, at in (("forum_en", 15.0), ("forum_de", 12.0), ("forumx_en", 5.0), ("wiki_en", 1.0)):
        policy.observe(ShardPublished(stream_root="/s", shard=f"{domain}-{at}", domain=domain, samples=1, bytes=1,
                                      vocab_version="v1", writer_id="w", published_at=at))
    # domain names say nothing about sources: without lineage, forum_* shards are not forum's
    assert "no checkpoint trained on 'forum'" in policy.decide(alert, "quarantine_source_and_rollback").skipped


def test_source_rollback_uses_checkpoint_lineage_not_domain_names():
    policy = RollbackPolicy()

    def ckpt(run_id, step, wall, tokens_by_source):
        path = f"/runs/{run_id}/step-{step}"
        policy.observe(CheckpointSaved(run_id=run_id, path=path, step=step, tokens=step, vocab_version="v1",
                                       wall_time=wall, lineage={"tokens_by_source": tokens_by_source}))
        policy.observe(EvalReport(run_id=run_id, step=step, checkpoint_path=path, suite="core", vocab_version="v1",
                                  passed=True, details={"checkpoint_wall_time": wall}))

    ckpt("run1", 100, 10.0, {"web_news": 50, "wiki": 10})
    ckpt("run1", 200, 20.0, {"web_news": 90, "web": 5, "wiki": 20})
    ckpt("run1", 300, 30.0, {"web_news": 99, "web": 9, "wiki": 30})
    # run2 trained on media source "cam-uploads" (its domains are "image"/"video": no name match)
    ckpt("run2", 5, 5.0, {"wiki": 5})
    ckpt("run2", 9, 9.0, {"wiki": 5, "cam-uploads": 4})

    def decide(source):
        alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                      evidence={"action": "quarantine_source_and_rollback", "labels": {"source": source}})
        d = policy.decide(alert, "quarantine_source_and_rollback")
        return {c.args["run_id"]: c.args["step"] for c in d.controls if c.command == "rollback"
                and "only_if_trained_on" not in c.args}, d.skipped

    assert decide("web")[0] == {"run1": 100}  # web_news (trained since step 100) is not web
    assert decide("cam-uploads")[0] == {"run2": 5}
    rolled, why = decide("web_news")
    assert rolled == {} and "run1" in why and "no good checkpoint" in why


def test_control_hook_publishes_on_real_broker_and_records_lineage(broker, tmp_path):
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    policy = RollbackPolicy(issued_by="test")
    history(policy)
    lineage = LineageLog(tmp_path / "lineage.jsonl")
    producer = make_producer(settings)
    consumer = make_consumer(settings, topics=["control"], group_id=f"t-{uuid.uuid4().hex}")
    try:
        alert = regression_alert()
        sentinel = load_signing_key("sentinel")
        result = ControlHook(producer=producer, policy=policy, lineage=lineage, key=sentinel)(alert, "rollback")
        assert len(result["controls"]) == 1
        got = {}
        for rec in poll_records(consumer, timeout_s=30, until=lambda seen: len(got) >= 1):
            ev = decode_event(rec.value)
            if isinstance(ev, Control) and ev.control_id in result["controls"]:
                got[ev.control_id] = ev
        assert [c.command for c in got.values()] == ["rollback"]
        (sent,) = got.values()
        assert ControlVerifier.from_env().verify(sent).role == "sentinel" and sent.issued_by == sentinel.key_id
        entries = lineage.entries()
        assert [e["action"] for e in entries] == ["rollback"]
        assert entries[0]["alert_id"] == alert.alert_id and entries[0]["reason"]
        assert entries[0]["args"]["step"] == 200
        ControlHook(producer=producer, policy=RollbackPolicy(), lineage=lineage,
                    key=sentinel)(regression_alert("nope"), "rollback")
        assert lineage.entries()[-1]["action"] == "skipped"
    finally:
        consumer.close()
        producer.close()


def test_a_rollback_the_trainer_never_applied_does_not_open_the_circuit():
    """Issued while the trainer restarted (its listener starts at the end of `control`): the run
    trained on from step 300, so its recurrence is a fresh regression, not a loop."""
    now = [time.time()]
    policy = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(policy)
    (first,) = policy.decide(regression_alert(), "rollback").controls
    policy.observe(first)
    now[0] += 120
    saved(policy, 310, first.issued_at + 90, passed=False)  # step 310 > 300: it never went back
    decision = policy.decide(regression_alert(saved_at=first.issued_at + 90, step=310), "rollback")
    assert [c.command for c in decision.controls] == ["rollback"] and decision.alerts == []
    # once it went back (a checkpoint at a step it had passed, saved after the rollback), it counts
    policy.observe(decision.controls[0])
    saved(policy, 300, decision.controls[0].issued_at + 5, passed=False)
    again = policy.decide(regression_alert(saved_at=decision.controls[0].issued_at + 5), "rollback")
    assert [c.command for c in again.controls] == ["pause_domain"] and again.alerts[0].rule == CIRCUIT_RULE


def test_a_forged_trainer_rollback_alert_cannot_suppress_later_rollbacks():
    now = [time.time()]
    policy = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(policy)
    (first,) = policy.decide(regression_alert(), "rollback").controls
    policy.observe(first)
    for control_id in ("made-up", first.control_id):  # anyone who can write `alerts`, dated far ahead
        policy.observe(Alert(rule="trainer.rollback", severity="warning", message="x", source="trainer",
                             evidence={"run_id": "run1", "control_id": control_id}, created_at=1e12))
    assert policy.applied["run1"] <= first.issued_at + 60
    now[0] += 600
    saved(policy, 300, now[0] - 10, passed=False, regressed=("domain/news_de",))
    (rollback,) = policy.decide(regression_alert(saved_at=now[0] - 10), "rollback").controls
    assert rollback.command == "rollback" and rollback.args["domains"] == ["news_de"]


def test_a_circuit_page_survives_a_sentinel_that_dies_before_its_pause_is_sent(broker, tmp_path):
    """The breaker's page is on `alerts` before its pause_domain is on `control`: a sentinel dying
    in between decides again after a restart (no pause in its history), so the page is never lost."""

    class DiesOnControl:  # the real producer, but the process "dies" when it publishes on `control`
        def __init__(self, inner):
            self.inner = inner

        def send(self, topic, **kw):
            if topic == "control":
                raise SystemExit("killed")
            return self.inner.send(topic, **kw)

        def flush(self):
            self.inner.flush()

    settings = KafkaSettings(bootstrap=broker.bootstrap)
    producer = make_producer(settings)
    pages = make_consumer(settings, topics=["alerts"], group_id=f"t-{uuid.uuid4().hex}",
                          auto_offset_reset="earliest")
    try:
        policy = RollbackPolicy(issued_by="test")
        history(policy)
        (first,) = policy.decide(regression_alert(), "rollback").controls
        policy.observe(first)
        policy.observe(Alert(rule="trainer.rollback", severity="warning", message="rolled back", source="trainer",
                             evidence={"run_id": "run1", "control_id": first.control_id},
                             created_at=first.issued_at + 1))
        saved(policy, 300, first.issued_at + 5, passed=False)  # went back and regressed again
        alert = regression_alert(saved_at=first.issued_at + 5)
        hook = ControlHook(producer=DiesOnControl(producer), policy=policy, lineage=LineageLog(tmp_path / "l.jsonl"))
        try:
            hook(alert, "rollback")
        except SystemExit:
            pass
        got: list[Alert] = []
        for record in poll_records(pages, timeout_s=30, until=lambda seen: bool(got)):
            event = decode_event(record.value)
            if isinstance(event, Alert) and event.rule == CIRCUIT_RULE and event.evidence["alert_id"] == alert.alert_id:
                got.append(event)
        assert len(got) == 1 and got[0].evidence["domains"] == ["forum_en"]
    finally:
        pages.close()
        producer.close()


def test_a_restarted_policy_sees_a_rollback_applied_from_the_checkpoints_alone():
    """`alerts` is not replayed after a sentinel restart, so the trainer's confirmation is gone; a
    checkpoint saved after the rollback at a step the run had passed shows it went back."""
    policy = RollbackPolicy(pending_s=300)
    history(policy)
    (first,) = policy.decide(regression_alert(), "rollback").controls
    fresh = RollbackPolicy(pending_s=300)  # the restarted sentinel: checkpoints, evals, control
    history(fresh)
    fresh.observe(first)
    saved(fresh, 300, first.issued_at + 5, passed=False, regressed=("domain/news_de",))
    (again,) = fresh.decide(regression_alert(saved_at=first.issued_at + 5), "rollback").controls
    assert again.command == "rollback" and again.args["domains"] == ["news_de"]


def failed_report(policy: RollbackPolicy, step: int, wall: float, findings: list[dict]) -> None:
    """A checkpoint whose failed report carries an item table: text (wiki_en, forum_en), audio (speech, music)."""
    path = f"/runs/run1/step-{step}"
    policy.observe(CheckpointSaved(run_id="run1", path=path, step=step, tokens=step, vocab_version="v1",
                                   wall_time=wall))
    items = {"id": ["a", "b", "c", "d", "e"], "nll": [1.0] * 5, "tokens": [1] * 5,
             "modality": ["text", "text", "audio", "audio", "audio"],
             "domain": ["wiki_en", "forum_en", "speech", "music", "speech"]}
    policy.observe(EvalReport(run_id="run1", step=step, checkpoint_path=path, suite="core", vocab_version="v1",
                              passed=False, details={"checkpoint_wall_time": wall, "items": items,
                                                     "regression": {"findings": findings}}))


def test_a_modality_or_overall_regression_quarantines_only_the_implicated_domains():
    policy = RollbackPolicy()
    for step, wall in ((100, 10.0), (200, 20.0)):
        saved(policy, step, wall, passed=True)
    failed_report(policy, 300, 30.0, [{"metric": "modality/audio", "significant": True, "delta": 0.2},
                                      {"metric": "domain/speech", "significant": False, "delta": 0.1}])
    (rollback,) = policy.decide(regression_alert(), "rollback").controls
    assert rollback.args["domains"] == ["music", "speech"]  # the audio domains of the item table, not all
    failed_report(policy, 310, 31.0, [{"metric": "overall", "significant": True, "delta": 0.1},
                                      {"metric": "domain/forum_en", "significant": False, "delta": 0.3},
                                      {"metric": "domain/wiki_en", "significant": False, "delta": -0.01}])
    other = RollbackPolicy()
    for event in [*policy.checkpoints.values(), *(r for rs in policy.reports.values() for r in rs)]:
        other.observe(event)
    (overall,) = other.decide(regression_alert(saved_at=31.0, step=310), "rollback").controls
    assert overall.args["domains"] == ["forum_en"]  # overall only: the domains that got worse


def test_a_regression_met_while_a_rollback_is_in_flight_is_retried_not_dropped(broker, tmp_path):
    """Rollback 1 is never applied (the trainer was down); meanwhile checkpoint 310 of the same branch
    regresses on another domain. Its alert is pending, not done, and acted on once rollback 1 expires."""
    from evaluators.alerts.dispatch import Dispatcher
    from evaluators.alerts.routing import Route

    now = [time.time() + 2]
    policy = RollbackPolicy(clock=lambda: now[0], pending_s=60)
    history(policy)
    producer = make_producer(KafkaSettings(bootstrap=broker.bootstrap))
    try:
        hook = ControlHook(producer=producer, policy=policy, lineage=LineageLog(tmp_path / "lineage.jsonl"))
        dispatcher = Dispatcher({"control": hook}, sleep=lambda s: None)
        route = Route(hooks=["control"], action="rollback")
        assert dispatcher.dispatch(regression_alert(), route)["control"]["ok"]
        saved(policy, 310, now[0] + 1, passed=False, regressed=("domain/news_de",))
        alert = regression_alert(saved_at=now[0] + 1, step=310)
        result = dispatcher.dispatch(alert, route)["control"]
        assert result == {"ok": False, "pending": True, "error": result["error"]} and "not applied" in result["error"]
        assert not dispatcher.is_done(alert.alert_id)
        now[0] += 61  # rollback 1 never confirmed: no longer blocks
        again = dispatcher.dispatch(alert, route)["control"]
        assert again["ok"] and len(again["controls"]) == 1 and dispatcher.is_done(alert.alert_id)
    finally:
        producer.close()


def test_a_source_no_checkpoint_saw_gets_a_rollback_only_if_the_live_weights_trained_on_it():
    policy = RollbackPolicy()
    path = "/runs/run1/step-10"
    policy.observe(CheckpointSaved(run_id="run1", path=path, step=10, tokens=10, vocab_version="v1", wall_time=10.0,
                                   lineage={"tokens_by_source": {"wiki": 10}}))
    policy.observe(EvalReport(run_id="run1", step=10, checkpoint_path=path, suite="core", vocab_version="v1",
                              passed=True, details={"checkpoint_wall_time": 10.0}))
    alert = Alert(rule="pii_rate_spike", severity="critical", message="pii", source="alert-rules",
                  evidence={"labels": {"source": "leaky"}})
    controls = policy.decide(alert, "quarantine_source_and_rollback").controls
    assert [c.command for c in controls] == ["quarantine_source", "pause_source", "rollback"]  # quarantine first
    assert controls[-1].args == {"target": "step", "run_id": "run1", "checkpoint": path, "step": 10,
                                 "quarantine": "none", "only_if_trained_on": "leaky"}
