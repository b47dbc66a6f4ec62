"""Fuzzing the real consumer loops on a broker: hostile records with valid ones interleaved.

Each scenario produces :func:`nasty_events.fuzz_values` records on the topics a consumer
reads, with valid "probe" messages placed among them (one early, one in the middle, one at
the end), runs the real consumer until it has read everything, then checks: the consumer did
not die, every probe was obeyed, and the ``dlq`` topic holds one ``undecodable_event`` dead
letter from that consumer's stage for every record the contract decoder rejects.
Used by tests/test_fuzz_consumers.py and bench/bench_reliability.py.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kafka import TopicPartition

from streams.events import (
    Alert,
    CheckpointSaved,
    Control,
    DeadLetter,
    EvalReport,
    EventError,
    MetricsEvent,
    OffsetRange,
    ShardPublished,
    decode_event,
)
from streams.kafka import KafkaSettings, make_consumer, make_producer
from streams.signing import ControlVerifier, load_signing_key, sign_control

for _path in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):  # helpers/, tests/
    if str(_path) not in sys.path:
        sys.path.append(str(_path))
from nasty_events import decodes, fuzz_values

__all__ = ["FuzzResult", "dead_letters", "fuzz_all", "fuzz_control", "fuzz_evaluator", "fuzz_sentinel",
           "fuzz_status", "read_events", "topic_ends"]

Value = bytes | None


@dataclass
class FuzzResult:
    """What one consumer did with one topic's fuzzed records."""

    consumer: str
    topic: str
    records: int  # hostile records produced (probes not included)
    sources: dict[str, int]
    undecodable: int  # of them, rejected by the contract decoder
    probes: int
    probes_obeyed: int
    dead_letters: int  # undecodable_event dead letters of this consumer's stage for this topic
    handler_errors: int = 0
    crashed: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.probes - self.probes_obeyed


def probe_count(n: int) -> int:
    """Valid probes mixed into ``n`` hostile records: one per ~100 (at least 3), each must be obeyed."""
    return max(3, n // 100)


def _interleave(values: list[Value], probes: list[bytes]) -> list[Value]:
    """``probes`` spread through ``values``: the last one after every hostile record."""
    out = list(values)
    for i, p in enumerate(probes):
        pos = len(out) if i == len(probes) - 1 else (len(out) * (i + 1)) // len(probes)
        out.insert(pos, p)
    return out


def _produce(bootstrap: str, topic: str, values: list[Value]) -> None:
    producer = make_producer(KafkaSettings(bootstrap=bootstrap), max_request_size=2 * 1024 * 1024)
    try:
        futures = [producer.send(topic, value=v, key=b"fuzz") for v in values]  # a tombstone needs a key
        producer.flush()
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()


def topic_ends(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of ``topic``."""
    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[])
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _decoded(record):
    try:
        return decode_event(record.value)
    except EventError:
        return None  # the fuzzed topics hold the garbage itself


def read_events(bootstrap: str, topic: str, since: dict[int, int] | None = None) -> list:
    """Every decodable event on ``topic`` from ``since`` (default: the beginning) to its end now."""
    tps = [TopicPartition(topic, p) for p in topic_ends(bootstrap, topic)]
    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=tps)
    out: list = []
    try:
        for tp in tps:
            consumer.seek(tp, (since or {}).get(tp.partition, 0))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=200)
            for batch in batches.values():
                out += [e for e in map(_decoded, batch) if e is not None]
            if not batches:  # done once at the end offsets as of now (they can lag a produce briefly)
                ends = {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
                if all(consumer.position(tp) >= ends[tp.partition] for tp in tps):
                    break
    finally:
        consumer.close()
    return out


def dead_letters(bootstrap: str, since: dict[int, int]) -> Counter:
    """``(stage, topic, reason)`` -> number of dead letters written to ``dlq`` since ``since``."""
    return Counter((d.stage, d.topic, d.reason) for d in read_events(bootstrap, "dlq", since)
                   if isinstance(d, DeadLetter))


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


# -- control: the ingest follower and the trainer listener --------------------------------------
def fuzz_control(bootstrap: str, work: Path, n: int, *, seed: int = 0) -> list[FuzzResult]:
    """Hostile records on ``control`` through ControlFollower (ingest) and ControlListener (trainer)."""
    from beam_jobs.control import ControlFollower, SourceControl
    from trainer.control import ControlListener

    t0 = time.monotonic()
    operator = load_signing_key("operator")
    values, sources = fuzz_values(Control(command="quarantine_source", args={"source": "fuzz"}).to_dict(), n,
                                  seed_value=seed)
    bad = sum(not decodes(v) for v in values)
    probes = [sign_control(Control(command="quarantine_source", args={"source": f"probe-{i}"},
                                   reason="fuzz probe"), operator) for i in range(probe_count(n))]
    dlq_since = topic_ends(bootstrap, "dlq")
    listener = ControlListener(bootstrap, verifier=ControlVerifier.from_env(), run_id="fuzz-run")
    results = []
    try:
        _produce(bootstrap, "control", _interleave(values, [p.to_bytes() for p in probes]))
        state = SourceControl(path=str(work / "ingest-control.json"))
        follower = ControlFollower(bootstrap, state, ControlVerifier.from_env())
        crashed = False
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # until a poll reads nothing at the end offsets of now
                if not follower.poll(timeout_s=1.0) and all(
                        state.offsets.get(str(tp.partition), 0) >= end
                        for tp, end in follower.consumer.end_offsets(follower.tps).items()):
                    break
        except Exception:  # noqa: BLE001 - a crash is the finding this scenario reports
            crashed = True
        finally:
            follower.close()
        drained: list[Control] = []

        def listener_done() -> bool:
            drained.extend(listener.drain())
            return listener.error is not None or len(drained) >= len(probes) and \
                listener.guard.counts["decoded"] + listener.guard.counts["undecodable"] >= len(values) + len(probes)

        _wait(listener_done, 600, "the trainer's control listener")
        letters = dead_letters(bootstrap, dlq_since)
        obeyed = sum(state.blocked.get(f"probe-{i}") == "source_quarantined" for i in range(len(probes)))
        results.append(FuzzResult("ingest ControlFollower", "control", len(values), sources, bad, len(probes), obeyed,
                                  letters[("consume:ingest-control", "control", "undecodable_event")],
                                  follower.guard.counts["handler_errors"], crashed))
        got = {c.control_id for c in drained}
        results.append(FuzzResult("trainer ControlListener", "control", len(values), sources, bad, len(probes),
                                  sum(p.control_id in got for p in probes),
                                  letters[("consume:trainer-control", "control", "undecodable_event")],
                                  listener.guard.counts["handler_errors"], listener.error is not None))
        listener.check()
    finally:
        listener.close()
    for r in results:
        r.seconds = time.monotonic() - t0
    return results


# -- the sentinel: work topics (metrics.*, evals, alerts) and history (checkpoints, evals, control, shards)
SENTINEL_RULES = """
[dispatch]
default_hooks = ["control"]

[hooks.control]
type = "control"

[actions]
"probe.quarantine" = ["quarantine_source"]

[[rule]]
name = "probe_rate_high"
on = "metrics"
component = "ingest"
metric = "probe_rate"
kind = "threshold"
threshold = 0.5
group_by = ["i"]
severity = "warning"
cooldown_s = 0
"""


def fuzz_sentinel(bootstrap: str, work: Path, n: int, *, seed: int = 0) -> list[FuzzResult]:
    """Hostile records on every topic the sentinel reads, through Sentinel.run (work + history)."""
    from evaluators.sentinel import Sentinel

    t0 = time.monotonic()
    operator = load_signing_key("operator")
    k = probe_count(n)
    steps = range(3, 3 + k)  # probe checkpoints and their reports
    bases = {
        "shards": ShardPublished(stream_root="/s", shard="fuzz.mds", domain="fuzz", samples=1, bytes=1,
                                 vocab_version="v", writer_id="w",
                                 settled=[OffsetRange(topic="raw.text", partition=0, start=0, end=1)]),
        "checkpoints": CheckpointSaved(run_id="fuzz", path="/fuzz/step-1", step=1, tokens=1, vocab_version="v"),
        "evals": EvalReport(run_id="fuzz", step=1, checkpoint_path="/fuzz/step-1", suite="core", vocab_version="v"),
        "control": Control(command="pause_domain", args={"domain": "fuzz"}),
        "metrics.ingest": MetricsEvent(component="fuzz", values={"other_rate": 0.1}),
        "alerts": Alert(rule="fuzz.alert", severity="info", message="fuzz", source="fuzz"),
    }
    probes: dict[str, list[bytes]] = {
        "shards": [ShardPublished(stream_root="/s", shard=f"probe-{i}.mds", domain=f"probe-domain-{i}", samples=1,
                                  bytes=1, vocab_version="v", writer_id="w", published_at=1000.0 + i).to_bytes()
                   for i in range(k)],
        "checkpoints": [CheckpointSaved(run_id="probe-run", path=f"/probe/step-{i}", step=i, tokens=i,
                                        vocab_version="v", wall_time=time.time() - 60).to_bytes() for i in steps],
        "evals": [EvalReport(run_id="probe-run", step=i, checkpoint_path=f"/probe/step-{i}", suite="core",
                             vocab_version="v").to_bytes() for i in steps],
        "control": [sign_control(Control(command="rollback", args={"run_id": f"probe-run-{i}", "target": "last_good"},
                                         reason="fuzz probe"), operator).to_bytes() for i in range(k)],
        "metrics.ingest": [MetricsEvent(component="fuzz-probe", values={"probe_rate": 0.9}, labels={"i": str(i)}).to_bytes()
                    for i in range(k)],
        "alerts": [Alert(rule="probe.quarantine", severity="critical", message="probe", source="fuzz",
                         evidence={"action": "quarantine_source", "labels": {"source": f"probe-src-{i}"}}).to_bytes()
                   for i in range(k)],
    }
    produced: dict[str, tuple[int, dict[str, int]]] = {}
    since = {t: topic_ends(bootstrap, t) for t in ("dlq", "control", "alerts")}
    for i, (topic, base) in enumerate(bases.items()):  # alerts last: their probes trigger the history catch-up
        values, sources = fuzz_values(base.to_dict(), n, seed_value=seed + i)
        produced[topic] = (sum(not decodes(v) for v in values), sources)
        _produce(bootstrap, topic, _interleave(values, probes[topic]))
    rules = work / "sentinel-rules.toml"
    rules.write_text(SENTINEL_RULES)
    sentinel = Sentinel(Sentinel.Config(bootstrap=bootstrap, rules=str(rules), lineage=str(work / "lineage.jsonl"),
                                        group=f"fuzz-sentinel-{uuid.uuid4().hex[:6]}"))
    crashed, error = False, None
    try:
        try:
            sentinel.run(max_idle_s=5.0)
            sentinel._catch_up_history()  # the last records after the last alert
        except Exception as e:  # noqa: BLE001 - a crash is the finding this scenario reports
            crashed, error = True, e
        letters = dead_letters(bootstrap, since["dlq"])
        alerts = read_events(bootstrap, "alerts", since["alerts"])
        controls = read_events(bootstrap, "control", since["control"])
        policy = sentinel.policy
        obeyed = {
            "shards": sum(policy.first_shard_at.get(f"probe-domain-{i}") == 1000.0 + i for i in range(k)),
            "checkpoints": sum(any(key[0] == f"/probe/step-{i}" for key in policy.checkpoints) for i in steps),
            "evals": sum(any(key[0] == f"/probe/step-{i}" for key in policy.reports) for i in steps),
            "control": sum(f"probe-run-{i}" in policy.issued for i in range(k)),
            "metrics.ingest": sum(any(isinstance(a, Alert) and a.rule == "probe_rate_high"
                               and a.evidence.get("labels", {}).get("i") == str(i) for a in alerts)
                           for i in range(k)),
            "alerts": sum(any(isinstance(c, Control) and c.command == "quarantine_source"
                              and c.args.get("source") == f"probe-src-{i}" for c in controls) for i in range(k)),
        }
        results = []
        for topic, (bad, sources) in produced.items():
            # evals is read twice: by the history follower and by the group consumer (rules)
            reads = 2 if topic == "evals" else 1
            r = FuzzResult("Sentinel", topic, n, sources, bad * reads, k, obeyed[topic],
                           letters[("consume:sentinel", topic, "undecodable_event")],
                           sentinel.guard.counts["handler_errors"], crashed, time.monotonic() - t0)
            if error is not None:
                r.notes.append(f"{type(error).__name__}: {error}")
            results.append(r)
        return results
    finally:
        sentinel.close()


# -- the evaluator: checkpoints (group consumer) and its evals ledger ---------------------------
def fuzz_evaluator(bootstrap: str, work: Path, n: int, *, seed: int = 0) -> list[FuzzResult]:
    """Hostile records on ``checkpoints`` (Evaluator.run) and ``evals`` (its ledger)."""
    from test_eval_service import write_suite

    from evaluators.evaluator import Evaluator
    from streams.vocab import Vocab

    t0 = time.monotonic()
    vocab = Vocab.default()
    write_suite(work / "evals", vocab, n_text=4)
    since = topic_ends(bootstrap, "dlq")
    k = probe_count(n)
    probe_paths = [str(work / "missing" / f"step-{i}") for i in range(k)]
    ck_values, ck_sources = fuzz_values(
        CheckpointSaved(run_id="fuzz", path="/fuzz/step-1", step=1, tokens=1, vocab_version=vocab.version).to_dict(),
        n, seed_value=seed)
    ev_values, ev_sources = fuzz_values(
        EvalReport(run_id="fuzz", step=1, checkpoint_path="/fuzz/step-1", suite="other",
                   vocab_version=vocab.version).to_dict(), n, seed_value=seed + 1)
    ev_probes = [EvalReport(run_id="probe-run", step=i, checkpoint_path=f"/probe-evals/step-{i}", suite="core",
                            vocab_version=vocab.version) for i in range(k)]
    _produce(bootstrap, "evals", _interleave(ev_values, [p.to_bytes() for p in ev_probes]))
    _produce(bootstrap, "checkpoints", _interleave(ck_values, [
        CheckpointSaved(run_id="probe-run", path=p, step=i, tokens=i, vocab_version=vocab.version).to_bytes()
        for i, p in enumerate(probe_paths)]))
    evaluator = Evaluator(Evaluator.Config(bootstrap=bootstrap, eval_root=str(work / "evals"), suite="core",
                                           checkpoint_roots=[str(work / "missing")],
                                           group=f"fuzz-evaluator-{uuid.uuid4().hex[:6]}"), vocab=vocab)
    crashed, error = False, None
    try:
        try:
            evaluator.run(max_idle_s=5.0)
        except Exception as e:  # noqa: BLE001 - a crash is the finding this scenario reports
            crashed, error = True, e
        letters = dead_letters(bootstrap, since)
        reported = {r.checkpoint_path for r in evaluator.ledger.reports}
        counts = evaluator.guard.counts["handler_errors"]
        results = [
            FuzzResult("Evaluator", "checkpoints", n, ck_sources, sum(not decodes(v) for v in ck_values), k,
                       sum(p in reported for p in probe_paths),
                       letters[("consume:evaluator", "checkpoints", "undecodable_event")], counts, crashed),
            FuzzResult("EvalLedger", "evals", n, ev_sources, sum(not decodes(v) for v in ev_values), k,
                       sum(p.checkpoint_path in reported for p in ev_probes),
                       letters[("consume:evaluator", "evals", "undecodable_event")], counts, crashed),
        ]
        for r in results:
            r.seconds = time.monotonic() - t0
            if error is not None:
                r.notes.append(f"{type(error).__name__}: {error}")
        return results
    finally:
        evaluator.close()


# -- status: the run directory's evals.jsonl / alerts.jsonl -------------------------------------
def fuzz_status(work: Path, n: int, *, seed: int = 0) -> list[FuzzResult]:
    """Hostile lines in RUN/evals.jsonl and RUN/alerts.jsonl through ``headwater status``'s reader."""
    from infra.run_dir import RunDir
    from infra.status import read_run, render

    t0 = time.monotonic()
    now = time.time()
    run = work / "status-run"
    run.mkdir(parents=True, exist_ok=True)
    k = probe_count(n)
    bases = {"evals": EvalReport(run_id="fuzz", step=1, checkpoint_path="/c", suite="s", vocab_version="v"),
             "alerts": Alert(rule="fuzz", severity="info", message="m", source="s")}
    probes = {"evals": [EvalReport(run_id="probe", step=i, checkpoint_path=f"/probe/{i}", suite="s",
                                   vocab_version="v", created_at=now + i) for i in range(k)],
              "alerts": [Alert(rule=f"probe.{i}", severity="warning", message="m", source="s", created_at=now)
                         for i in range(k)]}
    produced = {}
    for i, (name, base) in enumerate(bases.items()):
        values, sources = fuzz_values(base.to_dict(), n, seed_value=seed + i)
        lines = _interleave([v for v in values if v is not None], [p.to_bytes() for p in probes[name]])
        (run / f"{name}.jsonl").write_bytes(b"\n".join(v.replace(b"\n", b" ").replace(b"\r", b" ")
                                                     for v in lines) + b"\n")
        produced[name] = (sum(not decodes(v) for v in values if v is not None), sources)
    crashed, notes = False, []
    try:
        render(None, read_run(RunDir(run), now=now), now=now)
        rd = RunDir(run)
        evals, alerts = rd.evals(), rd.alerts()
    except Exception as e:  # noqa: BLE001 - a crash is the finding this scenario reports
        crashed, evals, alerts = True, [], []
        notes.append(f"{type(e).__name__}: {e}")
    obeyed = {"evals": sum(any(e.checkpoint_path == p.checkpoint_path for e in evals) for p in probes["evals"]),
              "alerts": sum(any(a.rule == p.rule for a in alerts) for p in probes["alerts"])}
    # a run directory is not a topic: undecodable lines are counted (bad_lines), not dead-lettered;
    # the reader decodes lines with errors="replace", so its count may differ from the oracle's
    return [FuzzResult("status (run dir)", f"{name}.jsonl", n, sources, bad, k, obeyed[name],
                       rd.bad_lines.get(f"{name}.jsonl", 0) if not crashed else 0, 0, crashed,
                       time.monotonic() - t0, notes) for name, (bad, sources) in produced.items()]


def fuzz_all(work: Path, n: int, *, seed: int = 0) -> list[FuzzResult]:
    """Every scenario with ``n`` records per topic, each on a broker of its own (topics start empty)."""
    from streams.broker import EmbeddedBroker

    results: list[FuzzResult] = []
    for name, scenario in (("control", fuzz_control), ("sentinel", fuzz_sentinel), ("evaluator", fuzz_evaluator)):
        sub = work / name
        sub.mkdir(parents=True, exist_ok=True)
        with EmbeddedBroker(run_dir=sub / "broker") as broker:
            results += scenario(broker.bootstrap, sub, n, seed=seed)
    return results + fuzz_status(work / "status", n, seed=seed)
