"""The evaluator service on real parts: a private tansu broker, real DCP checkpoints of the trainer's
debug model, a real MDS eval suite, `headwater evaluate` subprocesses killed and restarted."""

from __future__ import annotations

import copy
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
import torch
import torch.distributed.checkpoint as dcp

from evaluators.evaluator import Evaluator
from evaluators.regression import RegressionConfig
from streams.checkpoint_manifest import write_manifest
from streams.events import Alert, CheckpointSaved, EvalReport, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.mds import LiveStreamWriter
from streams.signing import load_signing_key
from streams.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 64


def write_suite(eval_root: Path, vocab: Vocab, *, name: str = "core", n_text: int = 24) -> Path:
    """A small held-out suite: text in two domains/languages, two audio clips, one image."""
    rng = np.random.default_rng(0)
    words = ["the", "river", "runs", "past", "old", "stone", "mills", "and", "quiet", "fields", "under", "grey", "skies"]

    def row(i, domain, modality, tokens, language="", lineage=None):
        return {"id": f"{domain}-{i}", "domain": domain, "modality": modality,
                "tokens": np.asarray(tokens, np.int32), "source": "heldout", "license": "cc-by",
                "pipeline_version": "p1", "language": language, "produced_at": 0.0, "lineage": lineage or {}}

    text = {"wiki": [], "forum": []}
    for i in range(n_text):
        domain = "wiki" if i % 2 else "forum"
        sent = " ".join(rng.choice(words, size=30))
        text[domain].append(row(i, domain, "text", vocab.encode(sent), "en" if i % 3 else "de"))
    audio = [row(i, "speech", "audio", vocab.codes_to_ids("audio", rng.integers(0, 1024, (2, 20))),
                 lineage={"qa": {"duration_s": 20 / 75}}) for i in range(2)]
    image_codes = vocab.codes_to_ids("image", rng.integers(0, 256, (1, 16)))
    image = [row(0, "photos", "image", [vocab.special("<img>"), *image_codes, vocab.special("</img>")])]
    root = eval_root / name
    with LiveStreamWriter(root, writer_id="evalset", manifest={"vocab_version": vocab.version}) as w:
        for domain, rows in {**text, "speech": audio, "photos": image}.items():
            w.write_shard(rows, domain=domain)
    return root


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, vocab: Vocab, run_id: str) -> CheckpointSaved:
    """A checkpoint laid out as the trainer completes it: DCP, headwater.json, then the manifest
    signed with the trainer key (``HEADWATER_TRAINER_KEY_FILE``, exported by tests/conftest.py)."""
    path = run_dir / "checkpoints" / f"step-{step}"
    dcp.save(model.state_dict(), checkpoint_id=str(path))
    meta = {"config": "debug_cpu", "step": step, "tokens": step * 1000, "run_id": run_id,
            "vocab_size": vocab.size, "vocab_version": vocab.version, "seq_len": SEQ_LEN,
            "wall_time": time.time(), "data_cursor": {}}
    (path / "headwater.json").write_text(json.dumps(meta))
    write_manifest(path, run_id=run_id, step=step, key=load_signing_key("trainer"))
    return CheckpointSaved(run_id=run_id, path=str(path), step=step, tokens=step * 1000, vocab_version=vocab.version)


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.default()


@pytest.fixture(scope="module")
def base_model():
    from trainer.models import build_model

    torch.manual_seed(0)
    return build_model("debug_cpu")


def read_topic(bootstrap: str, topic: str, *, want, timeout_s: float = 60) -> list:
    """Decoded events of ``topic`` (from the beginning) once ``want(events)`` holds."""
    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), topics=[topic], group_id=f"reader-{uuid.uuid4().hex}")
    events: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not want(events):
            for batch in consumer.poll(timeout_ms=200).values():
                events += [decode_event(r.value) for r in batch]
    finally:
        consumer.close()
    return events


def test_reports_errors_and_regression_alert(fresh_broker, tmp_path, vocab, base_model):
    """Good checkpoints pass; a broken one and a vocab mismatch give error reports; a damaged one regresses."""
    write_suite(tmp_path / "evals", vocab)
    run = tmp_path / "run"
    good1 = save_checkpoint(run, 10, base_model, vocab, "r1")
    good2 = save_checkpoint(run, 20, base_model, vocab, "r1")
    damaged = copy.deepcopy(base_model)  # the output head replaced by noise
    with torch.no_grad():
        damaged.lm_head.weight.mul_(0).add_(torch.randn_like(damaged.lm_head.weight) * 0.5)
    bad_weights = save_checkpoint(run, 30, damaged, vocab, "r1")
    missing = CheckpointSaved(run_id="r1", path=str(run / "checkpoints/step-40"), step=40, tokens=1,
                              vocab_version=vocab.version)
    mismatch = CheckpointSaved(run_id="r1", path=good1.path + "-other", step=50, tokens=1, vocab_version="v1-000000000000")
    tampered = save_checkpoint(run, 60, base_model, vocab, "r1")
    with open(Path(tampered.path) / "headwater.json", "a") as f:
        f.write(" ")
    outside = save_checkpoint(tmp_path / "elsewhere", 70, base_model, vocab, "r1")  # signed, outside the root
    producer = make_producer(KafkaSettings(bootstrap=fresh_broker.bootstrap))
    for ev in (good1, good2, bad_weights, missing, mismatch, tampered, outside):
        publish(producer, "checkpoints", ev)
    producer.close()
    ev = Evaluator(Evaluator.Config(bootstrap=fresh_broker.bootstrap, eval_root=str(tmp_path / "evals"), suite="core",
                                    group="g1", checkpoint_roots=[str(run / "checkpoints")],
                                    regression=RegressionConfig(n_boot=500)), vocab=vocab)
    try:
        assert ev.run(max_idle_s=3) == 7
    finally:
        ev.close()
    reports = {r.step: r for r in read_topic(fresh_broker.bootstrap, "evals", want=lambda e: len(e) >= 7)}
    assert set(reports) == {10, 20, 30, 40, 50, 60, 70}
    r10, r20, r30 = reports[10], reports[20], reports[30]
    assert r10.passed and r10.error is None and r20.passed
    m = r10.metrics
    for key in ("ppl", "text/ppl", "text/bpb", "domain/wiki/bpb", "lang/de/ppl", "audio/ppl",
                "audio/bits_per_second", "image/bits_per_image", "domain/speech/ppl"):
        assert key in m and np.isfinite(m[key]), key
    assert m["eval_items"] == 27 and m["leaked_items"] == 0
    assert r10.metrics["ppl"] == pytest.approx(r20.metrics["ppl"])  # same weights, same numbers
    assert r10.details["suite_version"].startswith("core-")
    assert len(r10.details["items"]["id"]) == 27
    assert not r30.passed and r30.error is None
    sig = [f for f in r30.details["regression"]["findings"] if f["significant"]]
    assert sig and r30.details["regression"]["best_checkpoint"] in (good1.path, good2.path)
    assert "checkpoint rejected (not_a_directory)" in reports[40].error and not reports[40].passed
    assert "vocab mismatch" in reports[50].error
    assert "checkpoint rejected (size_mismatch)" in reports[60].error and not reports[60].passed
    assert "checkpoint rejected (outside_roots)" in reports[70].error
    alerts = [a for a in read_topic(fresh_broker.bootstrap, "alerts", want=lambda e: len(e) >= 3, timeout_s=20)
              if isinstance(a, Alert)]
    rejections = {a.evidence["step"]: a for a in alerts if a.rule == "evaluator.checkpoint_rejected"}
    assert set(rejections) == {60, 70} and rejections[60].evidence["reason"] == "size_mismatch"
    (alert,) = [a for a in alerts if a.rule == "eval_regression"]
    assert alert.rule == "eval_regression" and alert.evidence["action"] == "rollback"
    assert alert.evidence["run_id"] == "r1" and alert.evidence["step"] == 30


def _evaluate_cmd(bootstrap: str, eval_root: Path, group: str, instance: str) -> list[str]:
    """`headwater evaluate` for the checkpoints of the run beside ``eval_root`` (tmp_path/run)."""
    return [sys.executable, "-m", "infra.cli", "evaluate", "--bootstrap", bootstrap, "--group", group,
            "--checkpoint-root", str(eval_root.parent / "run" / "checkpoints"),
            "--eval-root", str(eval_root), "--suite", "core", "--instance", instance, "--wandb", "disabled",
            "--n-boot", "200"]


@pytest.mark.slow
def test_restart_mid_stream_evaluates_each_checkpoint_exactly_once(fresh_broker, tmp_path, vocab, base_model):
    """Kill -9 an evaluator mid-stream, start two more in the same group: every checkpoint reported once."""
    write_suite(tmp_path / "evals", vocab, n_text=8)
    run = tmp_path / "run"
    ckpts = [save_checkpoint(run, 10 * (i + 1), base_model, vocab, "r2") for i in range(6)]
    producer = make_producer(KafkaSettings(bootstrap=fresh_broker.bootstrap))
    for c in ckpts:
        publish(producer, "checkpoints", c)
    producer.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(_evaluate_cmd(fresh_broker.bootstrap, tmp_path / "evals", "g2", "first"),
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        read_topic(fresh_broker.bootstrap, "evals", want=lambda e: len(e) >= 2, timeout_s=240)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rest = [subprocess.Popen(_evaluate_cmd(fresh_broker.bootstrap, tmp_path / "evals", "g2", f"second-{i}")
                             + ["--max-idle-s", "8"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for p in rest:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-2000:]
    reports = [r for r in read_topic(fresh_broker.bootstrap, "evals", want=lambda e: len(e) >= 6)
               if isinstance(r, EvalReport)]
    steps = sorted(r.step for r in reports)
    assert steps == [10, 20, 30, 40, 50, 60], steps
    assert {r.details["instance"] for r in reports} >= {"first"}


def test_a_transient_publish_error_is_retried_not_dead_lettered(fresh_broker, tmp_path, vocab, base_model):
    """Issue 14 review finding 1: the evaluator committed a checkpoint whose report or alert the
    broker timed out (dead-lettered as a handler error: lost). Now nothing is committed, the
    record is redelivered, and the report and its alert each go out exactly once."""
    sys.path.append(str(Path(__file__).resolve().parent / "helpers"))
    from flaky import FlakyProducer

    write_suite(tmp_path / "evals", vocab, n_text=4)
    outside = save_checkpoint(tmp_path / "elsewhere", 70, base_model, vocab, "r1")  # rejected: report + alert
    producer = make_producer(KafkaSettings(bootstrap=fresh_broker.bootstrap))
    publish(producer, "checkpoints", outside)
    producer.close()
    ev = Evaluator(Evaluator.Config(bootstrap=fresh_broker.bootstrap, eval_root=str(tmp_path / "evals"), suite="core",
                                    group="g-transient", checkpoint_roots=[str(tmp_path / "run")]), vocab=vocab)
    ev.producer = FlakyProducer(ev.producer, lost={1, 3})  # the report's first send, then the alert's
    try:
        ev.run(max_idle_s=3)  # 0 published by the last try: the report went out before the alert failed
    finally:
        ev.close()
    assert ev.guard.counts["redelivered"] == 2 and ev.guard.counts["handler_errors"] == 0
    reports = [r for r in read_topic(fresh_broker.bootstrap, "evals", want=lambda e: len(e) >= 1, timeout_s=20)
               if isinstance(r, EvalReport)]
    assert [r.step for r in reports] == [70] and "outside_roots" in reports[0].error
    alerts = [a for a in read_topic(fresh_broker.bootstrap, "alerts", want=lambda e: len(e) >= 1, timeout_s=20)
              if isinstance(a, Alert)]
    assert [a.rule for a in alerts] == ["evaluator.checkpoint_rejected"]
    assert read_topic(fresh_broker.bootstrap, "dlq", want=lambda e: False, timeout_s=3) == []


def test_a_checkpoint_dcp_refuses_is_a_checkpoint_error_not_a_crash(tmp_path, vocab):
    """torch DCP raises ``CheckpointException`` (a BaseException) when a tensor's shape differs
    from the model headwater.json describes: load_checkpoint turns it into a CheckpointError, which
    the evaluator publishes as an error EvalReport (before, it escaped ``except Exception``)."""
    from evaluators.checkpoint import CheckpointError, CheckpointTrust, load_checkpoint
    from streams.signing import Keyring
    from trainer.models import build_model

    run = tmp_path / "run"
    smaller = build_model("debug_cpu", vocab_size=vocab.size // 2)  # headwater.json will say vocab.size
    ckpt = save_checkpoint(run, 10, smaller, vocab, "r1")
    trust = CheckpointTrust(roots=[str(run / "checkpoints")], keyring=Keyring.from_env())
    with pytest.raises(CheckpointError, match="DCP load failed: CheckpointException"):
        load_checkpoint(ckpt.path, trust=trust, run_id="r1", step=10)
