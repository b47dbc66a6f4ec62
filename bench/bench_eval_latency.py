"""Evaluator latencies on CPU, each with a baseline measured in the same run.

1. checkpoint -> EvalReport: CheckpointSaved published -> EvalReport on `evals` for the
   trainer's debug model on a 27-item suite; baseline = loading + scoring alone (no Kafka).
2. alert -> rollback: regression Alert published -> `rollback` Control on `control` through the
   sentinel; baseline = a bare Kafka publish -> consume round trip.

    .venv/bin/python bench/bench_eval_latency.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch
from test_eval_service import save_checkpoint, write_suite

from evaluators.checkpoint import load_checkpoint
from evaluators.evaluator import Evaluator
from evaluators.metrics import score_items
from evaluators.regression import RegressionConfig, regression_alert
from evaluators.sentinel import Sentinel
from streams.broker import EmbeddedBroker
from streams.events import Alert, Control, EvalReport, EventError, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.signing import load_signing_key, sign_control, write_dev_keys
from streams.vocab import Vocab


def wait_for(consumer, match, timeout_s=120.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=50).values():
            for r in batch:
                try:
                    if match(decode_event(r.value)):
                        return time.monotonic()
                except EventError:
                    pass
    raise TimeoutError("event not seen")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from trainer.models import build_model

    vocab = Vocab.default()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(run_dir=Path(tmp) / "broker", port=0) as broker:
        tmp = Path(tmp)
        os.environ.update(write_dev_keys(str(tmp / "keys")))  # the sentinel signs its Controls
        settings = KafkaSettings(bootstrap=broker.bootstrap)
        write_suite(tmp / "evals", vocab)
        model = build_model("debug_cpu")
        ckpts = [save_checkpoint(tmp / "run", 10 * (i + 1), model, vocab, "bench") for i in range(args.repeats)]
        evaluator = Evaluator(Evaluator.Config(bootstrap=broker.bootstrap, eval_root=str(tmp / "evals"), suite="core",
                                               group="bench", checkpoint_roots=[str(tmp / "run" / "checkpoints")],
                                               regression=RegressionConfig(n_boot=2000)), vocab=vocab)
        # baseline: verify + load + score only
        base = []
        for c in ckpts:
            t0 = time.monotonic()
            loaded = load_checkpoint(c.path, trust=evaluator.trust)
            score_items(loaded.model, evaluator.suite.items, seq_len=64)
            base.append(time.monotonic() - t0)
        stop = threading.Event()
        th = threading.Thread(target=evaluator.run, kwargs={"stop": stop}, daemon=True)
        th.start()
        producer = make_producer(settings)
        reader = make_consumer(settings, topics=["evals"], group_id=f"b-{uuid.uuid4().hex}",
                               auto_offset_reset="latest")
        wait_for_assignment(reader)
        e2e = []
        for c in ckpts:
            t0 = time.monotonic()
            publish(producer, "checkpoints", c)
            e2e.append(wait_for(reader, lambda e, c=c: isinstance(e, EvalReport) and e.checkpoint_path == c.path) - t0)
        stop.set()
        th.join()
        evaluator.close()
        reader.close()
        m_e2e, m_base = statistics.median(e2e), statistics.median(base)
        print(f"checkpoint->EvalReport (debug model, {len(evaluator.suite.items)} items, CPU): "
              f"median {m_e2e:.2f}s; baseline load+score {m_base:.2f}s; ratio {m_e2e / m_base:.2f}x")

        rules = tmp / "rules.toml"
        rules.write_text('[dispatch]\ndefault_hooks = ["control"]\n[hooks.control]\ntype = "control"\n'
                         '[actions]\neval_regression = ["rollback"]\n')
        sentinel = Sentinel(Sentinel.Config(bootstrap=broker.bootstrap, rules=str(rules), lineage=str(tmp / "l.jsonl")))
        stop = threading.Event()
        th = threading.Thread(target=sentinel.run, kwargs={"stop": stop}, daemon=True)
        th.start()
        control = make_consumer(settings, topics=["control"], group_id=f"b-{uuid.uuid4().hex}", auto_offset_reset="latest")
        wait_for_assignment(control)
        time.sleep(5)  # let the sentinel join its group
        rollback, rtt, operator = [], [], load_signing_key("operator")
        for i in range(args.repeats):
            # a failed report on `evals` corroborates the alert (a new domain each time: no circuit breaker)
            saved_at, path = time.time(), str(tmp / "run" / "checkpoints" / f"step-{1000 + i}")
            findings = [{"metric": f"domain/d{i}", "significant": True, "delta": 0.2, "ci_low": 0.1,
                         "ci_high": 0.3, "p_value": 0.001}]
            report = EvalReport(run_id="bench", step=1000 + i, checkpoint_path=path, suite="core",
                                vocab_version=vocab.version, passed=False, details={
                                    "checkpoint_wall_time": saved_at,
                                    "regression": {"best_checkpoint": ckpts[0].path, "best_step": 10,
                                                   "findings": findings}})
            publish(producer, "evals", report)
            t0 = time.monotonic()
            publish(producer, "alerts", regression_alert(report, source="bench"))
            issued: list[Control] = []
            rollback.append(wait_for(control, lambda e, got=issued: isinstance(e, Control) and e.command == "rollback"
                                     and not got.append(e)) - t0)
            publish(producer, "alerts", Alert(rule="trainer.rollback", severity="warning", source="trainer",
                                              message="applied", evidence={"run_id": "bench",
                                                                           "control_id": issued[0].control_id}))
            probe = sign_control(Control(command="resume_domain", args={"domain": "probe", "run_id": "bench"}), operator)
            t0 = time.monotonic()
            publish(producer, "control", probe)
            rtt.append(wait_for(control, lambda e, p=probe: isinstance(e, Control) and e.control_id == p.control_id) - t0)
        stop.set()
        th.join()
        sentinel.close()
        control.close()
        producer.close()
        m_rb, m_rtt = statistics.median(rollback), statistics.median(rtt)
        print(f"alert->rollback Control: median {m_rb * 1000:.0f} ms; baseline Kafka round trip {m_rtt * 1000:.0f} ms; "
              f"ratio {m_rb / m_rtt:.1f}x (target <= 30 s)")
    return 0


def wait_for_assignment(consumer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=100)
    consumer.poll(timeout_ms=100)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
