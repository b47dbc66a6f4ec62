"""kill -9 fault trials at the new scale: two group workers, local and s3:// roots, kills at named
fault points of the commit protocol or at random moments (tests/helpers/fault_trials.py).

Starts its own embedded tansu broker and local S3 server (moto), runs the seeded plan of the slow
test (``plan(N, seed)``: root kinds alternate, each cycles through its fault points), prints one
line per trial and a table per (root kind, fault point): trials, kills that fired, lost,
duplicated, DLQ copies beyond one, recovery time (kill -> every offset settled) p50/max.
``--budget-s`` stops starting trials after that many seconds (the count run is printed).
Usage: .venv/bin/python bench/bench_fault_trials.py [--trials 50] [--seed 1] [--kinds local,s3] [--points P,...]
       [--out results.json]
       .venv/bin/python bench/bench_fault_trials.py --table results.json
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
import fault_trials
from fault_trials import Trial, TrialResult, plan, run_trial

BUCKET = "headwater-bench-faults"


def table(results: list[TrialResult]) -> str:
    """Per (root kind, fault point): data columns over the trials whose checks ran (``readable``);
    trials that ended in an error (a stall, a crash) are counted under "error", not as data."""
    rows = defaultdict(list)
    for r in results:
        rows[(r.trial.root_kind, r.trial.point or "random time")].append(r)
    head = ("| root | fault point | trials | kills fired | checked | lost | duplicated | offsets settled twice "
            "or unsettled | bad records not in DLQ | DLQ copies beyond one | exact dups written | hung | error | "
            "recovery p50 s | recovery max s |")
    lines = [head, "|" + "---|" * 15]

    def recovery(rs: list[TrialResult]) -> list[float]:
        return [r.recovery_s for r in rs if r.fired and r.readable and not r.error]

    for (kind, point), rs in sorted(rows.items()):
        ck, rec = [r for r in rs if r.readable], recovery(rs)
        lines.append(
            f"| {kind} | {point} | {len(rs)} | {sum(r.fired for r in rs)} | {len(ck)} | {sum(r.lost for r in ck)} | "
            f"{sum(r.duplicated for r in ck)} | {sum(r.overlaps + (r.settled != r.records) for r in ck)} | "
            f"{sum(r.dlq_missing for r in ck)} | {sum(r.dlq_copies for r in ck)} | {sum(r.dup_leaks for r in ck)} | "
            f"{sum(bool(r.hung) for r in rs)} | {sum(bool(r.error) for r in rs)} | "
            f"{statistics.median(rec) if rec else 0:.1f} | {max(rec, default=0):.1f} |")
    rec, ck = recovery(results), [r for r in results if r.readable]
    lines.append(f"\n{len(results)} trials, {sum(r.fired for r in results)} kills fired, {len(ck)} checked: "
                 f"lost {sum(r.lost for r in ck)}, duplicated {sum(r.duplicated for r in ck)}; "
                 f"{sum(not r.ok for r in results)} not ok; recovery (kill -> all settled) "
                 f"p50 {statistics.median(rec) if rec else 0:.1f} s, max {max(rec, default=0):.1f} s")
    return "\n".join(lines)


def load(path: str) -> list[TrialResult]:
    """Results written by ``--out`` (to print the table again)."""
    out = []
    for d in json.loads(Path(path).read_text()):
        trial = Trial(**{k: v for k, v in d.pop("trial").items() if k != "label"})
        d.pop("ok")
        out.append(TrialResult(trial=trial, **d))
    return out


def main() -> None:
    from infra.local_s3 import start_local_s3
    from streams.broker import EmbeddedBroker

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=None, help="start no trial after this many seconds")
    ap.add_argument("--kinds", default="local,s3", help="root kinds to alternate (comma-separated: local, s3)")
    ap.add_argument("--points", help="only these fault points (comma-separated; 'random' for a random moment)")
    ap.add_argument("--out", help="write every trial's result as JSON here")
    ap.add_argument("--table", metavar="JSON", help="only print the table of results written by --out")
    a = ap.parse_args()
    if a.table:
        print(table(load(a.table)))
        return
    os.environ.setdefault("HEADWATER_INSECURE_CONTROLS", "1")  # no control is sent in these trials
    if a.points:
        wanted = [None if p == "random" else p for p in a.points.split(",")]
        for points in (fault_trials.LOCAL_POINTS, fault_trials.S3_POINTS):
            points[:] = [p for p in points if p in wanted] or points
    results: list[TrialResult] = []
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="fault-trials-")  # kept when a trial fails: its worker logs are evidence
    print(f"work directory {tmp}", flush=True)
    with EmbeddedBroker(run_dir=Path(tmp) / "broker") as broker:
        with open(Path(tmp) / "moto.log", "w") as log:
            s3, env = start_local_s3(BUCKET, log=log)
        os.environ.update(env)
        try:
            for trial in plan(a.trials, seed=a.seed, kinds=tuple(a.kinds.split(","))):
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
