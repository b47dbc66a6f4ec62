"""Hooks on real parts: a local HTTP server for the signed webhook, real subprocesses for commands."""

from __future__ import annotations

import json
import sys
import time

import pytest

from evaluators.alerts.command import CommandError, CommandHook
from evaluators.alerts.dispatch import Dispatcher, HookError, build_hooks
from evaluators.alerts.receiver import SignedWebhookReceiver
from evaluators.alerts.webhook import (
    WebhookError,
    WebhookHook,
    load_secret,
    verify_signature,
)
from streams.events import Alert

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
    from evaluators.alerts.webhook import sign
    ts = f"{time.time():.3f}"
    sig = sign(SECRET, ts, b"{}")
    assert verify_signature(SECRET, ts, b"{}", sig)
    assert not verify_signature(SECRET, ts, b'{"x":1}', sig)
    assert not verify_signature(SECRET, ts, b"{}", sig, now=float(ts) + 3600)


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
    hook = CommandHook(argv=[sys.executable, "-c", script, str(out), "--rule={rule}", "{severity}"])
    hook(make_alert(rule=evil))
    got = json.loads(out.read_text())
    assert got["argv"] == [str(out), f"--rule={evil}", "critical"]
    assert got["stdin"]["rule"] == evil and got["env"] == evil
    assert not (tmp_path / "pwned").exists()


def test_command_hook_reports_failure_and_rejects_bad_argv():
    with pytest.raises(CommandError, match="exit 3"):
        CommandHook(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])(make_alert())
    with pytest.raises(ValueError, match="non-empty list of strings"):
        CommandHook(argv="echo {rule}")  # a shell string is refused


def test_dispatcher_delivers_once_and_isolates_failing_hooks(receiver, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode())
    doc = {"hooks": {
        "webhook": {"type": "webhook", "url": receiver.url, "secret_file": str(secret_file)},
        "broken": {"type": "command", "argv": ["false"]},
    }}
    dispatcher = Dispatcher(build_hooks(doc), default_hooks=["broken", "webhook"])
    alert = make_alert()
    results = dispatcher.dispatch(alert)
    assert results["broken"]["ok"] is False and "exit 1" in results["broken"]["error"]
    assert results["webhook"]["ok"] is True and receiver.received[0]["valid"]
    assert dispatcher.dispatch(alert) == {}  # redelivered alert (same id) is not sent again
    assert len(receiver.received) == 1
    named = make_alert(evidence={"hooks": ["webhook", "nope"]})
    res = dispatcher.dispatch(named)
    assert res["nope"]["ok"] is False and res["webhook"]["ok"]


def test_build_hooks_errors_are_clear():
    with pytest.raises(HookError, match="unknown type"):
        build_hooks({"hooks": {"x": {"type": "pigeon"}}})
    with pytest.raises(HookError, match="needs a Kafka producer"):
        build_hooks({"hooks": {"control": {}}})
    with pytest.raises(HookError, match="undeclared"):
        Dispatcher({}, default_hooks=["webhook"])
