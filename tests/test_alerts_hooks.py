"""Hooks on real parts: a local HTTP server for the signed webhook, real subprocesses for commands."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest

from evaluators.alerts.command import CommandError, CommandHook
from evaluators.alerts.dispatch import Dispatcher, HookError, build_hooks
from evaluators.alerts.journal import IdJournal
from evaluators.alerts.receiver import SignedWebhookReceiver
from evaluators.alerts.routing import Route, Router, alert_digest
from evaluators.alerts.rules import RuleError, parse_rules
from evaluators.alerts.webhook import (
    ReplayGuard,
    WebhookError,
    WebhookHook,
    load_secret,
    sign,
    verify_signature,
)
from streams.events import Alert, decode_event

SECRET = b"s3cret-shared"


def make_alert(**kw) -> Alert:
    base = {"rule": "pii_rate_spike", "severity": "critical", "message": "pii_rate=0.4 > 0.03 [source=forum]",
                "source": "alert-rules", "dedup_key": "pii_rate_spike|source=forum",
                "evidence": {"labels": {"source": "forum"}, "action": "quarantine_source"}}
    return Alert(**{**base, **kw})


def Receiver(**kw) -> SignedWebhookReceiver:
    """The package's signed-webhook receiver with this module's shared secret."""
    return SignedWebhookReceiver(SECRET, **kw)


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_webhook_posts_signed_json(receiver):
    alert = make_alert()
    result = WebhookHook(url=receiver.url, secret=SECRET)(alert)
    assert result == {"status": 200, "attempts": 1}
    (got,) = receiver.received
    assert got["valid"] and got["alert"]["alert_id"] == alert.alert_id and got["alert"]["kind"] == "Alert"


def test_webhook_retries_5xx_with_exponential_backoff():
    r = Receiver(fail_first=3)
    try:
        result = WebhookHook(url=r.url, secret=SECRET, retries=4, backoff_s=0.05)(make_alert())
        assert result["attempts"] == 4 and r.received[0]["valid"]
        gaps = [b - a for a, b in zip(r.attempts, r.attempts[1:])]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    finally:
        r.close()


def test_webhook_does_not_retry_a_4xx_and_wrong_secret_is_rejected(receiver):
    with pytest.raises(WebhookError, match="HTTP 401"):
        WebhookHook(url=receiver.url, secret=b"wrong", retries=3, backoff_s=0.01)(make_alert())
    assert len(receiver.attempts) == 1 and receiver.received[0]["valid"] is False


def test_webhook_gives_up_on_unreachable_server():
    r = Receiver()
    url = r.url
    r.close()
    with pytest.raises(WebhookError, match="gave up after 3 attempts"):
        WebhookHook(url=url, secret=SECRET, retries=2, backoff_s=0.01, timeout_s=1)(make_alert())


def test_signature_rejects_tampered_body_and_stale_timestamp():
    ts = f"{time.time():.3f}"
    sig = sign(SECRET, ts, b"{}")
    assert verify_signature(SECRET, ts, b"{}", sig)
    assert not verify_signature(SECRET, ts, b'{"x":1}', sig)
    assert not verify_signature(SECRET, ts, b"{}", sig, now=float(ts) + 3600)


@pytest.mark.parametrize("ts", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_signature_rejects_non_finite_timestamps_even_when_signed(ts):
    assert not verify_signature(SECRET, ts, b"{}", sign(SECRET, ts, b"{}"))


def test_receiver_rejects_a_replayed_post_and_the_hook_takes_409_as_delivered(receiver):
    import urllib.error
    import urllib.request

    alert = make_alert()
    assert WebhookHook(url=receiver.url, secret=SECRET)(alert) == {"status": 200, "attempts": 1}
    # an attacker (or a retry whose first answer was lost) sends the same alert again, freshly signed
    assert WebhookHook(url=receiver.url, secret=SECRET)(alert)["duplicate"] is True
    # a captured request replayed byte for byte within the window
    body = alert.to_bytes()
    ts = f"{time.time():.3f}"
    req = urllib.request.Request(receiver.url, data=body, method="POST", headers={
        "X-Headwater-Timestamp": ts, "X-Headwater-Signature": sign(SECRET, ts, body)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 409
    assert len(receiver.received) == 1 and receiver.rejected == ["replay", "replay"]


def test_command_hook_refuses_alert_text_where_it_could_become_an_option(tmp_path):
    for argv in (["prog", "{rule}"], ["prog", "--rule", "{rule}", "--"], ["prog", "{source}x"]):
        with pytest.raises(ValueError, match="option"):
            CommandHook(argv=argv)
    out = tmp_path / "out.json"
    script = "import json,sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))"
    CommandHook(argv=[sys.executable, "-c", script, str(out), "--", "{rule}"])(make_alert(rule="--config=/etc/x"))
    assert json.loads(out.read_text()) == [str(out), "--", "--config=/etc/x"]  # a positional after '--'


def test_replay_guard_remembers_accepted_ids_across_a_restart(tmp_path):
    body = make_alert().to_bytes()
    ts = f"{time.time():.3f}"
    first = ReplayGuard(SECRET, journal_path=tmp_path / "seen.jsonl")
    assert first.check(ts, body, sign(SECRET, ts, body)) == "ok"
    restarted = ReplayGuard(SECRET, journal_path=tmp_path / "seen.jsonl")  # the receiver restarted
    ts2 = f"{time.time():.3f}"
    assert restarted.check(ts2, body, sign(SECRET, ts2, body)) == "replay"
    assert ReplayGuard(SECRET).check(ts2, body, sign(SECRET, ts2, body)) == "ok"  # memory only: replay accepted


def test_replay_guard_window_and_bad_bodies():
    guard = ReplayGuard(SECRET, max_age_s=10)
    body = make_alert().to_bytes()
    assert guard.check("100.0", body, sign(SECRET, "100.0", body), now=101) == "ok"
    assert guard.check("102.0", body, sign(SECRET, "102.0", body), now=103) == "replay"
    assert guard.check("100.0", body, sign(SECRET, "100.0", body), now=200) == "invalid"  # stale
    assert guard.check("nan", body, sign(SECRET, "nan", body), now=101) == "invalid"
    assert guard.check("101.0", b"[1]", sign(SECRET, "101.0", b"[1]"), now=101) == "invalid"  # no alert id


def test_secret_from_env_or_file(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    assert load_secret(file=str(f)) == b"from-file"
    monkeypatch.setenv("HW_TEST_SECRET", "from-env")
    assert load_secret(env="HW_TEST_SECRET", file=str(f)) == b"from-env"
    monkeypatch.delenv("HW_TEST_SECRET")
    with pytest.raises(WebhookError, match="HW_TEST_SECRET"):
        load_secret(env="HW_TEST_SECRET")


def test_command_hook_gets_alert_on_stdin_and_fields_stay_single_arguments(tmp_path):
    out = tmp_path / "out.json"
    script = ("import json,os,sys; json.dump({'argv': sys.argv[1:], 'stdin': json.load(sys.stdin), "
              "'env': os.environ['HEADWATER_ALERT_RULE']}, open(sys.argv[1], 'w'))")
    evil = "x; touch " + str(tmp_path / "pwned") + " $(id) {severity}"
    hook = CommandHook(argv=[sys.executable, "-c", script, str(out), "--rule={rule}", "--", "{severity}"])
    hook(make_alert(rule=evil))
    got = json.loads(out.read_text())
    assert got["argv"] == [str(out), f"--rule={evil}", "--", "critical"]
    assert got["stdin"]["rule"] == evil and got["env"] == evil
    assert not (tmp_path / "pwned").exists()


def test_command_hook_gets_a_minimal_environment_plus_its_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADWATER_WEBHOOK_SECRET", "do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    monkeypatch.setenv("PAGER_TOKEN", "pager")
    out = tmp_path / "env.json"
    script = "import json,os,sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    CommandHook(argv=[sys.executable, "-c", script, str(out)], env=["PAGER_TOKEN"])(make_alert())
    env = json.loads(out.read_text())
    assert "HEADWATER_WEBHOOK_SECRET" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["PAGER_TOKEN"] == "pager" and env["HEADWATER_ALERT_RULE"] == "pii_rate_spike"
    extra = set(env) - {"PATH", "LANG", "PAGER_TOKEN"} - {k for k in env if k.startswith("HEADWATER_ALERT_")}
    assert extra <= {"LC_CTYPE", "PWD", "SHLVL", "_", "__CF_USER_TEXT_ENCODING"}  # set by the OS/python itself
    with pytest.raises(ValueError, match="env must be a list"):
        CommandHook(argv=["true"], env="PAGER_TOKEN")


def test_command_hook_reports_failure_and_rejects_bad_argv():
    with pytest.raises(CommandError, match="exit 3"):
        CommandHook(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])(make_alert())
    with pytest.raises(ValueError, match="non-empty list of strings"):
        CommandHook(argv="echo {rule}")  # a shell string is refused


def test_dispatcher_isolates_failing_hooks_and_marks_done_only_after_all_succeed(receiver, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode())
    flag = tmp_path / "healthy"
    doc = {"hooks": {
        "webhook": {"type": "webhook", "url": receiver.url, "secret_file": str(secret_file)},
        "flaky": {"type": "command", "argv": [sys.executable, "-c",
                                               f"import os,sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)"]},
    }}
    sleeps: list[float] = []
    dispatcher = Dispatcher(build_hooks(doc), retries=2, backoff_s=0.5, sleep=sleeps.append)
    alert, route = make_alert(), Route(hooks=["flaky", "webhook"])
    results = dispatcher.dispatch(alert, route)
    assert results["flaky"] == {"ok": False, "error": results["flaky"]["error"], "attempts": 3}
    assert "exit 1" in results["flaky"]["error"] and sleeps == [0.5, 1.0]  # bounded, exponential
    assert results["webhook"]["ok"] is True and receiver.received[0]["valid"]
    assert not dispatcher.is_done(alert.alert_id)
    flag.touch()
    again = dispatcher.dispatch(alert, route)  # only the failed hook runs again
    assert set(again) == {"flaky"} and again["flaky"]["ok"] and dispatcher.is_done(alert.alert_id)
    assert dispatcher.dispatch(alert, route) == {}  # redelivered alert (same id) is not sent again
    assert len(receiver.received) == 1
    # an alert naming its own hooks gets no say: the route decides
    named = make_alert(evidence={"hooks": ["flaky", "nope"]})
    assert set(dispatcher.dispatch(named, Route(hooks=["webhook"]))) == {"webhook"}


RULES_DOC = {
    "dispatch": {"default_hooks": ["webhook", "control"]},
    "actions": {"eval_regression": ["rollback"]},
    "rule": [{"name": "pii_rate_spike", "metric": "pii_rate", "kind": "threshold", "threshold": 0.5,
              "component": "ingest", "group_by": ["source"], "action": "quarantine_source", "hooks": ["webhook", "control"]},
             {"name": "lag", "metric": "consumer_lag", "kind": "threshold", "threshold": 1}],
}


def test_routes_come_from_the_rules_never_from_the_alert():
    router = Router(RULES_DOC, parse_rules(RULES_DOC), control_hooks={"control"}, declared={"webhook", "control"})
    # raised by our engine: the rule's action and hooks, whatever the evidence says
    ours = make_alert(evidence={"action": "quarantine_source_and_rollback", "hooks": ["webhook"]})
    assert router.for_raised(ours) == Route(hooks=["webhook", "control"], action="quarantine_source")
    assert router.for_raised(make_alert(rule="lag")) == Route(hooks=["webhook"], action="none")
    # the same rule name from anyone else (e.g. forged on `alerts`): no control
    assert router.for_external(ours) == Route(hooks=["webhook"], action="none")
    # an unknown rule choosing its action and hooks: default hooks without control
    evil = make_alert(rule="my.rule", evidence={"action": "rollback", "hooks": ["control"]})
    assert router.for_external(evil) == Route(hooks=["webhook"], action="none")
    # a granted rule gets the granted action only
    reg = make_alert(rule="eval_regression", evidence={"action": "rollback"})
    assert router.for_external(reg) == Route(hooks=["webhook", "control"], action="rollback")
    other = make_alert(rule="eval_regression", evidence={"action": "quarantine_source"})
    assert router.for_external(other) == Route(hooks=["webhook"], action="none")


def test_a_borrowed_raised_alert_id_with_other_content_is_an_external_alert(tmp_path):
    """Anyone reading `alerts` learns the ids the sentinel raised; reusing one for another rule,
    labels, evidence or message must not get the raised alert's route (evaluators/sentinel.py)."""
    router = Router(RULES_DOC, parse_rules(RULES_DOC), control_hooks={"control"}, declared={"webhook", "control"})
    raised = IdJournal(tmp_path / "raised.jsonl")
    lag = make_alert(rule="lag", severity="warning", evidence={"labels": {}})  # a harmless alert it raised
    pii = make_alert()  # and one that acts
    for a in (lag, pii):
        raised.add(a.alert_id, rule=a.rule, digest=alert_digest(a))
    raised = IdJournal(tmp_path / "raised.jsonl")  # as after a restart
    wire = decode_event(pii.to_bytes())  # the very alert, read back from Kafka
    assert router.route(wire, raised.get(wire.alert_id)) == Route(hooks=["webhook", "control"],
                                                                   action="quarantine_source")
    borrowed = [
        dataclasses.replace(lag, rule="pii_rate_spike", evidence={"labels": {"source": "victim"}}),
        dataclasses.replace(pii, evidence={**pii.evidence, "labels": {"source": "victim"}}),
        dataclasses.replace(pii, message="other"),
        dataclasses.replace(pii, severity="warning"),
    ]
    for forged in borrowed:
        assert router.route(forged, raised.get(forged.alert_id)) == Route(hooks=["webhook"], action="none")


def test_id_journal_is_bounded_by_age_and_count_and_survives_restarts(tmp_path):
    clock = [1000.0]
    path = tmp_path / "ids.jsonl"
    journal = IdJournal(path, max_entries=1500, max_age_s=100, clock=lambda: clock[0])
    for i in range(5000):
        journal.add(f"a{i}", digest=str(i))
    assert len(journal) == 1500 and "a4999" in journal and "a3499" not in journal
    assert len(path.read_text().splitlines()) <= 3000  # compacted, never grows without bound
    clock[0] += 50
    journal.add("late")
    clock[0] += 60  # everything but "late" is older than 100 s
    again = IdJournal(path, max_entries=1500, max_age_s=100, clock=lambda: clock[0])
    assert list(again.entries) == ["late"] and len(path.read_text().splitlines()) == 1
    with open(path, "a") as f:
        f.write('{"id": "torn", "at"')  # a crash mid-line
    assert list(IdJournal(path, max_age_s=100, clock=lambda: clock[0]).entries) == ["late"]


def test_alerts_done_survive_a_dispatcher_restart(tmp_path):
    calls = []
    hooks = {"h": lambda alert, action: calls.append(alert.alert_id) or {}}
    alert = make_alert()
    Dispatcher(hooks, journal=IdJournal(tmp_path / "done.jsonl")).dispatch(alert, Route(hooks=["h"]))
    restarted = Dispatcher(hooks, journal=IdJournal(tmp_path / "done.jsonl"))
    assert restarted.is_done(alert.alert_id) and restarted.dispatch(alert, Route(hooks=["h"])) == {}
    assert calls == [alert.alert_id]


def test_trainer_alerts_can_never_be_granted_a_control_action():
    doc = {**RULES_DOC, "actions": {"trainer.loss_guard": ["rollback"]}}
    with pytest.raises(RuleError, match="trainer alerts can never"):
        Router(doc, [], control_hooks={"control"}, declared={"webhook", "control"})
    with pytest.raises(RuleError, match="unknown action"):
        Router({"actions": {"x": ["nuke"]}}, [], control_hooks=set(), declared=set())
    with pytest.raises(RuleError, match="undeclared hook"):
        Router(RULES_DOC, parse_rules(RULES_DOC), control_hooks=set(), declared={"webhook"})
    router = Router(RULES_DOC, [], control_hooks={"control"}, declared={"webhook", "control"})
    forged = make_alert(rule="trainer.rollback", source="evaluator", evidence={"action": "rollback"})
    assert router.for_external(forged).action == "none"


def test_build_hooks_errors_are_clear():
    with pytest.raises(HookError, match="unknown type"):
        build_hooks({"hooks": {"x": {"type": "pigeon"}}})
    with pytest.raises(HookError, match="needs a Kafka producer"):
        build_hooks({"hooks": {"control": {}}})


def test_the_shipped_rules_grant_only_the_corroborated_eval_rollback():
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "infra/alerts/rules.toml").read_text())
    router = Router(doc, parse_rules(doc), control_hooks={"control"}, declared=set(doc["hooks"]))
    assert router.grants == {"eval_regression": ("rollback",)}
    media = make_alert(rule="codebook_collapse", evidence={"action": "pause_domain", "labels": {"domain": "img"}})
    assert router.for_external(media).action == "none"  # ingest's own alert pages; the engine rule acts
    assert router.for_raised(media).action == "pause_domain"
