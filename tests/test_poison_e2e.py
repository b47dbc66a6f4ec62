"""The circuit breaker end to end, on real parts (issue 7's "done when").

A private tansu broker; a writer process appending a live MDS stream; the trainer under
torchrun (2 CPU ranks, FSDP2); ``headwater evaluate`` and ``headwater evaluate --role
sentinel`` processes; a local HTTP server receiving the signed webhooks.

* Model path: a poisoned domain (countdown sequences whose labels contradict the clean
  counting domain, at 0.8 weight) lands in the stream after the first good checkpoints ->
  the evaluator's bootstrap test flags the next checkpoint -> Alert -> signed webhook +
  ``rollback last_good`` Control -> the trainer restores that checkpoint, quarantines what it
  read since, and trains on; no quarantined shard is trained again and the re-saved
  checkpoints pass evaluation.
* Data path: a PII-rate spike of one source on the ``metrics.ingest`` topic -> rule alert ->
  ``quarantine_source`` Control -> the trainer never trains that source's samples again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_alerts_hooks import SECRET, Receiver
from test_alerts_sentinel import RULES

from evaluators.alerts.rules import load_rules
from streams.events import Alert, Control, EvalReport, MetricsEvent, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.mds import LiveStreamWriter
from streams.vocab import Vocab
from trainer.runs import read_metrics, train_argv
from trainer.synthetic import synthetic_docs, write_stream

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # small synthetic vocabulary: the debug model learns counting in ~30 steps

# Appends clean shards every second until DIR/stop exists; injects the poison once DIR/poison exists.
WRITER = """
import json, os, sys, time
from trainer.synthetic import write_stream
root, flags, vocab, sources = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
shard, poisoned = 100, False
while not os.path.exists(os.path.join(flags, "stop")):
    for i, source in enumerate(sources):
        write_stream(root, domains={"counting": "counting"}, shards=1, per_shard=60, vocab=vocab, seed=1 + i,
                     start_shard=shard, writer_id=f"clean{i}", source=source)
    shard += 1
    if not poisoned and os.path.exists(os.path.join(flags, "poison")):
        names = write_stream(root, domains={"poison": "countdown"}, shards=3, per_shard=150, vocab=vocab,
                             seed=9, writer_id="poisoner", source="scraper:bad")
        with open(os.path.join(flags, "poisoned.json.tmp"), "w") as f:
            json.dump(names, f)
        os.replace(os.path.join(flags, "poisoned.json.tmp"), os.path.join(flags, "poisoned.json"))
        poisoned = True
    time.sleep(1.0)
"""


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline",
                HEADWATER_WEBHOOK_SECRET=SECRET.decode())


class Topic:
    """Incremental reader of one topic from its beginning (decoded events)."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), topics=[topic],
                                      group_id=f"test-{uuid.uuid4().hex}")
        self.events: list = []

    def poll(self) -> list:
        for batch in self.consumer.poll(timeout_ms=100).values():
            self.events += [decode_event(r.value) for r in batch]
        return self.events

    def poll_until(self, pred, timeout_s: float = 30) -> list:
        """Events once ``pred(events)`` holds (or after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not pred(self.poll()) and time.monotonic() < deadline:
            pass
        return self.events

    def close(self) -> None:
        self.consumer.close()


class Processes:
    """Child processes (each in its own session), stopped with SIGTERM then SIGKILL."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as out:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return self.procs[name]

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"{name} exited with {p.returncode}:\n{tail}")

    def stop(self, name: str, timeout_s: float = 20) -> None:
        p = self.procs.pop(name)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def wait_for(pred, timeout_s: float, procs: Processes, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        procs.check_alive()
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def metrics(run: Path) -> list[dict]:
    try:
        return read_metrics(str(run))
    except FileNotFoundError:
        return []


def passed_steps(reports: list, *, at_least: int) -> list[int] | None:
    steps = [r.step for r in reports if r.passed and r.error is None]
    return steps if len(steps) >= at_least else None


def write_eval_suite(eval_root: Path) -> None:
    """Held-out clean counting items, tokenized in the unified vocabulary's id space."""
    items = [{"id": f"heldout-{i}", "domain": "counting", "modality": "text", "tokens": t, "source": "heldout",
              "license": "cc0", "pipeline_version": "synthetic", "language": "", "produced_at": 0.0}
             for i, t in enumerate(synthetic_docs("counting", n=24, vocab=VOCAB, seed=777))]
    with LiveStreamWriter(eval_root / "core", writer_id="evalset",
                          manifest={"vocab_version": Vocab.default().version}) as w:
        w.write_shard(items, domain="counting")


def start_services(procs: Processes, bootstrap: str, tmp: Path, receiver: Receiver, run: Path) -> None:
    secret = tmp / "secret"
    secret.write_text(SECRET.decode())
    rules = tmp / "rules.toml"
    rules.write_text(RULES.format(url=receiver.url, secret=secret))
    cli = [sys.executable, "-m", "infra.cli", "evaluate", "--bootstrap", bootstrap]
    procs.start("sentinel", [*cli, "--role", "sentinel", "--instance", "sentinel", "--rules", str(rules), "--lineage", str(run / "lineage.jsonl")])
    if (tmp / "evals").exists():
        procs.start("evaluator", [*cli, "--eval-root", str(tmp / "evals"), "--suite", "core", "--n-boot", "500",
                                  "--checkpoint-root", str(run / "checkpoints"),
                                  "--wandb", "disabled", "--instance", "ev1"])


def start_trainer(procs: Processes, bootstrap: str, stream: Path, run: Path, *extra: str) -> None:
    procs.start("trainer", train_argv(
        [str(stream)], str(run), "--nproc", "2", "--vocab-size", str(VOCAB), "--no-wandb", "--steps", "400",
        "--checkpoint-every", "10", "--bootstrap", bootstrap, "--checkpoint.keep_latest_k", "0",
        "--dataloader.starve_timeout_s", "2", *extra))


@pytest.mark.slow
def test_poisoned_domain_is_rolled_back_and_quarantined_end_to_end(fresh_broker, tmp_path):
    bootstrap, stream, run, flags = fresh_broker.bootstrap, tmp_path / "stream", tmp_path / "run", tmp_path / "flags"
    flags.mkdir()
    write_stream(str(stream), domains={"counting": "counting"}, shards=6, per_shard=100, vocab=VOCAB,
                 writer_id="clean0", source="site:clean")
    write_eval_suite(tmp_path / "evals")
    receiver = Receiver()
    procs = Processes(tmp_path)
    evals, controls, metric_events = (Topic(bootstrap, t) for t in ("evals", "control", "metrics.trainer"))
    t0 = time.monotonic()
    try:
        start_services(procs, bootstrap, tmp_path, receiver, run)
        procs.start("writer", [sys.executable, "-c", WRITER, str(stream), str(flags), str(VOCAB), "site:clean"])
        # the clean domain gets 0.2 of the mix once another domain appears. The trainer's own loss
        # guard would catch this blatant poison first (3 spikes -> automatic rollback): it is off
        # here, standing in for a subtle poison that only the held-out evaluation sees.
        start_trainer(procs, bootstrap, stream, run, "--dataloader.mixing.weights", "counting", "0.2",
                      "--headwater.guard.z_threshold", "1e9")

        # 1. two good checkpoints evaluated, then the poison lands in the live stream
        passed = wait_for(lambda: passed_steps(evals.poll(), at_least=2), 150, procs, "two passed eval reports")
        (flags / "poison").touch()
        poison = set(wait_for(lambda: (flags / "poisoned.json").exists() and json.loads(
            (flags / "poisoned.json").read_text()), 30, procs, "the poison shards"))
        poisoned_at = max(r["step"] for r in metrics(run) if "loss" in r)

        # 2. regression -> alert -> rollback applied by the trainer
        rollback = wait_for(lambda: next((r for r in metrics(run) if r.get("event") == "rollback"), None),
                            150, procs, "the trainer's rollback")
        # 3. it trains on, and a checkpoint saved after the rollback is evaluated and passes
        wait_for(lambda: [r for r in evals.poll() if r.passed and r.details.get("checkpoint_wall_time", 0)
                          > rollback["wall_time"]], 120, procs, "a passing checkpoint after the rollback")
        rows = metrics(run)
        procs.stop("trainer")
    finally:
        (flags / "stop").touch()
        procs.stop_all()
        receiver.close()
    elapsed = time.monotonic() - t0
    reports = evals.poll()
    issued = controls.poll_until(lambda ev: any(getattr(c, "command", "") == "rollback" for c in ev))
    trainer_metrics = metric_events.poll_until(lambda ev: len(ev) >= len([r for r in rows if "loss" in r]))
    for t in (evals, controls, metric_events):
        t.close()

    # the regression: a failed report after the poison, significant against the last good one
    assert min(passed) >= 10 and poisoned_at >= min(passed)
    failed = [r for r in reports if isinstance(r, EvalReport) and not r.passed and r.error is None]
    assert failed, [r.error for r in reports]
    worst = failed[0].details["regression"]
    assert any(f["significant"] and f["delta"] > 0.1 for f in worst["findings"]), worst
    # the signed webhook carried the regression alert
    hooks = [r for r in receiver.received if r["alert"]["rule"] == "eval_regression"]
    assert hooks and all(r["valid"] for r in receiver.received)
    alert_to_rollback_s = rollback["wall_time"] - hooks[0]["alert"]["created_at"]
    assert 0 < alert_to_rollback_s < 30  # issue 7's target: alert -> rollback completed <= 30 s
    # one rollback Control, to the last checkpoint whose report passed
    rollbacks = [c for c in issued if isinstance(c, Control) and c.command == "rollback"]
    assert len(rollbacks) == 1, [c.args for c in rollbacks]
    good_step = rollbacks[0].args["step"]
    good = {r.step for r in reports if r.passed and r.details["checkpoint_wall_time"] < rollbacks[0].issued_at}
    assert rollbacks[0].args["target"] == "last_good" and good_step == max(good)
    assert rollback["to_step"] == good_step and rollback["from_step"] >= failed[0].step > good_step
    assert list((run / "checkpoints" / "abandoned").iterdir()), "abandoned checkpoints were not moved aside"
    # checkpoints of the abandoned branch that were not evaluated yet give error reports, nothing else
    assert all(r.step > good_step for r in reports if r.error is not None)

    # the poison was trained before the rollback; every poison shard trained or read is quarantined
    cut = rows.index(rollback)
    before, after = rows[:cut], [r for r in rows[cut + 1:] if "loss" in r]
    trained_poison = {s for r in before if "loss" in r for s in r["shards"] if s in poison}
    assert trained_poison and trained_poison <= set(rollback["quarantined_shards"])
    assert poison <= set(json.loads((run / "quarantine.json").read_text())["shards"])
    # after it, steps continue from the restored checkpoint and never touch a quarantined shard
    assert after[0]["step"] == good_step + 1 and after[-1]["step"] >= good_step + 10
    quarantined = set(rollback["quarantined_shards"])
    assert all(not quarantined & set(r["shards"]) for r in after)
    assert all("poison" not in r["domain_tokens"] or r["domain_tokens"]["poison"] == 0 for r in after)
    # lineage recorded the decision with its reason
    lineage = [json.loads(line) for line in (run / "lineage.jsonl").read_text().splitlines()]
    assert any(e["action"] == "rollback" and "eval_regression" in e["reason"] for e in lineage)
    # the trainer's metrics on the topic carry what infra/alerts/rules.toml reads
    last = [m for m in trainer_metrics if isinstance(m, MetricsEvent) and m.component == "trainer"][-1]
    assert last.labels["run_id"] == rollbacks[0].args["run_id"]
    for rule in load_rules(ROOT / "infra/alerts/rules.toml"):
        if rule.component == "trainer":
            assert rule.metric in last.values and set(rule.group_by) <= set(last.labels), rule.name
    print(f"poison e2e: poisoned at step {poisoned_at}, regression at step {failed[0].step}, rolled back "
          f"{rollback['from_step']} -> {good_step} {alert_to_rollback_s:.2f}s after the alert, "
          f"{len(quarantined)} shards quarantined, scenario {elapsed:.0f}s")


@pytest.mark.slow
def test_pii_spike_of_a_source_quarantines_it_in_the_trainer(fresh_broker, tmp_path):
    bootstrap, stream, run, flags = fresh_broker.bootstrap, tmp_path / "stream", tmp_path / "run", tmp_path / "flags"
    flags.mkdir()
    for i, source in enumerate(("site:clean", "site:leaky")):
        write_stream(str(stream), domains={"counting": "counting"}, shards=3, per_shard=100, vocab=VOCAB,
                     writer_id=f"clean{i}", source=source, seed=i)
    receiver = Receiver()
    procs = Processes(tmp_path)
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    alerts = Topic(bootstrap, "alerts")
    try:
        start_services(procs, bootstrap, tmp_path, receiver, run)
        procs.start("writer", [sys.executable, "-c", WRITER, str(stream), str(flags), str(VOCAB),
                               "site:clean,site:leaky"])
        start_trainer(procs, bootstrap, stream, run)
        wait_for(lambda: any("site:leaky" in r.get("sources", {}) for r in metrics(run) if r.get("step", 0) >= 5),
                 150, procs, "the trainer training on both sources")
        for value in (0.01, 0.012, 0.009, 0.011, 0.4):  # the ingest job's per-source PII rate
            publish(producer, "metrics.ingest", MetricsEvent(component="ingest", values={"pii_rate": value},
                                                      labels={"source": "site:leaky"}))
        event = wait_for(lambda: next((r for r in metrics(run) if r.get("event") == "quarantine"), None),
                         60, procs, "the trainer's quarantine of the source")
        wait_for(lambda: max(r["step"] for r in metrics(run) if "loss" in r) >= event["step"] + 10, 60, procs,
                 "ten steps after the quarantine")
        rows = metrics(run)
    finally:
        (flags / "stop").touch()
        procs.stop_all()
        producer.close()
        receiver.close()
    fired = [a for a in alerts.poll_until(lambda ev: any(getattr(a, "rule", "") == "pii_rate_spike" for a in ev))
             if isinstance(a, Alert) and a.rule == "pii_rate_spike"]
    alerts.close()
    assert len(fired) == 1 and fired[0].evidence["labels"] == {"source": "site:leaky"}
    assert event["sources"] == ["site:leaky"] and "pii_rate_spike" in event["reason"]
    assert json.loads((run / "quarantine.json").read_text())["sources"].keys() == {"site:leaky"}
    cut = rows.index(event)
    steps_before = [r for r in rows[:cut] if "loss" in r]
    steps_after = [r for r in rows[cut + 1:] if "loss" in r]
    assert sum(r["sources"].get("site:leaky", 0) for r in steps_before) > 0
    assert len(steps_after) >= 10
    assert all(r["sources"].get("site:leaky", 0) == 0 for r in steps_after)  # buffered ones dropped too
    assert np.mean([r["sources"].get("site:clean", 0) for r in steps_after]) > 0
    assert any(r["alert"]["rule"] == "pii_rate_spike" and r["valid"] for r in receiver.received)
