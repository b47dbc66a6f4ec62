"""`headwater status`: a live terminal dashboard of a running loop.

Kafka side (through the admin API): end offsets of every registered topic and the lag of
every consumer group (end offset minus committed offset, per topic). Run-directory side
(:mod:`infra.run_dir`): records/s per ingest stage and drop reasons, shards published,
trainer step/loss/tokens/s/data stall/freshness, domain weights, last eval, open alerts.
``--once`` prints one frame and exits; otherwise the frame refreshes until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kafka import TopicPartition
from kafka.admin import OffsetSpec
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from infra.run_dir import RunDir, ordered_stages
from streams.events import Alert, EvalReport
from streams.kafka import KafkaSettings, make_admin
from streams.topics import TOPICS

__all__ = ["KafkaView", "RunView", "main", "read_kafka", "read_run", "render"]


@dataclass(kw_only=True, slots=True)
class KafkaView:
    """Topic end offsets and consumer-group lag, or the error that prevented reading them."""

    bootstrap: str
    end_offsets: dict[str, int] = field(default_factory=dict)
    lag: dict[tuple[str, str], int] = field(default_factory=dict)  # (group, topic) -> records behind
    error: str = ""


@dataclass(kw_only=True, slots=True)
class RunView:
    """What the run directory says right now."""

    stage_rates: dict[str, float] = field(default_factory=dict)  # records/s out of each stage
    stage_totals: dict[str, dict] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # "stage/reason" -> records
    shards: int = 0
    licenses: dict[str, int] = field(default_factory=dict)  # records admitted per license
    trainer: dict = field(default_factory=dict)  # the last metrics.jsonl row
    last_eval: EvalReport | None = None
    open_alerts: list[Alert] = field(default_factory=list)
    rollbacks: int = 0


def read_kafka(settings: KafkaSettings, *, timeout_ms: int = 5000) -> KafkaView:
    """End offsets of all registered topics and the lag of every consumer group."""
    view = KafkaView(bootstrap=settings.bootstrap)
    try:
        admin = make_admin(replace(settings, extra={
            **settings.extra, "request_timeout_ms": timeout_ms, "bootstrap_timeout_ms": timeout_ms}))
    except Exception as e:  # noqa: BLE001 - an unreachable broker is shown, not raised
        view.error = f"cannot reach Kafka at {settings.bootstrap}: {e}"
        return view
    try:
        topics = set(admin.list_topics())
        partitions = [TopicPartition(t.name, p) for t in TOPICS.values() if t.name in topics
                      for p in range(t.partitions)]
        ends = {tp: info.offset for tp, info in admin.list_partition_offsets(
            {tp: OffsetSpec.LATEST for tp in partitions}).items()}
        for tp, end in ends.items():
            view.end_offsets[tp.topic] = view.end_offsets.get(tp.topic, 0) + end
        groups = sorted(g["group_id"] for g in admin.list_groups())
        if groups:
            for group, offsets in admin.list_group_offsets({g: None for g in groups}).items():
                for tp, committed in offsets.items():
                    if tp in ends and committed.offset >= 0:
                        key = (group, tp.topic)
                        view.lag[key] = view.lag.get(key, 0) + max(0, ends[tp] - committed.offset)
    except Exception as e:  # noqa: BLE001
        view.error = f"Kafka admin request failed: {e}"
    finally:
        admin.close()
    return view


def read_run(run: RunDir, *, now: float | None = None, alert_window_s: float = 900.0) -> RunView:
    """Rates from the last two ingest snapshots, the last trainer row, recent alerts."""
    view = RunView()
    snaps = [s for s in run.ingest_snapshots() if isinstance(s.get("stages"), dict)]
    if snaps:
        last = snaps[-1]
        view.stage_totals = ordered_stages(last["stages"])
        if isinstance(last.get("licenses"), dict):
            view.licenses = {str(k): int(v) for k, v in last["licenses"].items() if isinstance(v, (int, float))}
        for stage, s in view.stage_totals.items():
            for reason, n in s.get("drop", {}).items():
                view.drops[f"{stage}/{reason}"] = int(n)
        if len(snaps) > 1 and isinstance(last.get("time"), (int, float)):
            prev = snaps[-2]
            dt = float(last["time"]) - float(prev.get("time", last["time"]))
            for stage, s in view.stage_totals.items():
                before = prev["stages"].get(stage, {}) if isinstance(prev["stages"].get(stage), dict) else {}
                if dt > 0:
                    view.stage_rates[stage] = (float(s.get("out", 0)) - float(before.get("out", 0))) / dt
    view.shards = run.shard_counts()[0]
    if not view.shards and snaps and isinstance(snaps[-1].get("shards_published"), int):
        view.shards = snaps[-1]["shards_published"]
    steps = run.trainer_steps()
    view.trainer = steps[-1] if steps else {}
    evals = run.evals()
    view.last_eval = max(evals, key=lambda e: (e.created_at, e.step)) if evals else None
    now = time.time() if now is None else now
    view.open_alerts = [a for a in run.alerts() if now - a.created_at <= alert_window_s]
    view.rollbacks = sum(1 for x in run.lineage() if x["action"] == "rollback")
    return view


def _kafka_panel(k: KafkaView | None) -> Panel:
    if k is None:
        return Panel("no broker given (--bootstrap) or recorded in the run directory", title="Kafka")
    if k.error:
        return Panel(f"[red]{k.error}[/red]", title=f"Kafka {k.bootstrap}")
    t = Table(box=None, expand=False)
    t.add_column("topic")
    t.add_column("records", justify="right")
    for name in TOPICS:
        if name in k.end_offsets:
            t.add_row(name, str(k.end_offsets[name]))
    lag = Table(box=None)
    lag.add_column("consumer group")
    lag.add_column("topic")
    lag.add_column("lag", justify="right")
    for (group, topic), n in sorted(k.lag.items()):
        lag.add_row(group, topic, f"[red]{n}[/red]" if n > 1000 else str(n))
    if not k.lag:
        lag.add_row("(no committed offsets)", "", "")
    return Panel(Group(t, lag), title=f"Kafka {k.bootstrap}")


def _ingest_panel(r: RunView) -> Panel:
    if not r.stage_totals:
        return Panel("no data (ingest/metrics.jsonl)", title="Ingest")
    t = Table(box=None)
    for col in ("stage", "in", "out", "records/s"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in r.stage_totals.items():
        rate = r.stage_rates.get(stage)
        t.add_row(stage, str(s.get("in", 0)), str(s.get("out", 0)), "-" if rate is None else f"{rate:.1f}")
    drops = Table(box=None)
    drops.add_column("dropped: stage/reason")
    drops.add_column("records", justify="right")
    for key, n in sorted(r.drops.items(), key=lambda kv: -kv[1])[:8]:
        drops.add_row(key, str(n))
    total = sum(r.licenses.values())
    licenses = Table(box=None)
    licenses.add_column("license")
    licenses.add_column("records", justify="right")
    licenses.add_column("share", justify="right")
    for name, n in sorted(r.licenses.items(), key=lambda kv: -kv[1])[:8]:
        licenses.add_row(name, str(n), f"{n / total:.1%}")
    return Panel(Group(t, drops, licenses, f"shards published: [bold]{r.shards}[/bold]"), title="Ingest")


def _trainer_panel(r: RunView) -> Panel:
    m = r.trainer
    if not m:
        return Panel("no data (metrics.jsonl)", title="Trainer")
    t = Table(box=None, show_header=False)
    for label, key, fmt in (("step", "step", "{}"), ("loss", "loss", "{:.4f}"), ("tokens", "tokens_seen", "{}"),
                            ("tokens/s", "tokens_per_s", "{:.0f}"), ("data stall", "data_stall", "{:.1%}"),
                            ("freshness (s)", "freshness_s", "{:.1f}")):
        v = m.get(key)
        t.add_row(label, fmt.format(v) if isinstance(v, (int, float)) else "-")
    t.add_row("rollbacks", str(r.rollbacks))
    w = Table(box=None)
    w.add_column("domain")
    w.add_column("weight", justify="right")
    w.add_column("loss", justify="right")
    for d, v in sorted((m.get("weights") or {}).items()):
        dl = (m.get("domain_loss") or {}).get(d)
        w.add_row(d, f"{v:.3f}", f"{dl:.3f}" if isinstance(dl, (int, float)) else "-")
    return Panel(Group(t, w), title="Trainer")


def _eval_alert_panel(r: RunView, now: float) -> Panel:
    parts: list = []
    e = r.last_eval
    if e is None:
        parts.append("last eval: no data (evals.jsonl)")
    else:
        status = "[green]pass[/green]" if e.passed else f"[red]FAIL[/red] {e.error or ''}"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(e.metrics.items()))
        parts.append(f"last eval: step {e.step} {e.suite} {status} {metrics}")
    t = Table(box=None)
    for col in ("age", "severity", "rule", "message"):
        t.add_column(col)
    for a in r.open_alerts[-6:]:
        color = {"critical": "red", "warning": "yellow"}.get(a.severity, "blue")
        t.add_row(f"{now - a.created_at:.0f}s", f"[{color}]{a.severity}[/{color}]", a.rule, a.message)
    parts.append(t if r.open_alerts else "open alerts: none")
    return Panel(Group(*parts), title="Evals and alerts")


def render(kafka: KafkaView | None, run: RunView | None, *, now: float | None = None) -> Group:
    """One dashboard frame."""
    now = time.time() if now is None else now
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1)
    grid.add_column(ratio=1)
    if run is None:
        grid.add_row(_kafka_panel(kafka), Panel("no run directory given (--run-dir)", title="Run"))
    else:
        grid.add_row(_kafka_panel(kafka), _ingest_panel(run))
        grid.add_row(_trainer_panel(run), _eval_alert_panel(run, now))
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return Group(f"[bold]headwater status[/bold]  {stamp}", grid)


def _frame(settings: KafkaSettings | None, run: RunDir | None, alert_window_s: float) -> Group:
    now = time.time()
    return render(read_kafka(settings) if settings else None,
                  read_run(run, now=now, alert_window_s=alert_window_s) if run else None, now=now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwater status", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: RUN_DIR/broker.port, then env)")
    parser.add_argument("--kafka-config", help="TOML file with a [kafka] table (SASL/TLS settings)")
    parser.add_argument("--run-dir", type=Path, help="run directory to read (layout: infra/run_dir.py)")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--alert-window", type=float, default=900.0, help="alerts younger than this are open (s)")
    parser.add_argument("--width", type=int, default=None, help="console width (default: terminal)")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir) if args.run_dir else None
    if run is not None and not run.root.is_dir():
        print(f"headwater status: run directory not found: {run.root}", file=sys.stderr)
        return 2
    bootstrap = args.bootstrap or (run.broker_bootstrap() if run else None)
    try:
        settings = KafkaSettings.load(args.kafka_config, bootstrap=bootstrap) if (
            bootstrap or args.kafka_config) else None
    except ValueError as e:
        print(f"headwater status: {e}", file=sys.stderr)
        return 2
    console = Console(width=args.width)
    if args.once:
        console.print(_frame(settings, run, args.alert_window))
        return 0
    try:
        with Live(_frame(settings, run, args.alert_window), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(_frame(settings, run, args.alert_window), refresh=True)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
