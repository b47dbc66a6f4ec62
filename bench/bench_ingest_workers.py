"""Ingest throughput with 1 and with 2 workers in one consumer group (issue 12, on this machine).

Starts an embedded tansu broker, produces ``--records`` unique English documents keyed over a
4-partition topic, then for each worker count runs ``headwater ingest --workers N
--until-caught-up`` on a fresh stream root. Reports the wall time (process start to exit:
imports, group join, rebalances included), the same command's wall time on an empty 4-partition
topic (the fixed cost: imports, join, caught-up check), and the net rate
records / (wall - fixed). Prints a markdown table (docs/BENCHMARKS.md, "Ingest workers").

    .venv/bin/python bench/bench_ingest_workers.py [--records 3000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests" / "helpers"))

from beam_jobs.settlement import ResumePlan
from beam_jobs.synthetic import english_doc, raw_record
from streams.broker import EmbeddedBroker
from streams.kafka import KafkaSettings, make_producer


def produce(bootstrap: str, topic: str, n: int) -> None:
    rng = random.Random(0)
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    for i in range(n):
        producer.send(topic, value=raw_record(f"b{i}", english_doc(rng)), key=f"b{i}".encode())
    producer.flush()
    producer.close()


def one_run(bootstrap: str, topic: str, workers: int, n: int, tmp: str) -> float:
    """Wall seconds of one ``--workers`` run that settles all ``n`` records of ``topic``."""
    root = os.path.join(tmp, f"s{workers}-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "infra.cli", "ingest", "--bootstrap", bootstrap, "--topics", topic,
           "--stream-root", root, "--group", f"bench-{os.path.basename(root)}", "--workers", str(workers),
           "--writer-id", "bench", "--until-caught-up", "--no-control", "--window-s", "1", "--min-doc-words", "50"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed:\n{proc.stderr.decode()[-3000:]}")
    if (count := ResumePlan.of_stream(root).count()) != n:
        raise SystemExit(f"{count} of {n} records settled")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    from kafka_topics import create_topic

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(run_dir=Path(tmp) / "broker") as broker:
        topic = create_topic(broker.bootstrap, "bench.workers", partitions=4)
        empty = create_topic(broker.bootstrap, "bench.empty", partitions=4)
        produce(broker.bootstrap, topic, a.records)
        walls: dict[int, list[float]] = {1: [], 2: []}
        fixed: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(a.repeat):
            for workers in (1, 2):
                fixed[workers].append(one_run(broker.bootstrap, empty, workers, 0, tmp))
                walls[workers].append(one_run(broker.bootstrap, topic, workers, a.records, tmp))
                print(f"workers={workers}: wall {walls[workers][-1]:.1f} s, fixed {fixed[workers][-1]:.1f} s",
                      file=sys.stderr)
    net = {w: a.records / max(1e-9, min(walls[w]) - min(fixed[w])) for w in walls}
    print(f"| workers | records | wall s (best of {a.repeat}) | fixed s (empty topic) | net records/s |")
    print("|---|---|---|---|---|")
    for w, runs in walls.items():
        print(f"| {w} | {a.records:,} | {min(runs):.1f} | {min(fixed[w]):.1f} | {net[w]:.0f} |")
    print(f"\n2 workers / 1 worker: wall-time speed-up {min(walls[1]) / min(walls[2]):.2f}x, net-rate ratio "
          f"{net[2] / net[1]:.2f}x (os.cpu_count() = {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
