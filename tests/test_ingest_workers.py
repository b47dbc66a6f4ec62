"""Many ingest workers on the real tansu broker: consumer-group assignment shares the partitions,
every record is settled exactly once across the writers (also across ``kill -9`` and restart),
one live process per writer id, and resume moves past offsets the broker does not have."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from beam_jobs.ingest import run
from beam_jobs.settlement import ResumePlan
from beam_jobs.sources.kafka import AbsentOffsets, KafkaSourceConfig, caught_up, next_ranges
from beam_jobs.synthetic import english_doc, raw_record
from beam_jobs.workers import WriterLock
from streams.events import OffsetRange
from streams.manifest import published_entries

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests" / "helpers"))
from kafka_topics import create_topic

ARGS = ["--min-doc-words", "50", "--no-control", "--window-s", "1"]


def produce(bootstrap: str, topic: str, n: int, *, seed: int, prefix: str = "d") -> set[str]:
    """``n`` unique English documents keyed over the topic's partitions; their ids."""
    from streams.kafka import KafkaSettings, make_producer

    rng = random.Random(seed)
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    ids = set()
    for i in range(n):
        doc_id = f"{prefix}{seed}-{i}"
        producer.send(topic, value=raw_record(doc_id, english_doc(rng)), key=doc_id.encode())
        ids.add(doc_id)
    producer.flush()
    producer.close()
    return ids


def samples(root: Path) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(root), batch_size=1, shuffle=False)
    return [ds[i] for i in range(len(ds))]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    """Workers of a failed test do not outlive it."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Worker:
    """``headwater ingest`` as a subprocess, its log in a file."""

    def __init__(self, tmp: Path, bootstrap: str, topic: str, root: Path, group: str, writer_id: str, *extra: str):
        self.log = tmp / f"{writer_id}.{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "infra.cli", "ingest", *ARGS, "--bootstrap", bootstrap, "--topics", topic,
               "--stream-root", str(root), "--group", group, "--writer-id", writer_id, *extra]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                         stdout=subprocess.DEVNULL, stderr=f)
        _STARTED.append(self.proc)

    def assignments(self) -> list[list[str]]:
        return [json.loads(m.replace("'", '"')) for m in re.findall(r"assigned (\[.*\])", self.log.read_text())]

    def wait(self, timeout: float = 300) -> None:
        assert self.proc.wait(timeout=timeout) == 0, self.log.read_text()[-3000:]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def shared(workers: list[Worker], partitions: int) -> bool:
    """Every worker's latest assignment is non-empty and together they hold every partition once."""
    latest = [w.assignments()[-1] if w.assignments() else [] for w in workers]
    names = [p for a in latest for p in a]
    return all(latest) and len(names) == len(set(names)) == partitions


def check_exactly_once(root: Path, expected: set[str], topic: str, partitions: int) -> dict[str, int]:
    """Each expected record is in exactly one shard; every offset of ``topic`` is settled once.
    Returns the number of samples each writer wrote."""
    ids = [s["id"] for s in samples(root)]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert set(ids) == expected, f"lost {sorted(expected - set(ids))[:5]}"
    entries = published_entries(str(root))
    spans = sorted((r["partition"], r["start"], r["end"]) for e in entries.values() for r in e["settled"]
                   if r["topic"] == topic)
    for (p1, _, e1), (p2, s2, _) in itertools.pairwise(spans):
        assert p1 != p2 or e1 <= s2, f"offsets settled twice: {spans}"
    assert ResumePlan.of_stream(str(root)).count() == len(expected)
    assert {p for p, _, _ in spans} == set(range(partitions))
    per_writer: dict[str, int] = {}
    for e in entries.values():
        per_writer[e["writer_id"]] = per_writer.get(e["writer_id"], 0) + e["samples"]
    return per_writer


def test_two_workers_share_partitions_and_settle_each_record_once(broker, tmp_path):
    topic = create_topic(broker.bootstrap, "test.workers", partitions=4)
    root, group, n = tmp_path / "s", f"g-{topic}", 40
    workers = [Worker(tmp_path, broker.bootstrap, topic, root, group, w, "--max-records", str(n))
               for w in ("wa", "wb")]
    wait_for(lambda: shared(workers, 4), 240, "both workers to hold partitions")
    expected = produce(broker.bootstrap, topic, n, seed=1)
    for w in workers:
        w.wait()
    per_writer = check_exactly_once(root, expected, topic, 4)
    assert per_writer.get("wa", 0) > 0 and per_writer.get("wb", 0) > 0, per_writer
    # Offsets were committed after settlement: the group's lag is zero.
    from streams.kafka import KafkaSettings, make_admin

    admin = make_admin(KafkaSettings(bootstrap=broker.bootstrap))
    try:
        committed = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    assert sum(o.offset for tp, o in committed.items() if tp.topic == topic) == n


def test_second_live_process_with_the_same_writer_id_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_bytes(raw_record("x", english_doc(random.Random(0))) + b"\n")
    holder = WriterLock(str(root), "w").acquire()
    try:
        with pytest.raises(SystemExit, match="writer id 'w' is already in use"):
            run(["--input", str(src), "--stream-root", str(root), "--writer-id", "w", "--writer-lock-wait", "0.5"])
        assert not (root / "index.json").exists()
    finally:
        holder.release()
    # a holder that lets go within the wait (a worker draining this id's outbox) delays the start only
    brief = WriterLock(str(root), "w").acquire()
    threading.Timer(1.0, brief.release).start()
    WriterLock(str(root), "w").acquire(wait_s=20.0).release()
    run(["--input", str(src), "--stream-root", str(root), "--writer-id", "w"])  # free again: it runs
    assert [s["id"] for s in samples(root)] == ["x"]


def _produce_transactions(bootstrap: str, topic: str, n: int, per_txn: int) -> set[str]:
    """``n`` records in transactions of ``per_txn`` on partition 0: each commit marker takes an offset."""
    from kafka import KafkaProducer

    rng = random.Random(3)
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}", enable_idempotence=True,
                             acks="all")
    producer.init_transactions()
    ids = set()
    for t in range(0, n, per_txn):
        producer.begin_transaction()
        for i in range(t, min(n, t + per_txn)):
            producer.send(topic, value=raw_record(f"t{i}", english_doc(rng)), partition=0)
            ids.add(f"t{i}")
        producer.commit_transaction()
    producer.close()
    return ids


def test_resume_moves_past_offsets_the_broker_does_not_have(broker):
    """Settled ranges that skip transaction markers (as ingest settles them) no longer pin the
    resume offset; the issue's simulation scaled down (batches of 50, markers every 21 offsets)."""
    from kafka import TopicPartition

    from streams.kafka import KafkaSettings, make_consumer

    topic = create_topic(broker.bootstrap, "test.gaps", partitions=1)
    _produce_transactions(broker.bootstrap, topic, 100, per_txn=20)  # markers at 20, 41, 62, 83, 104
    tp = TopicPartition(topic, 0)
    settled = [OffsetRange(topic=topic, partition=0, start=s, end=e)
               for s, e in ((0, 20), (21, 41), (42, 62), (63, 83), (84, 104))]
    config = KafkaSourceConfig(bootstrap=broker.bootstrap, topics=[topic], max_batch_per_partition=50)
    consumer = make_consumer(KafkaSettings(bootstrap=broker.bootstrap), assign=[], group_id=None)
    try:
        assert ResumePlan.from_ranges(settled).start(topic, 0) == 20  # pinned on the first marker
        ranges, positions = next_ranges(config, ResumePlan.from_ranges(settled), consumer,
                                        absent=AbsentOffsets(consumer))
        # past every marker with settled offsets beyond it; the last one (104) has none
        assert positions[tp] == 104 and (ranges[0].start, ranges[0].end) == (104, 154)
        assert consumer.end_offsets([tp])[tp] == 105
        assert caught_up(consumer, positions, AbsentOffsets(consumer))  # only the final marker is left
        # Half settled: the resume offset stops at the first offset that exists and is unsettled.
        plan = ResumePlan.from_ranges(settled[:2] + settled[3:])
        assert next_ranges(config, plan, consumer, absent=AbsentOffsets(consumer))[1][tp] == 42
        assert not caught_up(consumer, {tp: 42}, AbsentOffsets(consumer))
    finally:
        consumer.close()


def test_ingest_over_transaction_markers_settles_everything(broker, tmp_path):
    """A small --batch-records makes every batch end past a marker: the run still reads all
    records and stops by itself (a final marker does not count as unread)."""
    topic = create_topic(broker.bootstrap, "test.gaps", partitions=1)
    expected = _produce_transactions(broker.bootstrap, topic, 60, per_txn=10)
    root = tmp_path / "s"
    run([*ARGS, "--bootstrap", broker.bootstrap, "--topics", topic, "--stream-root", str(root),
         "--until-caught-up", "--batch-records", "25", "--group", f"g-{topic}"])
    assert {s["id"] for s in samples(root)} == expected
    assert ResumePlan.of_stream(str(root)).count() == 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_kill9_one_of_two_workers_loses_and_duplicates_nothing(broker, tmp_path, seed):
    """Two workers in one group; one is killed with SIGKILL mid-run. The survivor takes the
    partitions over after the rebalance; the killed one is restarted and rejoins. Nothing is
    lost, nothing is written twice (read back from the MDS shards)."""
    rng = random.Random(seed)
    topic = create_topic(broker.bootstrap, "test.workers", partitions=4)
    root, group, n = tmp_path / "s", f"g-{topic}", 300
    expected = produce(broker.bootstrap, topic, n, seed=seed)
    extra = ("--until-caught-up", "--batch-records", "20")
    a = Worker(tmp_path, broker.bootstrap, topic, root, group, "wa", *extra)
    b = Worker(tmp_path, broker.bootstrap, topic, root, group, "wb", *extra)
    wait_for(lambda: shared([a, b], 4), 240, "both workers to hold partitions")
    time.sleep(rng.uniform(0.5, 4.0))
    victim = a if seed % 2 else b
    assert victim.proc.poll() is None, "the run ended before the kill: make it longer"
    victim.kill()
    restarted = Worker(tmp_path, broker.bootstrap, topic, root, group, "wa" if victim is a else "wb", *extra)
    for w in (a, b):
        if w is not victim:
            w.wait()
    restarted.wait()
    check_exactly_once(root, expected, topic, 4)


@pytest.mark.slow
def test_workers_flag_launches_a_group(broker, tmp_path):
    topic = create_topic(broker.bootstrap, "test.workers", partitions=4)
    expected = produce(broker.bootstrap, topic, 60, seed=5)
    root = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-m", "infra.cli", "ingest", *ARGS, "--bootstrap", broker.bootstrap,
                           "--topics", topic, "--stream-root", str(root), "--group", f"g-{topic}", "--workers", "2",
                           "--writer-id", "w", "--until-caught-up"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert set(check_exactly_once(root, expected, topic, 4)) <= {"w-0", "w-1"}
    assert (root / "_ingest" / "w-0").is_dir() and (root / "_ingest" / "w-1").is_dir()
