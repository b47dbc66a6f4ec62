"""The trainer's control listener obeys commands sent while it was down (within the verifier's
window), and skips, without alerting, those it applied before a restart or that are stale."""

from __future__ import annotations

import time

from kafka import TopicPartition

from streams.events import Alert, Control, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.signing import ControlVerifier, load_signing_key, sign_control
from trainer.control import ControlListener


def rollback(run_id: str, step: int, *, issued_at: float | None = None) -> Control:
    ctl = Control(command="rollback", args={"target": "step", "run_id": run_id, "step": step, "quarantine": "none"},
                  reason="test", **({"issued_at": issued_at} if issued_at is not None else {}))
    return sign_control(ctl, load_signing_key("operator"))


def drain_for(listener: ControlListener, seconds: float) -> list[Control]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += listener.drain()
        listener.check()
        time.sleep(0.05)
    return got


def test_controls_sent_while_the_trainer_was_down_are_obeyed_at_start(fresh_broker):
    settings = KafkaSettings(bootstrap=fresh_broker.bootstrap)
    producer = make_producer(settings)
    stale = rollback("r1", 5, issued_at=time.time() - 200)  # written in the window, issued before it
    applied = rollback("r1", 10)                             # applied before the restart
    missed = rollback("r1", 20)                              # sent while the trainer was down
    for ctl in (stale, applied, missed):
        publish(producer, "control", ctl, key=ctl.command)
    alerts_tp = TopicPartition("alerts", 0)
    alerts = make_consumer(settings, assign=[alerts_tp])
    alerts.seek_to_end(alerts_tp)
    alerts.position(alerts_tp)

    verifier = ControlVerifier.from_env(window_s=120.0)
    verifier.seen[applied.control_id] = applied.issued_at  # what the trainer restores from RUN/control.json
    listener = ControlListener(fresh_broker.bootstrap, verifier=verifier, run_id="r1")
    try:
        got = drain_for(listener, 4.0)
        assert [c.control_id for c in got] == [missed.control_id]
        live = rollback("r1", 30)  # and it keeps listening
        publish(producer, "control", live, key=live.command)
        assert [c.control_id for c in drain_for(listener, 4.0)] == [live.control_id]
    finally:
        listener.close()
    rejected = [e for batch in alerts.poll(timeout_ms=2000).values() for r in batch
                if isinstance(e := decode_event(r.value), Alert) and e.rule == "control.rejected"]
    assert rejected == []  # the catch-up's stale and replayed controls are expected: no page
    alerts.close()
    producer.close()
