"""kill -9 fault trials at the scale of issue 12: two ``headwater ingest --group`` workers on a
4-partition topic of the real broker, a local or an ``s3://`` stream root, one worker killed at a
random moment or at a named fault point (``HEADWATER_KILL_AT``, see :mod:`streams.faultpoints`),
restarted, and the root checked once both are done.

One trial (:func:`run_trial`) produces unique documents, an exact duplicate after every tenth
(same key, so it follows its original in one partition) and undecodable records (two per
partition, dead-lettered), then checks from the shards and the manifests: no valid record lost,
none written twice, no exact duplicate written, every offset settled exactly once (disjoint
settled spans whose total is the topic's size), every bad record in the ``dlq`` topic at least
once (copies beyond one are counted, not failed: the dead letters of a batch killed before its
settlement are sent again by the replay), and the root readable by a stock
``streaming.StreamingDataset`` (local: after ``headwater fold``; s3: with ``remote=``).
Recovery time is from the kill to the moment every offset of the topic is settled.

Used by tests/test_fault_trials.py and bench/bench_fault_trials.py.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kafka_topics import create_topic  # tests/helpers is on sys.path (as for every helper)

from streams.faultpoints import ENV, POINTS

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
WORKER_ARGS = ["--min-doc-words", "50", "--window-s", "1", "--until-caught-up", "--batch-records", "8"]
#: Fault points per root kind (None: a kill at a random moment); a plan cycles through them.
LOCAL_POINTS: list[str | None] = [None, "local.after_rename", "local.after_journal", "local.fold_between",
                                  "sink.after_dlq", "control.poll", "group.revoke", "group.assign"]
S3_POINTS: list[str | None] = [None, "remote.after_upload", "remote.fold_between", "remote.after_commit",
                               "remote.before_merge", "sink.after_dlq", "control.poll", "group.revoke"]
BAD_RECORDS = (b'{"id": "x"', b"\xff\xfe\xfd", b'{"id":"m","modality":"smell","source":"s","license":"l","text":"t"}')


@dataclass(kw_only=True, slots=True)
class Trial:
    """One trial: the root kind, the fault point (None: random time) and its hit number."""

    seed: int
    root_kind: str  # "local" | "s3"
    point: str | None = None
    nth: int = 1
    n_docs: int = 40

    @property
    def label(self) -> str:
        return f"{self.root_kind}-{self.point or 'random'}{'' if self.point is None else f'@{self.nth}'}-s{self.seed}"


@dataclass(kw_only=True, slots=True)
class TrialResult:
    trial: Trial
    fired: bool = False  # the victim died by the fault point (or the random kill hit a live process)
    records: int = 0  # offsets produced
    lost: int = 0  # valid records missing from the shards
    duplicated: int = 0  # extra copies of records in the shards
    dup_leaks: int = 0  # exact duplicates that were written (distinct records: a dedup miss, not a replay)
    overlaps: int = 0  # settled spans that overlap another
    settled: int = 0  # offsets settled in the root (must equal records)
    dlq_missing: int = 0  # bad records never dead-lettered
    dlq_copies: int = 0  # dead letters beyond one per bad record
    readable: bool = False
    hung: str = ""  # workers that did not exit although everything was settled
    recovery_s: float = 0.0
    total_s: float = 0.0
    error: str = ""
    logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exactly-once held, and exact dedup across micro-batches and workers (on an object-store
        root each worker folds the root into its own dedup cache, as on separate machines)."""
        t = self
        return (not t.error and not t.hung and t.lost == t.duplicated == t.dup_leaks == t.overlaps == t.dlq_missing == 0
                and t.settled == t.records and t.readable)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trial"]["label"] = self.trial.label
        d["ok"] = self.ok
        d.pop("logs")
        return d


def plan(n: int, seed: int = 0, *, kinds: tuple[str, ...] = ("local", "s3")) -> list[Trial]:
    """``n`` seeded trials alternating root kinds, each kind cycling through its fault points."""
    rng = random.Random(seed)
    cycles = {"local": itertools.cycle(LOCAL_POINTS), "s3": itertools.cycle(S3_POINTS)}
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        point = next(cycles[kind])
        nth = {None: 1, "local.fold_between": 1, "group.revoke": 1, "group.assign": 2,
               "control.poll": rng.randint(2, 6)}.get(point, rng.randint(1, 3))
        out.append(Trial(seed=seed * 1000 + i, root_kind=kind, point=point, nth=nth))
    return out


@dataclass(kw_only=True, slots=True)
class Produced:
    expected: set[str]  # valid unique ids
    dups: set[str]  # ids of exact duplicates
    bad: set[str]  # "topic:partition:offset" of undecodable records (the DLQ message keys)
    total: int


def produce(bootstrap: str, topic: str, n_docs: int, seed: int) -> Produced:
    from beam_jobs.synthetic import english_doc, raw_record
    from streams.kafka import KafkaSettings, make_producer

    rng = random.Random(seed)
    source = f"trial{seed}"  # no control another test issued names it
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    futures = []
    out = Produced(expected=set(), dups=set(), bad=set(), total=0)
    bad_at = {rng.randrange(n_docs): p for p in range(PARTITIONS) for _ in range(2)}
    for i in range(n_docs):
        doc_id = f"f{seed}-{i}"
        text = english_doc(rng)
        producer.send(topic, value=raw_record(doc_id, text, source=source), key=doc_id.encode())
        out.expected.add(doc_id)
        if i % 10 == 3:
            producer.send(topic, value=raw_record(f"{doc_id}-dup", text, source=source), key=doc_id.encode())
            out.dups.add(f"{doc_id}-dup")
        if i in bad_at:
            futures.append(producer.send(topic, value=rng.choice(BAD_RECORDS), partition=bad_at[i]))
    for p in range(PARTITIONS):  # two bad records per partition, wherever the draw above put them
        for _ in range(2 - sum(1 for q in bad_at.values() if q == p)):
            futures.append(producer.send(topic, value=rng.choice(BAD_RECORDS), partition=p))
    producer.flush()
    for f in futures:
        md = f.get(timeout=30)
        out.bad.add(f"{topic}:{md.partition}:{md.offset}")
    producer.close()
    out.total = len(out.expected) + len(out.dups) + len(out.bad)
    return out


class Worker:
    """``headwater ingest --group`` as a subprocess; its stderr in a log file."""

    def __init__(self, workdir: Path, bootstrap: str, topic: str, root: str, writer_id: str, *,
                 env: dict[str, str], control: bool):
        self.log = workdir / f"{writer_id}.{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "infra.cli", "ingest", *WORKER_ARGS, "--bootstrap", bootstrap, "--topics", topic,
               "--stream-root", root, "--group", f"g-{topic}", "--writer-id", writer_id,
               "--run-dir", str(workdir / f"run-{writer_id}"),
               "--dedup-cache-dir", str(workdir / f"dedup-cache-{writer_id}")]  # one per worker: two machines
        if not control:
            cmd.append("--no-control")
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def assigned(self) -> list[str]:
        """The partitions of this worker's latest assignment."""
        found = re.findall(r"assigned (\[.*\])", self.text())
        return json.loads(found[-1].replace("'", '"')) if found else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _last_line(w: Worker) -> str:
    lines = [ln for ln in w.text().splitlines() if " INFO " in ln or "faultpoint" in ln]
    return lines[-1][-160:] if lines else "no log line"


def _wait(cond, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def settled_count(root: str, topic: str) -> tuple[int, int]:
    """(offsets of ``topic`` settled in ``root``, settled spans that overlap another)."""
    from streams.manifest import published_entries

    spans = sorted((r["partition"], r["start"], r["end"]) for e in published_entries(root).values()
                   for r in e["settled"] if r["topic"] == topic)
    overlaps = sum(1 for (p1, _, e1), (p2, s2, _) in itertools.pairwise(spans) if p1 == p2 and s2 < e1)
    return sum(e - s for _, s, e in spans), overlaps


def dead_letters(bootstrap: str, topic: str) -> Counter:
    """Dead letters of ``topic`` in the ``dlq`` topic, counted per ``topic:partition:offset`` key."""
    from kafka import TopicPartition

    from streams.kafka import KafkaSettings, make_consumer

    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[], group_id=None)
    try:
        tps = [TopicPartition("dlq", p) for p in sorted(consumer.partitions_for_topic("dlq") or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        seen: Counter = Counter()
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end for tp, end in ends.items()) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    key = (r.key or b"").decode(errors="replace")
                    if key.startswith(f"{topic}:"):
                        seen[key] += 1
        return seen
    finally:
        consumer.close()


def read_ids(root: str, cache: Path) -> list[str]:
    """Sample ids read by a stock StreamingDataset (local root after ``headwater fold``; s3 remote)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    if root.startswith("s3://"):
        ds = StreamingDataset(remote=root, local=str(cache), shuffle=False, batch_size=1)
    else:
        from infra.fold_cli import main as fold_main

        assert fold_main([root]) == 0
        ds = StreamingDataset(local=root, shuffle=False, batch_size=1)
    ids = [ds[i]["id"] for i in range(len(ds))]
    del ds
    return ids


def run_trial(trial: Trial, *, bootstrap: str, workdir: Path, bucket: str | None = None,
              timeout_s: float = 240.0, exit_s: float = 60.0) -> TrialResult:
    """Run one trial (see the module doc); never raises for a failed check, it is in the result.
    A worker still running ``exit_s`` after every offset was settled is stopped and named in
    ``hung`` (the data checks still run)."""
    assert trial.point is None or trial.point in POINTS, trial.point
    res = TrialResult(trial=trial)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    topic = create_topic(bootstrap, "fault.trial", partitions=PARTITIONS)
    if trial.root_kind == "s3":
        assert bucket and os.environ.get("AWS_ENDPOINT_URL"), "an s3 trial needs the local S3 server"
        root = f"s3://{bucket}/{uuid.uuid4().hex[:12]}/stream"
    else:
        root = str(workdir / "root")
    produced = produce(bootstrap, topic, trial.n_docs, trial.seed)
    res.records = produced.total
    rng = random.Random(trial.seed)
    control = trial.point == "control.poll"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(ENV, None)
    if control and "HEADWATER_KEYRING_FILE" not in env:
        env["HEADWATER_INSECURE_CONTROLS"] = "1"  # no control is sent: the poll only has to run
    names = ["wa", "wb"]
    victim_id = names[rng.randrange(2)]
    victim_env = dict(env, **({ENV: f"{trial.point}@{trial.nth}"} if trial.point else {}))
    workers: list[Worker] = []

    def start(writer_id: str, e: dict[str, str]) -> Worker:
        w = Worker(workdir, bootstrap, topic, root, writer_id, env=e, control=control)
        workers.append(w)
        return w

    try:
        if trial.point and trial.point.startswith("group."):
            # the victim holds everything first, so the survivor's join revokes from it
            victim = start(victim_id, victim_env)
            _wait(lambda: len(victim.assigned()) == PARTITIONS or victim.proc.poll() is not None, 240,
                  "the victim to hold every partition")
            survivor = start(names[1 - names.index(victim_id)], env)
        else:
            started_ = {w: start(w, victim_env if w == victim_id else env) for w in names}
            victim, survivor = started_[victim_id], started_[names[1 - names.index(victim_id)]]
            _wait(lambda: (victim.assigned() and survivor.assigned()) or victim.proc.poll() is not None,
                  240, "both workers to hold partitions")
        if trial.point is None:
            time.sleep(rng.uniform(0.5, 4.0))
            if victim.proc.poll() is None:
                victim.proc.send_signal(signal.SIGKILL)
                res.fired = True
            victim.proc.wait()
        else:
            victim.proc.wait(timeout=timeout_s)
            res.fired = f"faultpoint {trial.point}@{trial.nth}: SIGKILL" in victim.text()
            if not res.fired and victim.proc.returncode != 0:
                raise RuntimeError(f"the victim failed without its fault point: {victim.text()[-2000:]}")
        killed = time.monotonic()
        if res.fired:
            start(victim_id, env)
        recovered = None
        deadline = killed + timeout_s
        rest = [w for w in workers if w is not victim]
        while any(w.proc.poll() is None for w in rest):
            if recovered is None and settled_count(root, topic)[0] >= produced.total:
                recovered = time.monotonic()
            if recovered is not None and time.monotonic() > recovered + exit_s:
                # everything is settled, yet a worker does not stop: record it, check the data anyway
                res.hung = ", ".join(f"{w.log.name} (last: {_last_line(w)})" for w in rest if w.proc.poll() is None)
                for w in rest:
                    w.stop()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running {timeout_s:.0f}s after the kill")
            time.sleep(0.5)
        for w in rest:
            if res.hung and w.proc.returncode == -signal.SIGKILL:
                continue
            if w.proc.returncode != 0:
                raise RuntimeError(f"{w.log.name} exited {w.proc.returncode}: {w.text()[-2000:]}")
        res.recovery_s = ((recovered or time.monotonic()) - killed) if res.fired else 0.0
        res.settled, res.overlaps = settled_count(root, topic)
        try:
            ids = read_ids(root, workdir / "cache")
            res.readable = True
        except Exception as e:  # noqa: BLE001 - reported in the result
            res.error = f"stock StreamingDataset could not read the root: {type(e).__name__}: {e}"
            ids = []
        got = Counter(ids)
        res.lost = len(produced.expected - set(got)) if res.readable else 0
        res.duplicated = sum(c - 1 for c in got.values())
        res.dup_leaks = len(produced.dups & set(got))
        dlq = dead_letters(bootstrap, topic)
        res.dlq_missing = len(produced.bad - set(dlq))
        res.dlq_copies = sum(c - 1 for k, c in dlq.items() if k in produced.bad)
    except Exception as e:  # noqa: BLE001 - a trial reports, the caller asserts
        res.error = res.error or f"{type(e).__name__}: {e}"
    finally:
        for w in workers:
            w.stop()
        res.logs = [str(w.log) for w in workers]
        res.total_s = time.monotonic() - started
    return res
