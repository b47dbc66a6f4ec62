"""Reliability figures for docs/RELIABILITY.md (issue 14).

Fault injection, on real processes (embedded tansu broker, ``headwater ingest``, ``headwater
train`` under torchrun with 2 CPU ranks); the scenarios are the ones tests/test_faults.py
asserts (tests/helpers/fault_scenarios.py):

* ``disk``: streaming ingest onto a 1 MiB tmpfs that fills up, then space is freed;
* ``broker``: the broker SIGSTOPped for ``--pause-s`` while ingest streams and a trainer
  (control listener, metrics and checkpoint events on Kafka) runs, then SIGCONT;
* ``checkpoint``: the latest checkpoint truncated and the one before garbled, then a restart.

Prints one table: faults injected, records lost (must be 0), duplicates, the alert raised and
the recovery time (disk: space freed -> first record settled; broker: SIGCONT -> first record
settled; checkpoint: restart -> first step trained, including torchrun start-up).
Usage: .venv/bin/python bench/bench_reliability.py [--faults disk,broker,checkpoint] [--pause-s 30]
(as root, or under ``unshare -Urm``, for the tmpfs mount) [--fuzz 10000] [--json OUT]

Consumer fuzzing (``--fuzz N``, 0 to skip): N hostile records per topic through every consumer
loop, valid probes interleaved (tests/helpers/fuzz_scenarios.py, as tests/test_fuzz_consumers.py);
a second table gives records fuzzed, undecodable, dead letters, probes lost and crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT))

FAULTS = ("disk", "broker", "checkpoint")


def _row(fault: str, injected: str, lost: int | str, dups: int | str, alert: str, recovery: float | None,
         ok: bool, notes: str = "") -> dict:
    return {"fault": fault, "injected": injected, "lost": lost, "duplicates": dups, "alert": alert,
            "recovery_s": recovery, "ok": ok, "notes": notes}


def run_fault(name: str, tmp: Path, *, pause_s: float) -> dict:
    """Run one fault scenario; its table row."""
    import fault_scenarios as fs

    from streams.broker import EmbeddedBroker

    if name == "checkpoint":
        r = fs.corrupt_checkpoint(tmp)
        alert = r.alerts[0]["rule"] if r.alerts else "NONE"
        ok = r.exit_code == 0 and r.resumed_step is not None and r.losses_match and len(r.moved_aside) == 2
        return _row("corrupt checkpoints", "; ".join(f"step-{s}: {how}" for s, how in r.corrupted.items()),
                    "-", "-", alert, r.recovery_s, ok,
                    f"resumed from step-{r.resumed_step}; re-trained steps {r.retrained[0]}-{r.retrained[-1]} with "
                    f"{'identical' if r.losses_match else 'DIFFERENT'} losses" if r.retrained else "no steps trained")
    with EmbeddedBroker(run_dir=tmp / "broker") as broker:
        if name == "disk":
            r = fs.disk_full_ingest(broker.bootstrap, tmp)
            alert = r.alerts[0]["rule"] + (" + resolved" if r.resolved else "") if r.alerts else "NONE"
            ok = not r.lost and not r.duplicates and r.exit_code == 0 and not r.leftovers and r.settled_while_full_ok
            return _row("disk full", "1 MiB tmpfs filled mid-stream, then freed", len(r.lost), r.duplicates, alert,
                        r.recovery_s, ok, f"{r.records} valid records; exit {r.exit_code}")
        r = fs.broker_pause(broker, tmp, pause_s=pause_s)
        ckpts = sorted(set(r.checkpoint_events))
        ok = (not r.lost and not r.duplicates and r.exit_code == 0 and r.trainer_exit == 0
              and len(r.checkpoint_events) == len(ckpts))
        return _row("broker paused", f"SIGSTOP {pause_s:.0f}s, ingest + trainer running", len(r.lost), r.duplicates,
                    ", ".join(sorted({f"{x['rule']} ({x['source']})" for x in r.alerts})) or "NONE", r.recovery_s, ok,
                    f"{r.records} valid records; {len(r.warnings)} 'unreachable' warnings logged during the pause; "
                    f"trainer exit {r.trainer_exit}, {len(r.trainer_steps)} steps, "
                    f"checkpoint events {r.checkpoint_events}")


def fuzz_consumers(tmp: Path, n: int) -> list[dict]:
    """``n`` hostile records per topic through every consumer loop (a fresh broker each); one row each."""
    import fuzz_scenarios as fz

    rows = []
    for r in fz.fuzz_all(tmp, n):
        on_kafka = not r.topic.endswith(".jsonl")  # the run directory counts bad lines instead of a DLQ
        rows.append({"consumer": r.consumer, "topic": r.topic, "records": r.records, "sources": r.sources,
                     "undecodable": r.undecodable, "dead_letters": r.dead_letters, "probes": r.probes,
                     "lost": r.lost, "crashed": r.crashed, "handler_errors": r.handler_errors,
                     "seconds": round(r.seconds, 1),
                     "ok": not r.crashed and not r.lost and not r.handler_errors
                     and (r.dead_letters == r.undecodable or not on_kafka)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    p.add_argument("--pause-s", type=float, default=30.0, help="broker pause length")
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile records per topic for the consumer fuzz (0: skip)")
    p.add_argument("--json", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from streams.signing import write_dev_keys

    console = Console(width=200)
    rows = []
    with tempfile.TemporaryDirectory(prefix="headwater-reliability-") as tmp:
        os.environ.update(write_dev_keys(os.path.join(tmp, "keys")))  # signed controls and manifests
        faults = [f for f in a.faults.split(",") if f]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("fault injection", total=len(faults))
            for name in faults:
                progress.update(task, description=f"fault: {name}")
                sub = Path(tmp) / name
                sub.mkdir()
                try:
                    rows.append(run_fault(name, sub, pause_s=a.pause_s))
                except BaseException as e:  # e.g. a skipped tmpfs mount (pytest Skipped): report, go on
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    rows.append(_row(name, "-", "?", "?", "-", None, False, f"{type(e).__name__}: {e}"[:300]))
                progress.advance(task)
    table = Table(title="Fault injection")
    for col in ("fault", "injected", "records lost", "duplicates", "alert", "recovery (s)", "ok", "notes"):
        table.add_column(col)
    for r in rows:
        rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        table.add_row(r["fault"], r["injected"], str(r["lost"]), str(r["duplicates"]), r["alert"], rec,
                      "yes" if r["ok"] else "NO", r["notes"])
    console.print(table)
    fuzz = []
    if a.fuzz:
        with tempfile.TemporaryDirectory(prefix="headwater-fuzz-") as tmp:
            os.environ.update(write_dev_keys(os.path.join(tmp, "keys")))
            with console.status(f"fuzzing consumers: {a.fuzz} records per topic"):
                fuzz = fuzz_consumers(Path(tmp), a.fuzz)
        table = Table(title=f"Consumer fuzzing ({a.fuzz} hostile records per topic, 3 valid probes each)")
        for col in ("consumer", "topic", "records", "undecodable", "dead letters", "probes lost", "crashed",
                    "handler errors", "s", "ok"):
            table.add_column(col)
        for r in fuzz:
            table.add_row(r["consumer"], r["topic"], str(r["records"]), str(r["undecodable"]), str(r["dead_letters"]),
                          str(r["lost"]), str(r["crashed"]), str(r["handler_errors"]), str(r["seconds"]),
                          "yes" if r["ok"] else "NO")
        console.print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"faults": rows, "fuzz": fuzz}, f, indent=1, default=lambda o: asdict(o))
    return 0 if all(r["ok"] for r in rows + fuzz) else 1


if __name__ == "__main__":
    sys.exit(main())
