"""Control topic: a rollback command restores the checkpoint (the replayed steps match exactly);
checkpoints are announced on the ``checkpoints`` topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from kafka import TopicPartition

from streams.events import CheckpointSaved, Control, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
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

    cmd = train_argv([stream], run, "--nproc", "2", "--vocab-size", "512", "--no-wandb", "--steps", "300",
                     "--checkpoint-every", "10", "--bootstrap", broker.bootstrap)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(run, "checkpoints", "step-10", "headwater.json"))
                 and last_step(run) >= 14, 240, proc)
        producer = make_producer(settings)
        publish(producer, "control", Control(command="rollback", args={"target": "step", "step": 10, "quarantine": "none"}, reason="test"))
        producer.close()
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    records = read_metrics(run)
    events = [r for r in records if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["to_step"] == 10 and events[0]["from_step"] >= 14
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
    assert all(isinstance(e, CheckpointSaved) for e in saved)
    assert {10, 20, 300} <= {e.step for e in saved}
    final = next(e for e in saved if e.step == 300)
    assert os.path.exists(os.path.join(final.path, "headwater.json"))  # older ones purged (keep_latest_k)
    assert final.data_cursor["roots"] == [stream] and final.vocab_version
