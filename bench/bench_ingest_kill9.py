"""Fault injection: SIGKILL the streaming ingest at random moments, restart, check exactly-once.

Each trial produces a fresh corpus (with duplicates and bad records) to its own topic on an
embedded tansu broker, runs `headwater ingest --until-caught-up` as a subprocess, kills it
with SIGKILL 1-3 times at random moments, restarts it until it exits 0, then reads the
stream with a stock StreamingDataset. Baseline printed alongside: the same corpus ingested
without kills (must give the identical id set).
Usage: .venv/bin/python bench/bench_ingest_kill9.py [--trials 20]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from beam_jobs.synthetic import edit_words, english_doc, raw_record

ROOT = Path(__file__).resolve().parent.parent


def corpus(n: int, seed: int):
    rng = random.Random(seed)
    recs, keep = [], set()
    for i in range(n):
        text = english_doc(rng)
        recs.append((f"c{i}", raw_record(f"u{i}", text)))
        keep.add(f"u{i}")
        if i % 4 == 0:
            recs.append((f"c{i}", raw_record(f"u{i}-dup", edit_words(rng, text, 0.01))))
        if i % 9 == 0:
            recs.append((f"c{i}", b'{"broken": '))
    return recs, keep


def ingest(bootstrap: str, topic: str, root: str, kills: int, rng: random.Random) -> int:
    cmd = [sys.executable, "-m", "infra.cli", "ingest", "--bootstrap", bootstrap, "--topics", topic,
           "--stream-root", root, "--until-caught-up"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done_kills = 0
    while True:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if done_kills < kills:
            time.sleep(rng.uniform(2.0, 12.0))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                done_kills += 1
                continue
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"ingest exited {proc.returncode}")
        return done_kills


def ids_in(root: str) -> list[str]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=root, batch_size=1, shuffle=False)
    return [ds[i]["id"] for i in range(len(ds))]


def main() -> None:
    from kafka.admin import NewTopic

    from streams.broker import EmbeddedBroker
    from streams.kafka import KafkaSettings, make_admin, make_producer

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--docs", type=int, default=120)
    a = ap.parse_args()
    lost = dup = extra = kills_total = 0
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(run_dir=Path(tmp) / "broker") as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap)
        producer = make_producer(settings)
        t0 = time.time()
        for trial in range(a.trials):
            rng = random.Random(trial)
            recs, keep = corpus(a.docs, trial)
            topic = f"kill9.{uuid.uuid4().hex[:8]}"
            admin = make_admin(settings)
            admin.create_topics([NewTopic(topic, 2, 1)])
            admin.close()
            for key, value in recs:
                producer.send(topic, key=key.encode(), value=value)
            producer.flush()
            root = os.path.join(tmp, f"s{trial}")
            kills = ingest(broker.bootstrap, topic, root, rng.randint(1, 3), rng)
            ids = ids_in(root)
            t_lost, t_dup, t_extra = len(keep - set(ids)), len(ids) - len(set(ids)), len(set(ids) - keep)
            lost, dup, extra, kills_total = lost + t_lost, dup + t_dup, extra + t_extra, kills_total + kills
            print(f"trial {trial:2d}: {kills} kill(s), {len(set(ids))}/{len(keep)} written, lost {t_lost}, "
                  f"duplicated {t_dup}, unexpected {t_extra}", flush=True)
        print(f"{a.trials} trials, {kills_total} SIGKILLs, lost {lost}, duplicated {dup}, unexpected {extra}, "
              f"{time.time() - t0:.0f}s")
        # Baseline: the last corpus without kills gives the same id set.
        root = os.path.join(tmp, "baseline")
        ingest(broker.bootstrap, topic, root, 0, rng)
        print(f"baseline (no kills) ids identical to last trial: {sorted(ids_in(root)) == sorted(ids)}")
    sys.exit(1 if lost or dup or extra else 0)


if __name__ == "__main__":
    main()
