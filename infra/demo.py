"""`headwater demo`: the whole loop on embedded defaults, with a bad-data episode.

Broker up -> held-out eval suite built by the same ingest transforms (bounded) ->
streaming ingest, alert sentinel and evaluator started -> generated multimodal
records produced at a steady rate -> trainer (torchrun, 2 CPU processes) started
on the live stream -> a source starts leaking PII (the bad-data episode) -> the
sentinel alerts, quarantines the source and rolls the trainer back -> everything
stops cleanly and an HTML report is written.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.live import Live

from evaluators.alerts.receiver import SignedWebhookReceiver
from infra.demo_data import DemoCorpus, image_records, junk_payloads, text_records
from infra.processes import ProcessSet
from infra.run_dir import RunDir
from infra.status import read_kafka, read_run, render
from streams.broker import EmbeddedBroker
from streams.events import RawRecord, decode_event
from streams.kafka import make_consumer, make_producer
from streams.signing import KEYRING_ENV, write_dev_keys
from streams.topics import raw_topic

__all__ = ["DemoConfig", "main", "run_demo"]

REPO = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Sizes and timings of one demo run (defaults fit 2 cores and ~10 minutes)."""

    run_dir: Path = field(default_factory=lambda: Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    corpus: DemoCorpus = field(default_factory=lambda: DemoCorpus(texts=200, audios=3, images=12, videos=1))
    heldout_texts: int = 60
    records_per_s: float = 8.0
    max_backlog: int = 160  # records produced but not yet validated by ingest: the producer waits above it
    steps: int = 60
    checkpoint_every: int = 10
    nproc: int = 2
    poison_docs: int = 60
    join_after_checkpoints: int = 1  # the source 'leakyforum' starts sending clean documents ...
    poison_after_checkpoints: int = 3  # ... and later starts leaking PII (so the model trained on it)
    time_limit_s: float = 540.0
    webhook_secret: str = field(default_factory=lambda: secrets.token_hex(16))


def _headwater(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


def _leakyforum(n: int, *, leaking: bool) -> list[RawRecord]:
    """Documents of the source 'leakyforum': clean ones, or clean-looking ones each leaking personal data."""
    docs = text_records(n, seed=777 if leaking else 778, dup_rate=0.0, pii_rate=1.0 if leaking else 0.0)
    kind = "leak" if leaking else "lf"
    return [RawRecord(id=f"{kind}-{i}", modality="text", source="leakyforum", license="unknown", text=d.text)
            for i, d in enumerate(docs)]


DEMO_RULES = """
# Written by `headwater demo` for this run (see infra/alerts/rules.toml for the full set).
[dispatch]
default_hooks = ["webhook", "control"]

[hooks.webhook]
type = "webhook"
url = "{url}"
secret_env = "HEADWATER_WEBHOOK_SECRET"
retries = 3
backoff_s = 0.5

[hooks.control]
type = "control"

[actions]
eval_regression = ["rollback"]

[rollback]
# a regression rolls back only when two consecutive checkpoints fail: the tiny CPU model's loss
# curve has transient bumps (a checkpoint worse than the last good, the next one better again)
confirm_checkpoints = 2

[[rule]]
name = "pii_leak"
on = "metrics"
component = "ingest"
metric = "pii_rate"
kind = "threshold"
op = ">"
threshold = 0.5
group_by = ["source"]
severity = "critical"
cooldown_s = 600
action = "quarantine_source_and_rollback"
hooks = ["webhook", "control"]
description = "most documents of a source carry personal data: quarantine it, roll the model back"
"""


class Recorder(threading.Thread):
    """Copies EvalReports and Alerts from Kafka into RUN/evals.jsonl and RUN/alerts.jsonl."""

    def __init__(self, broker: EmbeddedBroker, run: Path):
        super().__init__(daemon=True, name="recorder")
        self.broker, self.run_dir, self.stop_event = broker, run, threading.Event()
        self.seen: set[str] = set()

    def run(self) -> None:
        consumer = make_consumer(self.broker.settings, topics=["evals", "alerts"], group_id="demo-recorder")
        try:
            while not self.stop_event.is_set():
                for batch in consumer.poll(timeout_ms=500).values():
                    for rec in batch:
                        self._record(rec.topic, rec.value)
        finally:
            consumer.close()

    def _record(self, topic: str, value: bytes) -> None:
        try:
            event = decode_event(value)
        except ValueError:
            return
        key = getattr(event, "alert_id", None) or f"{topic}:{value[:200]!r}"
        path = self.run_dir / ("evals.jsonl" if topic == "evals" else "alerts.jsonl")
        existing = path.read_text() if path.exists() else ""
        if key in self.seen or (topic == "alerts" and key in existing):
            return
        self.seen.add(key)
        with open(path, "a") as f:
            f.write(json.dumps(event.to_dict()) + "\n")


def ingested(run: Path) -> int:
    """Records ingest has validated so far (its cumulative funnel count; 0 before its first batch)."""
    try:
        last = (run / "ingest" / "metrics.jsonl").read_text().splitlines()[-1]
        return int(json.loads(last)["stages"]["validate"]["in"])
    except (OSError, IndexError, KeyError, ValueError, TypeError):
        return 0


class Producer(threading.Thread):
    """Produces the corpus at a steady rate, never more than ``max_backlog`` records ahead of ingest
    (so the planted incident is ingested while the trainer runs, on a loaded machine too); the
    poison burst is sent when ``poison`` is set."""

    def __init__(self, broker: EmbeddedBroker, cfg: DemoConfig, run: Path):
        super().__init__(daemon=True, name="producer")
        self.broker, self.cfg, self.run_dir = broker, cfg, run
        self.join, self.poison, self.stop_event = threading.Event(), threading.Event(), threading.Event()
        self.sent = 0
        self.poisoned = 0

    def run(self) -> None:
        producer = make_producer(self.broker.settings)
        for payload in junk_payloads():
            producer.send("raw.text", payload)
        poison = _leakyforum(self.cfg.poison_docs, leaking=True)
        clean = _leakyforum(self.cfg.poison_docs, leaking=False)
        gap = 1.0 / self.cfg.records_per_s
        generation = 0
        while not self.stop_event.is_set():  # a firehose: a fresh corpus generation after another
            corpus = replace(self.cfg.corpus, seed=self.cfg.corpus.seed + generation)
            for rec in corpus.records():
                if self.stop_event.is_set():
                    break
                while self.sent + self.poisoned - ingested(self.run_dir) > self.cfg.max_backlog and not self.stop_event.is_set():
                    time.sleep(0.5)
                producer.send(raw_topic(rec.modality), rec.to_bytes(), key=rec.id.encode())
                self.sent += 1
                if self.join.is_set() and not self.poison.is_set() and clean and self.sent % 3 == 0:
                    lf = clean.pop(0)
                    producer.send("raw.text", lf.to_bytes(), key=lf.id.encode())
                    self.sent += 1
                if self.poison.is_set() and poison:
                    burst, poison = poison[:5], poison[5:]
                    for p in burst:
                        producer.send("raw.text", p.to_bytes(), key=p.id.encode())
                    self.poisoned += len(burst)
                time.sleep(gap)
            generation += 1
        producer.flush()
        producer.close()


def _write_jsonl(path: Path, records: list[RawRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in records))


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*/headwater.json"))


def _summary(run: Path, producer: Producer, console: Console) -> int:
    """Print what happened; non-zero unless the bad-data episode went alert -> quarantine -> rollback exactly once."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rollbacks = [r for r in steps if r.get("event") == "rollback"]
    lineage = [json.loads(line) for line in (run / "lineage.jsonl").read_text().splitlines()] if (
        run / "lineage.jsonl").exists() else []
    alerts = (run / "alerts.jsonl").read_text().splitlines() if (run / "alerts.jsonl").exists() else []
    evals = (run / "evals.jsonl").read_text().splitlines() if (run / "evals.jsonl").exists() else []
    hooks = (run / "webhook.jsonl").read_text().splitlines() if (run / "webhook.jsonl").exists() else []
    console.print(f"produced {producer.sent} records (+{producer.poisoned} leaking); "
                  f"trainer steps {max((r.get('step', 0) for r in steps), default=0)}; "
                  f"eval reports {len(evals)}; alerts {len(alerts)}; signed webhooks {len(hooks)}")
    for row in lineage:
        console.print(f"  lineage: {row.get('action')} {row.get('args', {})} ({row.get('reason', '')})")
    for r in rollbacks:
        console.print(f"  trainer rolled back from step {r.get('from_step')} to {r.get('to_step')}: {r.get('reason')}")
    quarantines = [r for r in steps if r.get("event") == "quarantine"]
    for r in quarantines:
        console.print(f"  trainer quarantined {r.get('sources') or r.get('shards')} at step {r.get('step')}")
    if not producer.poisoned:
        console.print("[red]the bad-data episode never started (the trainer saved too few checkpoints)[/red]")
        return 1
    if not rollbacks:
        console.print("[red]the bad-data episode did not lead to a rollback[/red]")
        return 1
    if len(rollbacks) > 1 or len(quarantines) > 1:
        console.print(f"[red]the bad-data episode was acted on more than once: {len(rollbacks)} rollbacks, "
                      f"{len(quarantines)} quarantines[/red]")
        return 1
    if not quarantines:
        console.print("[red]the leaking source was never quarantined[/red]")
        return 1
    return 0


def run_demo(cfg: DemoConfig, console: Console) -> int:
    run = cfg.run_dir.resolve()
    run.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(run / "logs")
    broker = EmbeddedBroker(run_dir=run, port=0)
    started = time.monotonic()
    recorder: Recorder | None = None
    producer: Producer | None = None
    webhook: SignedWebhookReceiver | None = None
    try:
        console.print(f"[bold]headwater demo[/bold] -> {run}")
        broker.start()
        console.print(f"broker up at {broker.bootstrap}; topics created")
        keys = write_dev_keys(str(run / "keys"))  # each process gets the keyring and only its own key
        ring = {KEYRING_ENV: keys[KEYRING_ENV]}
        own_key = {role: {**ring, f"HEADWATER_{role.upper()}_KEY_FILE": keys[f"HEADWATER_{role.upper()}_KEY_FILE"]}
                   for role in ("sentinel", "trainer")}

        heldout = run / "inputs" / "heldout.jsonl"
        _write_jsonl(heldout, text_records(cfg.heldout_texts, seed=4242, dup_rate=0.0, pii_rate=0.0))
        console.print("building the held-out eval suite with the ingest transforms (bounded mode)...")
        procs.start("eval-suite", _headwater("ingest", "--input", str(heldout), "--stream-root",
                                             str(run / "eval" / "heldout"), "--no-media", "--writer-id", "heldout"))
        if procs.wait("eval-suite", 300) != 0:
            console.print(f"[red]eval suite build failed[/red]\n{procs.log_tail('eval-suite')}")
            return 1

        console.print("training the image RVQ codebooks (headwater discretizer train)...")
        sample = run / "inputs" / "image_sample.jsonl"
        _write_jsonl(sample, image_records(48, seed=1, dup_rate=0.0))
        procs.start("discretizer", _headwater("discretizer", "train", "--modality", "image", "--input", str(sample),
                                              "--out", str(run / "discretizers")))
        if procs.wait("discretizer", 300) != 0:
            console.print(f"[red]codebook training failed[/red]\n{procs.log_tail('discretizer')}")
            return 1
        codebooks = max((run / "discretizers").glob("image-rvq-*"))

        recorder = Recorder(broker, run)
        recorder.start()
        webhook = SignedWebhookReceiver(cfg.webhook_secret.encode(), log_path=run / "webhook.jsonl")
        rules = run / "rules.toml"
        rules.write_text(DEMO_RULES.format(url=webhook.url))
        procs.start("sentinel", _headwater("evaluate", "--role", "sentinel", "--bootstrap", broker.bootstrap,
                                           "--rules", str(rules), "--lineage", str(run / "lineage.jsonl")),
                    env={"HEADWATER_WEBHOOK_SECRET": cfg.webhook_secret, **own_key["sentinel"]})
        procs.start("evaluator", _headwater("evaluate", "--bootstrap", broker.bootstrap, "--eval-root", str(run / "eval"),
                                            "--suite", "heldout", "--train-root", str(run / "stream"), "--wandb", "offline",
                                            "--checkpoint-root", str(run / "checkpoints"),
                                            "--wandb-dir", str(run)), env=ring)
        procs.start("ingest", _headwater("ingest", "--bootstrap", broker.bootstrap, "--group", "demo-ingest",
                                         "--stream-root", str(run / "stream"), "--run-dir", str(run / "ingest"),
                                         "--duration", str(cfg.time_limit_s), "--image-codebooks", str(codebooks)),
                    env=ring)
        producer = Producer(broker, cfg, run)
        producer.start()

        trainer_started = poison_sent = False
        rundir = RunDir(run)
        with Live(console=console, auto_refresh=False) as live:
            while True:
                elapsed = time.monotonic() - started
                now = time.time()
                try:
                    kafka_view = read_kafka(broker.settings, timeout_ms=2000)
                except Exception:  # noqa: BLE001 - the dashboard must not stop the demo
                    kafka_view = None
                live.update(render(kafka_view, read_run(rundir, now=now), now=now), refresh=True)
                if not trainer_started and (run / "stream" / "index.json").exists():
                    procs.start("trainer", _headwater(
                        "train", "--config", "debug_cpu", "--stream-root", str(run / "stream"), "--run-dir", str(run),
                        "--nproc", str(cfg.nproc), "--steps", str(cfg.steps), "--checkpoint-every", str(cfg.checkpoint_every),
                        "--bootstrap", broker.bootstrap, "--mixing", "learnability", "--dataloader.mixing.learn_min_obs", "6",
                        # ingest publishes a round every 19-42 s; at 30 s p95 age is borderline vs 60 s (issue #17)
                        "--dataloader.max_lag_s", "20",
                        "--checkpoint.keep_latest_k", "0"), env=own_key["trainer"])
                    trainer_started = True
                if trainer_started and not producer.join.is_set() and len(_checkpoints(run)) >= cfg.join_after_checkpoints:
                    producer.join.set()
                    live.console.print("source 'leakyforum' joins the stream (clean documents)")
                if trainer_started and not poison_sent and len(_checkpoints(run)) >= cfg.poison_after_checkpoints:
                    producer.poison.set()
                    poison_sent = True
                    live.console.print("[bold yellow]bad-data episode:[/bold yellow] source 'leakyforum' starts leaking PII")
                for name in ("ingest", "sentinel", "evaluator") + (("trainer",) if trainer_started else ()):
                    if not procs.alive(name) and name != "trainer":
                        console.print(f"[red]{name} exited early[/red]\n{procs.log_tail(name)}")
                        return 1
                if trainer_started and not procs.alive("trainer"):
                    code = procs.procs["trainer"].returncode
                    if code != 0:
                        console.print(f"[red]trainer failed ({code})[/red]\n{procs.log_tail('trainer')}")
                        return 1
                    break
                if elapsed > cfg.time_limit_s:
                    console.print("[yellow]time limit reached; stopping[/yellow]")
                    break
                time.sleep(2.0)
        time.sleep(5.0)  # let the last checkpoint's evaluation and alerts land
        return _summary(run, producer, console)
    finally:
        if producer:
            producer.stop_event.set()
        procs.stop_all()
        if recorder:
            recorder.stop_event.set()
            recorder.join(timeout=5)
        if webhook:
            webhook.close()
        broker.stop()
        console.print("all processes stopped; broker down")
        report = run / "report.html"
        from infra.report import main as report_main

        if report_main([str(run), "--out", str(report)]) == 0:
            console.print(f"[bold green]report:[/bold green] {report}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="headwater demo", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="where everything of this run goes (default runs/demo-<time>)")
    p.add_argument("--steps", type=int, help="trainer steps")
    p.add_argument("--time-limit", type=float, help="stop after this many seconds")
    args = p.parse_args(argv)
    cfg = DemoConfig()
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.steps:
        cfg.steps = args.steps
    if args.time_limit:
        cfg.time_limit_s = args.time_limit
    return run_demo(cfg, Console())


if __name__ == "__main__":
    sys.exit(main())
