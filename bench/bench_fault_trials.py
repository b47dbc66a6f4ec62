"""kill -9 fault trials at the new scale: two group workers, local and s3:// roots, kills at named
fault points of the commit protocol or at random moments (tests/helpers/fault_trials.py).

Starts its own embedded tansu broker and local S3 server (moto), runs the seeded plan of the slow
test (``plan(N, seed)``: root kinds alternate, each cycles through its fault points), prints one
line per trial and a table per (root kind, fault point): trials, kills that fired, lost,
duplicated, DLQ copies beyond one, recovery time (kill -> every offset settled) p50/max.
``--budget-s`` stops starting trials after that many seconds (the count run is printed).
Usage: .venv/bin/python bench/bench_fault_trials.py [--trials 50] [--seed 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests" / "helpers"))
from fault_trials import TrialResult, plan, run_trial

BUCKET = "headwater-bench-faults"


def table(results: list[TrialResult]) -> str:
    rows = defaultdict(list)
    for r in results:
        rows[(r.trial.root_kind, r.trial.point or "random time")].append(r)
    head = ("| root | fault point | trials | fired | lost | duplicated | offsets settled twice | "
            "bad records not in DLQ | DLQ copies beyond one | exact dups written | hung | failed | "
            "recovery p50 s | recovery max s |")
    lines = [head, "|" + "---|" * 14]
    for (kind, point), rs in sorted(rows.items()):
        rec = [r.recovery_s for r in rs if r.fired]
        lines.append(
            f"| {kind} | {point} | {len(rs)} | {sum(r.fired for r in rs)} | {sum(r.lost for r in rs)} | "
            f"{sum(r.duplicated for r in rs)} | {sum(r.overlaps + (r.settled != r.records) for r in rs)} | "
            f"{sum(r.dlq_missing for r in rs)} | {sum(r.dlq_copies for r in rs)} | {sum(r.dup_leaks for r in rs)} | "
            f"{sum(bool(r.hung) for r in rs)} | {sum(not r.ok for r in rs)} | "
            f"{statistics.median(rec) if rec else 0:.1f} | {max(rec, default=0):.1f} |")
    rec = [r.recovery_s for r in results if r.fired]
    lines.append(f"\n{len(results)} trials, {sum(r.fired for r in results)} kills fired, "
                 f"{sum(not r.ok for r in results)} failed; recovery p50 {statistics.median(rec) if rec else 0:.1f} s, "
                 f"max {max(rec, default=0):.1f} s")
    return "\n".join(lines)


def main() -> None:
    from infra.local_s3 import start_local_s3
    from streams.broker import EmbeddedBroker

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=None, help="start no trial after this many seconds")
    ap.add_argument("--out", help="write every trial's result as JSON here")
    a = ap.parse_args()
    os.environ.setdefault("HEADWATER_INSECURE_CONTROLS", "1")  # no control is sent in these trials
    results: list[TrialResult] = []
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="fault-trials-")  # kept when a trial fails: its worker logs are evidence
    print(f"work directory {tmp}", flush=True)
    with EmbeddedBroker(run_dir=Path(tmp) / "broker") as broker:
        with open(Path(tmp) / "moto.log", "w") as log:
            s3, env = start_local_s3(BUCKET, log=log)
        os.environ.update(env)
        try:
            for trial in plan(a.trials, seed=a.seed):
                if a.budget_s is not None and time.monotonic() - t0 > a.budget_s:
                    print(f"budget of {a.budget_s:.0f}s spent: stopping after {len(results)} trials", flush=True)
                    break
                r = run_trial(trial, bootstrap=broker.bootstrap, workdir=Path(tmp) / trial.label, bucket=BUCKET)
                results.append(r)
                print(f"{trial.label:40s} fired={r.fired!s:5} lost={r.lost} dup={r.duplicated} leaks={r.dup_leaks} "
                      f"overlaps={r.overlaps} settled={r.settled}/{r.records} dlq_missing={r.dlq_missing} "
                      f"dlq_copies={r.dlq_copies} readable={r.readable} recovery={r.recovery_s:.1f}s "
                      f"total={r.total_s:.0f}s {'OK' if r.ok else 'FAIL ' + (r.error or 'hung: ' + r.hung)[:300]}", flush=True)
                if a.out:
                    Path(a.out).write_text(json.dumps([x.to_dict() for x in results], indent=1))
        finally:
            s3.terminate()
            s3.wait(timeout=30)
    print(table(results))
    print(f"wall {time.monotonic() - t0:.0f}s")
    if all(r.ok for r in results):
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
