"""Control topic: forged rollbacks published straight to ``control`` are ignored and alerted
(``control.rejected``); a rollback sent by ``headwater control rollback`` restores the checkpoint
(the replayed steps match exactly); checkpoints are announced on the ``checkpoints`` topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kafka import TopicPartition

from streams.events import Alert, CheckpointSaved, Control, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records, publish
from streams.signing import generate_keypair, load_signing_key, sign_control
from trainer.runs import read_metrics, train_argv
from trainer.synthetic import write_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(pred, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def last_step(run):
    try:
        return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_rollback_control_restores_checkpoint(tmp_path, broker):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov", "counting": "counting"}, shards=10, per_shard=200, vocab=512)
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    ckpts = make_consumer(settings, assign=[TopicPartition("checkpoints", 0)])
    ckpts.seek_to_end(TopicPartition("checkpoints", 0))
    ckpts.position(TopicPartition("checkpoints", 0))
    alerts_tp = TopicPartition("alerts", 0)
    alert_feed = make_consumer(settings, assign=[alerts_tp])
    alert_feed.seek_to_end(alerts_tp)
    alert_feed.position(alerts_tp)

    cmd = train_argv([stream], run, "--nproc", "2", "--vocab-size", "512", "--no-wandb", "--steps", "300",
                     "--checkpoint-every", "10", "--bootstrap", broker.bootstrap)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(run, "checkpoints", "step-10", "headwater.json"))
                 and last_step(run) >= 14, 240, proc)
        with open(os.path.join(run, "run.json")) as f:
            run_id = json.load(f)["run_id"]
        args = {"target": "step", "run_id": run_id, "step": 10, "quarantine": "none"}
        operator = load_signing_key("operator")
        forged = [
            Control(command="rollback", args=args, reason="forged", issued_by=operator.key_id),  # unsigned
            sign_control(Control(command="rollback", args=args), generate_keypair(operator.key_id, "operator")),
            sign_control(Control(command="rollback", args={"target": "step", "step": 10}), operator),  # no run
        ]
        producer = make_producer(settings)
        for control in forged:
            publish(producer, "control", control)
        producer.close()
        ids = {c.control_id for c in forged}
        rejected = {}
        for record in poll_records(alert_feed, timeout_s=60, until=lambda _: len(rejected) == len(forged)):
            alert = decode_event(record.value)
            if isinstance(alert, Alert) and alert.evidence.get("control_id") in ids:
                rejected[alert.evidence["control_id"]] = alert
        assert sorted(a.evidence["reason"] for a in rejected.values()) == ["bad_signature", "no_run", "unsigned"]
        assert {(a.rule, a.severity, a.evidence["consumer"]) for a in rejected.values()} == {
            ("control.rejected", "critical", "trainer")}
        sent = subprocess.run([sys.executable, "-m", "infra.cli", "control", "rollback", "--bootstrap", broker.bootstrap,
                               "--run-id", run_id, "--step", "10", "--reason", "operator test"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["key_id"] == operator.key_id
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    records = read_metrics(run)
    events = [r for r in records if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["to_step"] == 10 and events[0]["from_step"] >= 14  # only the CLI's
    assert "operator test" in events[0]["reason"]
    cut = records.index(events[0])
    before = {r["step"]: r["loss"] for r in records[:cut] if "loss" in r}
    after = {r["step"]: r["loss"] for r in records[cut:] if "loss" in r}
    assert min(after) == 11
    # the restored checkpoint (model, optimizer, data cursor, mixer) replays the same steps exactly
    for step in range(11, events[0]["from_step"] + 1):
        assert after[step] == before[step], step
    with open(os.path.join(run, "alerts.jsonl")) as f:
        alerts = [json.loads(line) for line in f]
    assert any(a["rule"] == "trainer.rollback" for a in alerts)

    saved = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e.step == 300 for e in saved):
        for batch in ckpts.poll(timeout_ms=500).values():
            saved += [decode_event(r.value) for r in batch]
    ckpts.close()
    alert_feed.close()
    assert all(isinstance(e, CheckpointSaved) for e in saved)
    assert {10, 20, 300} <= {e.step for e in saved}
    final = next(e for e in saved if e.step == 300)
    assert os.path.exists(os.path.join(final.path, "headwater.json"))  # older ones purged (keep_latest_k)
    assert final.data_cursor["roots"] == [stream] and final.vocab_version


@pytest.mark.slow
def test_trainer_refuses_to_start_without_a_keyring(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=50, vocab=512)
    cmd = train_argv([stream], run, "--nproc", "1", "--vocab-size", "512", "--no-wandb", "--steps", "5",
                     "--bootstrap", "127.0.0.1:1")
    env = {k: v for k, v in os.environ.items() if k != "HEADWATER_KEYRING_FILE"} | {"PYTHONPATH": ROOT}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "HEADWATER_KEYRING_FILE" in done.stdout + done.stderr
    assert last_step(run) == 0
