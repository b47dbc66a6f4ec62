"""The run directory: where every component of one run writes, and tolerant readers for it.

Layout of ``RUN`` (one directory per run; `headwater demo` creates it, `headwater report
RUN` and `headwater status --run-dir RUN` read it)::

    RUN/
      broker.port, broker.pid   embedded broker (streams.broker.EmbeddedBroker(run_dir=RUN))
      metrics.jsonl             trainer (trainer/train.py), one object per step: step, loss
                                (null if non-finite), domain_loss{d: x}, weights{d: w},
                                tokens (this batch), tokens_seen, tokens_per_s, data_stall
                                (fraction of the step spent waiting for data), freshness_s
                                (mean sample age at use), wall_time, grad_norm, skipped; and
                                event rows: {"event": "rollback", from_step, to_step, reason,
                                wall_time}
      ingest/metrics.jsonl      ingest, one snapshot of CUMULATIVE counters per line:
                                time, stages{stage: {in, out, drop{reason: n}}} in pipeline
                                order, dup_rate, pii_rate, languages{lang: n},
                                modalities{m: n}, codebook_usage{"audio/0": fraction},
                                shards_published. Also read: ingest/metrics.json, the one
                                summary `headwater ingest --run-dir RUN/ingest` writes
                                (beam_jobs.data_metrics: drop_<reason> counters,
                                language_share), timed by the file's mtime
      evals.jsonl               EvalReport events (streams.events JSON), one per line
      alerts.jsonl              Alert events, one per line
      lineage.jsonl             control decisions (evaluators.lineage.LineageLog): at, action
                                (rollback | quarantine_* | pause_* | skipped), reason, args, rule
      checkpoints/step-N/       trainer DCP checkpoints (headwater.json marks complete)
      stream/                   MDS live stream root(s): index.json (+ sub-streams)

Files are appended while the run is live, so readers skip a torn last line or a line that
is not a JSON object and count it in ``RunDir.bad_lines`` instead of failing; a missing
file reads as empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.events import Alert, EvalReport, EventError
from streams.manifest import read_index

__all__ = ["RunDir", "flatten", "normalize_snapshot", "ordered_stages", "read_jsonl"]


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """JSON objects of a JSON-lines file and the number of lines that were not one."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):  # bad JSON, integers past the digit limit, deep nesting
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    return rows, bad


def flatten(values: Any, prefix: str = "") -> dict[str, float]:
    """Nested ``{a: {b: 1}}`` to ``{"a/b": 1.0}``; non-numeric leaves are dropped."""
    if isinstance(values, dict):
        out: dict[str, float] = {}
        for k, v in values.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(values, (int, float)) and not isinstance(values, bool) and prefix:
        return {prefix: float(values)}
    return {}


def ordered_stages(stages: dict) -> dict[str, dict]:
    """Stage counters in funnel order (most records in first), whatever order the file had."""
    valid = [(k, v) for k, v in stages.items() if isinstance(v, dict)]
    return dict(sorted(valid, key=lambda kv: -_number(kv[1].get("in"))))


def normalize_snapshot(row: dict) -> dict:
    """One ingest snapshot in the layout above, also from ``beam_jobs.data_metrics.summarize``
    output (stage counters ``in``/``out``/``drop_<reason>``, ``language_share``)."""
    out = dict(row)
    stages = {}
    for name, counters in (row.get("stages") or {}).items():
        if not isinstance(counters, dict) or "in" not in counters:
            continue  # counter groups that are not funnel stages (e.g. per-language counts)
        drop = dict(counters.get("drop") or {})
        drop.update({k[len("drop_"):]: v for k, v in counters.items() if k.startswith("drop_")})
        drop = {k: v for k, v in drop.items() if _number(v)}
        stages[name] = {"in": counters["in"], "out": counters.get("out", _number(counters["in"]) - sum(drop.values())),
                        "drop": drop}
    out["stages"] = stages
    if "languages" not in row and isinstance(row.get("language_share"), dict):
        out["languages"] = row["language_share"]
    return out


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


@dataclass(slots=True)
class RunDir:
    """Reader of one run directory (see the module docstring for the layout)."""

    root: Path
    bad_lines: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def trainer_metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def ingest_dir(self) -> Path:
        return self.root / "ingest"

    @property
    def evals_path(self) -> Path:
        return self.root / "evals.jsonl"

    @property
    def alerts_path(self) -> Path:
        return self.root / "alerts.jsonl"

    @property
    def lineage_path(self) -> Path:
        return self.root / "lineage.jsonl"

    @property
    def stream_root(self) -> Path:
        return self.root / "stream"

    @property
    def broker_port_file(self) -> Path:
        return self.root / "broker.port"

    def _rows(self, path: Path) -> list[dict]:
        rows, bad = read_jsonl(path)
        if bad:
            self.bad_lines[str(path.relative_to(self.root))] = bad
        return rows

    def trainer_steps(self) -> list[dict]:
        """Trainer rows with a step and a loss, in file order (steps repeat after a rollback)."""
        return [row for row in self._rows(self.trainer_metrics_path)
                if isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float))]

    def trainer_events(self) -> list[dict]:
        """Trainer event rows (``{"event": "rollback", "from_step", "to_step", ...}``), in file order."""
        return [row for row in self._rows(self.trainer_metrics_path) if isinstance(row.get("event"), str)]

    def ingest_snapshots(self) -> list[dict]:
        """Normalized ingest snapshots, oldest first (``metrics.jsonl``, else ``metrics.json``)."""
        rows = self._rows(self.ingest_dir / "metrics.jsonl")
        single = self.ingest_dir / "metrics.json"
        if not rows and single.is_file():
            try:
                obj = json.loads(single.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.bad_lines["ingest/metrics.json"] = 1
                obj = None
            if isinstance(obj, dict):
                rows = [{"time": single.stat().st_mtime, **obj}]
        return sorted((normalize_snapshot(r) for r in rows), key=lambda r: _number(r.get("time")))

    def evals(self) -> list[EvalReport]:
        """EvalReport events; lines that do not decode count as bad."""
        return list(self._events(self.evals_path, EvalReport))

    def alerts(self) -> list[Alert]:
        """Alert events, oldest first."""
        return sorted(self._events(self.alerts_path, Alert), key=lambda a: a.created_at)

    def lineage(self) -> list[dict]:
        """Control decisions (rollbacks, quarantines, pauses), each with a float ``at``."""
        out = []
        for row in self._rows(self.lineage_path):
            at = row.get("at", row.get("issued_at", row.get("time")))
            if isinstance(at, (int, float)) and isinstance(row.get("action", row.get("command")), str):
                out.append({**row, "at": float(at), "action": row.get("action", row.get("command"))})
        return sorted(out, key=lambda r: r["at"])

    def stream_indexes(self) -> list[tuple[Path, dict]]:
        """Every parsable MDS stream root under the stream root and its index (journal included)."""
        out = []
        if self.stream_root.is_dir():
            for path in sorted(self.stream_root.rglob("index.json")):
                try:
                    index = read_index(str(path.parent))  # with the shards still in its journal
                except (OSError, ValueError):
                    self.bad_lines[str(path.relative_to(self.root))] = 1
                    continue
                if isinstance(index, dict) and isinstance(index.get("shards"), list):
                    out.append((path, index))
        return out

    def shard_counts(self) -> tuple[int, int]:
        """(shards, samples) published under the stream root."""
        shards = samples = 0
        for _, index in self.stream_indexes():
            for shard in index["shards"]:
                shards += 1
                samples += int(shard.get("samples", 0)) if isinstance(shard, dict) else 0
        return shards, samples

    def broker_bootstrap(self) -> str | None:
        """``127.0.0.1:PORT`` of the run's embedded broker, if one is recorded."""
        try:
            return f"127.0.0.1:{int(self.broker_port_file.read_text().strip())}"
        except (OSError, ValueError):
            return None

    def _events(self, path: Path, cls) -> Iterator:
        bad = 0
        for row in self._rows(path):
            try:
                yield cls.from_dict(row)
            except EventError:
                bad += 1
        if bad:
            key = str(path.relative_to(self.root))
            self.bad_lines[key] = self.bad_lines.get(key, 0) + bad

