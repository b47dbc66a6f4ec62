"""Write a small synthetic run directory in the layout of :mod:`infra.run_dir`.

Used by the report/status tests and to preview `headwater report` without running the
loop: ``python -m infra.sample_run /tmp/sample-run && headwater report /tmp/sample-run``.
The run has a bad-data episode: the dup rate spikes, an alert fires, the trainer is
rolled back and the source quarantined.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from streams.events import Alert, EvalReport

__all__ = ["write_sample_run"]

DOMAINS = ("text", "audio", "image", "video")
STAGES = ("decode", "validate", "filter", "dedup", "tokenize", "write")
REASONS = {"decode": ["bad_json"], "validate": ["schema", "empty_payload"],
           "filter": ["lang", "quality", "toxicity"], "dedup": ["exact_dup", "near_dup"],
           "tokenize": ["too_long"], "write": []}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def _ingest(t0: float, rng: random.Random, snapshots: int) -> list[dict]:
    rows, seen = [], 0
    for i in range(snapshots):
        seen += 200
        dup = 0.05 + (0.45 if snapshots // 2 <= i < snapshots // 2 + 3 else 0.0) + rng.random() * 0.02
        stages, flowing = {}, seen
        for stage in STAGES:
            drop = {r: int(flowing * (dup if r == "near_dup" else 0.02)) for r in REASONS[stage]}
            stages[stage] = {"in": flowing, "out": flowing - sum(drop.values()), "drop": drop}
            flowing -= sum(drop.values())
        rows.append({
            "time": t0 + 10 * i, "stages": stages, "dup_rate": round(dup, 4), "pii_rate": 0.03,
            "languages": {"en": seen * 0.5, "de": seen * 0.2, "fr": seen * 0.15, "ja": seen * 0.1, "und": seen * 0.05},
            "modalities": {"text": seen * 0.6, "audio": seen * 0.15, "image": seen * 0.15, "video": seen * 0.1},
            "codebook_usage": {"audio": {"0": 0.81, "1": 0.64}, "image": {"0": 0.72, "1": 0.4}, "video": {"0": 0.03}},
            "shards_published": i + 1,
        })
    return rows


def _trainer(t0: float, rng: random.Random, steps: int, rollback_at: int, back_to: int) -> list[dict]:
    rows = []
    for i in range(steps):
        step = i + 1 if i < rollback_at else back_to + (i - rollback_at) + 1
        raw = [math.exp(rng.gauss(0, 0.2)) for _ in DOMAINS]
        weights = {d: w / sum(raw) for d, w in zip(DOMAINS, raw)}
        bad = 1.5 if rollback_at - 15 <= i < rollback_at else 0.0  # the bad-data episode
        dl = {d: 8.0 * math.exp(-step / (40 + 10 * k)) + 2 + 0.05 * rng.random() + (bad if d == "text" else 0)
              for k, d in enumerate(DOMAINS)}
        if i == rollback_at:
            rows.append({"step": rollback_at, "event": "rollback", "from_step": rollback_at, "to_step": back_to,
                         "reason": "eval_regression", "wall_time": t0 + 5 + 1.5 * i})
        rows.append({"step": step, "wall_time": t0 + 5 + 1.5 * i, "loss": sum(dl[d] * weights[d] for d in DOMAINS),
                     "domain_loss": dl, "weights": weights, "tokens": 2048, "tokens_seen": 2048 * (i + 1),
                     "tokens_per_s": 1300 + 100 * rng.random(), "data_stall": 0.05 * rng.random(),
                     "freshness_s": 4 + rng.expovariate(0.3)})
    return rows


def write_sample_run(root: str | Path, *, steps: int = 120, seed: int = 0) -> Path:
    """Write the synthetic run under ``root`` and return its path."""
    root, rng, t0 = Path(root), random.Random(seed), 1_700_000_000.0
    rollback_at, back_to = steps * 2 // 3, steps // 2
    _write_jsonl(root / "ingest" / "metrics.jsonl", _ingest(t0, rng, 20))
    _write_jsonl(root / "metrics.jsonl", _trainer(t0, rng, steps, rollback_at, back_to))
    evals = [EvalReport(run_id="sample", step=s, checkpoint_path=f"{root}/checkpoints/step-{s}", suite="heldout",
                        vocab_version="v1", metrics={"text/ppl": 40 - s / 5 + (30 if s == rollback_at else 0),
                                                     "audio/ppl": 60 - s / 4},
                        passed=s != rollback_at, created_at=t0 + 5 + 1.5 * s)
             for s in [*range(10, rollback_at, 10), rollback_at]]
    _write_jsonl(root / "evals.jsonl", [e.to_dict() for e in evals])
    t_alert = t0 + 5 + 1.5 * rollback_at
    alerts = [Alert(rule="dup_rate_spike", severity="critical", message="near-dup rate 0.5 vs median 0.06",
                    source="ingest", evidence={"source": "crawl-7"}, created_at=t0 + 100),
              Alert(rule="eval_regression", severity="critical", message="text/ppl regressed 70%",
                    source="evaluator", created_at=t_alert)]
    _write_jsonl(root / "alerts.jsonl", [a.to_dict() for a in alerts])
    _write_jsonl(root / "lineage.jsonl", [
        {"at": t0 + 101, "action": "quarantine_source", "reason": "dup_rate_spike", "rule": "dup_rate_spike",
         "args": {"source": "crawl-7"}},
        {"at": t_alert + 1, "action": "rollback", "reason": "eval_regression", "rule": "eval_regression",
         "args": {"target": "last_good", "run_id": "sample", "step": back_to}},
    ])
    index = {"version": 2, "shards": [{"samples": 64, "raw_data": {"basename": f"shard.{i:05}.mds"}}
                                      for i in range(20)]}
    (root / "stream").mkdir(parents=True, exist_ok=True)
    (root / "stream" / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return root


if __name__ == "__main__":
    print(write_sample_run(sys.argv[1] if len(sys.argv) > 1 else "runs/sample"))
