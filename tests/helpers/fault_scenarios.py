"""Fault scenarios shared by tests/test_faults.py and bench/bench_reliability.py.

Each function injects one fault into real processes (tansu broker, ``headwater ingest``,
``headwater train`` under torchrun), lets the system recover, and returns what happened:
alerts seen, records lost and duplicated, and the recovery time. The caller asserts or reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tmpfs
from kafka_topics import create_topic

from beam_jobs.synthetic import english_doc, raw_record

__all__ = ["CheckpointResult", "FaultResult", "PauseResult", "broker_pause", "corrupt_checkpoint", "disk_full_ingest"]


@dataclass(slots=True)
class FaultResult:
    """What one injected fault did to streaming ingest."""

    fault: str
    records: int  # valid records expected in the stream
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    alerts: list[dict] = field(default_factory=list)  # the fault's alert(s)
    resolved: bool = False  # a resolved/recovered alert followed
    recovery_s: float = float("nan")  # fault lifted -> first new record settled
    log: str = ""
    settled_while_full_ok: bool = True
    leftovers: list[str] = field(default_factory=list)
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")


def _records(n: int, seed: int, prefix: str) -> tuple[list[tuple[str, bytes]], set[str]]:
    """``n`` clean, distinct documents (kept by every filter) plus one exact duplicate per 5
    (``ID-dup``: dedup keeps exactly one of the two, see :func:`_count`)."""
    rng = random.Random(seed)
    out, keep = [], set()
    for i in range(n):
        text = english_doc(rng)
        out.append((f"{prefix}{i}", raw_record(f"{prefix}{i}", text, source="web")))
        keep.add(f"{prefix}{i}")
        if i % 5 == 0:
            out.append((f"{prefix}{i}", raw_record(f"{prefix}{i}-dup", "  " + text.upper() + "  ")))
    return out, keep


def _count(ids: list[str], expected: set[str]) -> tuple[list[str], int, list[str]]:
    """(lost documents, extra copies, unknown ids) of a stream's ``ids``: a document is its id or
    its exact duplicate ``ID-dup``, whichever dedup kept; it must be present exactly once."""
    copies = {doc: 0 for doc in expected}
    unknown = []
    for i in ids:
        doc = i.removesuffix("-dup")
        if doc in copies:
            copies[doc] += 1
        else:
            unknown.append(i)
    return sorted(d for d, c in copies.items() if c == 0), sum(c - 1 for c in copies.values() if c > 1), unknown


def _produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]], *, interval_s: float = 0.0) -> None:
    from aiokafka import AIOKafkaProducer

    async def go():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                    request_timeout_ms=120_000)
        await producer.start()
        try:
            for key, value in records:
                await producer.send(topic, value=value, key=key.encode())
                if interval_s:
                    await asyncio.sleep(interval_s)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(go())


class AlertWatch:
    """Collects Alerts published from now on (the ``alerts`` topic, every partition)."""

    def __init__(self, bootstrap: str):
        from kafka import TopicPartition

        from streams.kafka import KafkaSettings, make_consumer

        self.consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[TopicPartition("alerts", 0)])
        self.consumer.seek_to_end()
        self.consumer.position(TopicPartition("alerts", 0))
        self.seen: list[dict] = []

    def poll(self, timeout_s: float = 0.5) -> list[dict]:
        for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for rec in batch:
                try:
                    self.seen.append(json.loads(rec.value))
                except (TypeError, ValueError):
                    continue
        return self.seen

    def wait_for(self, pred, timeout_s: float) -> dict | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for a in self.poll():
                if pred(a):
                    return a
        return None

    def close(self) -> None:
        self.consumer.close()


def _settled(root: str) -> int:
    from streams.mds import settled_ranges

    try:
        return sum(r.end - r.start for r in settled_ranges(root))
    except (OSError, ValueError):
        return -1


def _stream_ids(root: str) -> list[str]:
    """Sample ids of a snapshot of ``root`` read with a stock StreamingDataset (from a copy:
    the reader decompresses shards beside the index, which would write into the root)."""
    import shutil
    import tempfile

    from streaming import StreamingDataset

    from streams.manifest import fold_root

    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "copy")
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".staging", "_ingest", "*.tmp"))
        fold_root(copy, force=True)  # a snapshot of a live root: its journal folded into index.json
        ds = StreamingDataset(local=copy, batch_size=1, shuffle=False)
        return [ds[i]["id"] for i in range(len(ds))]


def _leftovers(root: str) -> list[str]:
    from streams.manifest import read_index, shard_name_of

    published = {shard_name_of(i) for i in read_index(root)["shards"]}
    out = [n for n in os.listdir(root) if n.endswith(".tmp") or ".tmp-" in n]
    out += [n for n in os.listdir(root) if ".mds" in n and n.split(".mds")[0] not in published]
    staging = os.path.join(root, ".staging")
    return out + (os.listdir(staging) if os.path.isdir(staging) else [])


def _wait(pred, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> float:
    start = deadline = time.monotonic()
    deadline += timeout_s
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _ingest_cmd(bootstrap: str, topic: str, root: str, max_records: int) -> list[str]:
    return [sys.executable, "-m", "infra.cli", "ingest", "--min-doc-words", "50", "--bootstrap", bootstrap,
            "--topics", topic, "--stream-root", root, "--window-s", "1", "--max-records", str(max_records),
            "--no-control"]


def disk_full_ingest(bootstrap: str, tmp: Path, *, size: str = "1m") -> FaultResult:
    """Streaming ingest onto a ``size`` tmpfs: settle a first half, fill the disk, produce the
    second half, wait for the alert, free the space, and check the stream."""
    first, keep_a = _records(12, seed=11, prefix="dfa")
    second, keep_b = _records(12, seed=12, prefix="dfb")
    expected = keep_a | keep_b
    topic = create_topic(bootstrap, "fault")
    res = FaultResult(fault="disk full (tmpfs)", records=len(expected))
    watch = AlertWatch(bootstrap)
    err_path = tmp / "ingest.stderr"
    with tmpfs.small_tmpfs(tmp / "mnt", size) as mnt:
        root = os.path.join(mnt, "s")
        _produce(bootstrap, topic, first)
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(_ingest_cmd(bootstrap, topic, root, len(first) + len(second)), cwd=ROOT,
                                    env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait(lambda: _settled(root) == len(first), 180, proc, "the first half to settle")
            ballast = tmpfs.fill(mnt)
            _produce(bootstrap, topic, second)
            alert = watch.wait_for(lambda a: a.get("rule") == "ingest.disk_full"
                                   and a.get("evidence", {}).get("path") == root, 120)
            if alert is None:
                raise AssertionError("no ingest.disk_full alert: " + err_path.read_text()[-3000:])
            res.alerts.append(alert)
            time.sleep(3)  # a few retries while full
            ids = _stream_ids(root)
            res.settled_while_full_ok = _settled(root) == len(first) and _count(ids, keep_a) == ([], 0, [])
            res.leftovers = _leftovers(root)
            os.unlink(ballast)
            freed = time.monotonic()
            _wait(lambda: _settled(root) > len(first), 120, proc, "the first record settled after freeing space")
            res.recovery_s = time.monotonic() - freed
            res.exit_code = proc.wait(timeout=300)
            res.resolved = watch.wait_for(lambda a: a.get("rule") == "ingest.disk_full_resolved", 30) is not None
            ids = _stream_ids(root)
            res.leftovers += _leftovers(root)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            watch.close()
    res.log = err_path.read_text(errors="replace")
    res.lost, res.duplicates, unknown = _count(ids, expected)
    if unknown:
        res.notes.append(f"unexpected ids {unknown[:5]}")
    return res


@dataclass(slots=True)
class CheckpointResult:
    """What a restart on corrupt checkpoints did."""

    corrupted: dict[int, str]  # step -> how it was damaged
    exit_code: int
    resumed_step: int | None
    alerts: list[dict]
    moved_aside: list[str]
    retrained: list[int]  # steps trained twice (after the resume)
    losses_match: bool  # retrained losses == the first run's, bit for bit
    recovery_s: float  # restart -> first step trained
    log: str = ""


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def corrupt_checkpoint(tmp: Path, *, steps: int = 12, every: int = 4) -> CheckpointResult:
    """Train ``steps`` steps (checkpoint every ``every``); truncate a file of the latest
    checkpoint and remove its manifest (detected by the failed load), garble a file of the one
    before (same size: only its manifest hash shows it); restart. Expect: both detected and
    moved aside, resume from the one before them, and the re-trained steps' losses equal to the
    first run's."""
    from trainer.runs import read_metrics, train_argv
    from trainer.synthetic import write_stream

    stream, run = str(tmp / "stream"), str(tmp / "run")
    write_stream(stream, domains={"noise": "noise", "markov": "markov", "counting": "counting"}, shards=4,
                 per_shard=40, vocab=512, seed=3)
    cmd = train_argv([stream], run, "--nproc", "2", "--vocab-size", "512", "--no-wandb", "--steps", str(steps),
                     "--checkpoint-every", str(every))
    first = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = os.path.join(run, "checkpoints")
    latest, before = steps, steps - every

    def biggest(step: int) -> str:
        d = os.path.join(ckpts, f"step-{step}")
        files = [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".distcp")]
        return max(files, key=os.path.getsize)

    _truncate(biggest(latest))  # and no manifest: only the failed load can tell
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(ckpts, f"step-{latest}", "manifest.json"))
    _garble(biggest(before))  # same size, loads fine: only the manifest's sha256 can tell
    corrupted = {latest: "largest .distcp truncated to half, manifest removed",
                 before: "64 bytes of the largest .distcp inverted"}
    n_before = len(read_metrics(run))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step_s: float | None = None
    out: list[str] = []
    for line in proc.stdout:
        out.append(line)
        if first_step_s is None and re.search(r"step\s+\d+ loss", line):
            first_step_s = time.monotonic() - t0
    code = proc.wait(timeout=600)
    records = read_metrics(run)
    old = {r["step"]: r["loss"] for r in records[:n_before] if "loss" in r}
    new = {r["step"]: r["loss"] for r in records[n_before:] if "loss" in r}
    alerts_path = os.path.join(run, "alerts.jsonl")
    alerts = []
    if os.path.exists(alerts_path):
        with open(alerts_path) as f:
            alerts = [a for a in map(json.loads, f) if a.get("rule") == "trainer.checkpoint_corrupt"]
    corrupt_dir = os.path.join(ckpts, "corrupt")
    resumed = alerts[-1]["evidence"].get("resumed_step") if alerts else None
    return CheckpointResult(
        corrupted=corrupted, exit_code=code, resumed_step=resumed, alerts=alerts,
        moved_aside=sorted(os.listdir(corrupt_dir)) if os.path.isdir(corrupt_dir) else [],
        retrained=sorted(new), losses_match=bool(new) and all(old.get(s) == v for s, v in new.items()),
        recovery_s=float("nan") if first_step_s is None else first_step_s, log="".join(out),
    )


@dataclass(slots=True)
class PauseResult(FaultResult):
    """A broker pause: ingest's result plus the trainer's."""

    trainer_exit: int | None = None
    trainer_steps: list[int] = field(default_factory=list)
    checkpoint_events: list[int] = field(default_factory=list)  # steps announced on ``checkpoints``
    trainer_log: str = ""
    warnings: list[str] = field(default_factory=list)  # log lines naming the unreachable broker


def _checkpoint_events(bootstrap: str, run_id: str) -> list[int]:
    from kafka import TopicPartition

    from streams.kafka import KafkaSettings, make_consumer, poll_records

    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[TopicPartition("checkpoints", 0)])
    try:
        consumer.seek_to_beginning()
        steps = []
        for rec in poll_records(consumer, timeout_s=5):
            event = json.loads(rec.value)
            if event.get("run_id") == run_id:
                steps.append(event["step"])
        return steps
    finally:
        consumer.close()


def broker_pause(broker, tmp: Path, *, pause_s: float = 30.0, train_steps: int = 40) -> PauseResult:
    """SIGSTOP the broker for ``pause_s`` while streaming ingest runs and a trainer (with
    ``--bootstrap``: control listener, metrics, checkpoint events) tails a stream; SIGCONT; both
    must finish with every record once and every checkpoint announced once."""
    from trainer.runs import read_metrics, train_argv
    from trainer.synthetic import write_stream

    first, keep_a = _records(10, seed=21, prefix="bpa")
    second, keep_b = _records(20, seed=22, prefix="bpb")
    expected = keep_a | keep_b
    res = PauseResult(fault=f"broker paused {pause_s:.0f}s (SIGSTOP)", records=len(expected))
    topic = create_topic(broker.bootstrap, "fault")
    root, run, stream = str(tmp / "live"), str(tmp / "run"), str(tmp / "synthetic")
    write_stream(stream, domains={"noise": "noise", "markov": "markov", "counting": "counting"}, shards=8,
                 per_shard=60, vocab=512, seed=4)
    train = train_argv([stream], run, "--nproc", "2", "--vocab-size", "512", "--no-wandb", "--steps",
                       str(train_steps), "--checkpoint-every", "10", "--bootstrap", broker.bootstrap)
    _produce(broker.bootstrap, topic, first)
    ingest_err, train_out = tmp / "ingest.stderr", tmp / "train.out"
    with open(ingest_err, "wb") as err, open(train_out, "wb") as tout:
        trainer = subprocess.Popen(train, cwd=ROOT, env=_env(), stdout=tout, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        ingest = subprocess.Popen(_ingest_cmd(broker.bootstrap, topic, root, len(first) + len(second))[:-1],
                                  cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    producer = None
    try:
        _wait(lambda: _settled(root) == len(first), 180, ingest, "the first records to settle")
        _wait(lambda: os.path.exists(os.path.join(run, "metrics.jsonl")) and len(read_metrics(run)) >= 2, 240,
              trainer, "the trainer's first steps")
        producer = threading.Thread(target=_produce, args=(broker.bootstrap, topic, second),
                                    kwargs={"interval_s": (pause_s + 10) / len(second)}, daemon=True)
        producer.start()
        watch = AlertWatch(broker.bootstrap)
        time.sleep(2)
        os.kill(broker.pid, signal.SIGSTOP)
        time.sleep(pause_s)
        at_resume = _settled(root)
        os.kill(broker.pid, signal.SIGCONT)
        back = time.monotonic()
        _wait(lambda: _settled(root) > at_resume, 180, ingest, "a record settled after the broker came back")
        res.recovery_s = time.monotonic() - back
        res.exit_code = ingest.wait(timeout=300)
        res.trainer_exit = trainer.wait(timeout=400)
        producer.join(timeout=60)
        watch.wait_for(lambda a: {x["source"] for x in watch.seen if x.get("rule") == "kafka.broker_unreachable"}
                       >= {"ingest", "trainer"}, 30)
        res.alerts = [x for x in watch.seen if x.get("rule") == "kafka.broker_unreachable"]
        watch.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker.pid, signal.SIGCONT)
        for p in (ingest, trainer):
            if p.poll() is None:
                p.kill()
                p.wait()
    ids = _stream_ids(root)
    res.lost, res.duplicates, unknown = _count(ids, expected)
    if unknown:
        res.notes.append(f"unexpected ids {unknown[:5]}")
    res.log = ingest_err.read_text(errors="replace")
    res.trainer_log = train_out.read_text(errors="replace")
    res.trainer_steps = sorted(r["step"] for r in read_metrics(run) if "loss" in r)
    with open(os.path.join(run, "run.json")) as f:
        res.checkpoint_events = _checkpoint_events(broker.bootstrap, json.load(f)["run_id"])
    res.warnings = [ln for ln in (res.log + res.trainer_log).splitlines() if "unreachable for" in ln]
    return res
