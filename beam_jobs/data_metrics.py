"""Data metrics of an ingest run: Beam counters -> per-stage in/out/drops, dup/PII rates, language share.

Written to ``<run_dir>/metrics.json`` (the run's summary) and, one cumulative snapshot per
micro-batch, appended to ``<run_dir>/metrics.jsonl`` (layout: infra/run_dir.py); published on
ingest's own ``metrics.ingest`` topic as a job-level MetricsEvent plus one per source (labels ``{"source"}``,
values ``dup_rate``, ``pii_rate``: what the ingest rules of infra/alerts/rules.toml read), and
logged to wandb (offline unless WANDB_MODE says otherwise).

Counter groups that are not funnel stages: ``by_source/<source>|<in|docs|dup|pii>`` and
``codebook/<used|size>:<modality>/<level>`` (media health), ``language/<lang>`` and ``license/<license>``
(records admitted by validate, per license).
"""

from __future__ import annotations

import json
import os
from typing import Any

from apache_beam.metrics.metric import MetricsFilter

__all__ = [
    "append_snapshot", "counters_of", "log_wandb", "publish_events", "publish_metrics", "snapshot", "source_events",
    "summarize", "write_metrics",
]
NOT_STAGES = ("by_source", "codebook")


def counters_of(result) -> dict[str, int]:
    """All committed (else attempted) counters of a pipeline result, as ``namespace/name``."""
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        key = f"{c.key.metric.namespace}/{c.key.metric.name}"
        value = c.committed if c.committed is not None else c.attempted
        out[key] = out.get(key, 0) + int(value or 0)
    return out


def summarize(counters: dict[str, int]) -> dict[str, Any]:
    """Stage table + derived rates from raw counters."""
    stages: dict[str, dict[str, int]] = {}
    for key, value in counters.items():
        ns, name = key.split("/", 1)
        if ns not in NOT_STAGES:
            stages.setdefault(ns, {})[name] = value
    dedup = stages.get("dedup", {})
    dups = sum(v for k, v in dedup.items() if k.startswith("drop_"))
    pii = stages.get("pii", {})
    docs = stages.get("tokenize", {}).get("docs", 0)
    langs = stages.get("language", {})
    total_lang = sum(langs.values()) or 1
    licenses = stages.get("license", {})
    return {
        "stages": stages,
        "dup_rate": dups / dedup["in"] if dedup.get("in") else 0.0,
        "pii_rate": pii.get("docs", 0) / docs if docs else 0.0,
        "language_share": {k: v / total_lang for k, v in sorted(langs.items())},
        "license_share": {k: v / (sum(licenses.values()) or 1) for k, v in sorted(licenses.items())},
        "records_in": stages.get("validate", {}).get("in", 0),
        "samples_written": stages.get("sink", {}).get("samples", 0),
        "dead_letters": stages.get("sink", {}).get("dead_letters", 0),
        "sources": source_rates(counters),
        "codebook_usage": codebook_usage(counters),
    }


def source_rates(counters: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per text source: in, docs (kept), dup, pii counts and dup_rate = dup / (docs + dup) (the
    share of documents reaching dedup that were duplicates), pii_rate = pii / docs."""
    out: dict[str, dict[str, float]] = {}
    for key, value in counters.items():
        if key.startswith("by_source/"):
            source, kind = key[len("by_source/"):].rsplit("|", 1)
            out.setdefault(source, {"in": 0, "docs": 0, "dup": 0, "pii": 0})[kind] = value
    for c in out.values():
        c["dup_rate"] = c["dup"] / (c["docs"] + c["dup"]) if c["docs"] + c["dup"] else 0.0
        c["pii_rate"] = c["pii"] / c["docs"] if c["docs"] else 0.0
    return dict(sorted(out.items()))


def codebook_usage(counters: dict[str, int]) -> dict[str, float]:
    """Fraction of codes used per ``"modality/level"`` from the media health counters."""
    used = {k[len("codebook/used:"):]: v for k, v in counters.items() if k.startswith("codebook/used:")}
    size = {k[len("codebook/size:"):]: v for k, v in counters.items() if k.startswith("codebook/size:")}
    return {k: used[k] / size[k] for k in sorted(used) if size.get(k)}


def _stage_row(counters: dict[str, int]) -> dict[str, Any] | None:
    n_in = counters.get("in", sum(v for k, v in counters.items() if k.startswith("in_")))
    if not n_in and "in" not in counters:
        return None
    drop = {k.split("_", 1)[1]: v for k, v in counters.items() if k.startswith(("drop_", "dlq_")) and v}
    n_out = counters.get("out", sum(v for k, v in counters.items() if k.startswith("out_")))
    return {"in": n_in, "out": n_out, "drop": drop}


def snapshot(summary: dict[str, Any], *, codebook: dict[str, float], at: float) -> dict[str, Any]:
    """One ``metrics.jsonl`` line (infra/run_dir.py layout) from a cumulative :func:`summarize`."""
    stages = {ns: row for ns, c in summary["stages"].items() if (row := _stage_row(c)) is not None}
    validate = summary["stages"].get("validate", {})
    return {
        "time": at,
        "stages": stages,
        "dup_rate": summary["dup_rate"],
        "pii_rate": summary["pii_rate"],
        "languages": dict(sorted(summary["stages"].get("language", {}).items())),
        "licenses": dict(sorted(summary["stages"].get("license", {}).items())),
        "modalities": {k[len("out_"):]: v for k, v in sorted(validate.items()) if k.startswith("out_")},
        "codebook_usage": dict(sorted(codebook.items())),
        "shards_published": summary["stages"].get("sink", {}).get("shards", 0),
        "samples_written": summary["samples_written"],
        "dead_letters": summary["dead_letters"],
        "sources": summary["sources"],
        "consumer_guard": dict(sorted(summary["stages"].get("consumer_guard", {}).items())),
    }


def append_snapshot(run_dir: str, row: dict[str, Any]) -> str:
    """Append one line to ``<run_dir>/metrics.jsonl`` (a single write, flushed and fsynced)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError:  # e.g. ENOSPC: never leave a partial line behind
            f.truncate(size)
            raise
    return path


def source_events(summary: dict[str, Any], labels: dict[str, str]):
    """One ``MetricsEvent(component="ingest")`` per source: labels ``{"source": S, **labels}``."""
    from streams.events import MetricsEvent

    return [
        MetricsEvent(component="ingest", labels={**labels, "source": source},
                     values={k: float(c[k]) for k in ("dup_rate", "pii_rate", "in", "docs", "dup", "pii")})
        for source, c in summary["sources"].items()
    ]


def publish_events(bootstrap: str, events: list) -> None:
    """Publish MetricsEvents to ``metrics.ingest`` (keyed by source when labelled)."""
    from streams.kafka import KafkaSettings, make_producer, publish

    producer = make_producer(KafkaSettings.load(bootstrap=bootstrap))
    try:
        for event in events:
            publish(producer, "metrics.ingest", event, key=event.labels.get("source"))
        producer.flush()
    finally:
        producer.close()


def flat_values(summary: dict[str, Any]) -> dict[str, float]:
    vals: dict[str, float] = {f"{ns}.{k}": float(v) for ns, d in summary["stages"].items() for k, v in d.items()}
    vals.update({f"language_share.{k}": v for k, v in summary["language_share"].items()})
    for k in ("dup_rate", "pii_rate", "records_in", "samples_written", "dead_letters"):
        vals[k] = float(summary[k])
    return vals


def write_metrics(run_dir: str, summary: dict[str, Any]) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def publish_metrics(bootstrap: str, summary: dict[str, Any], labels: dict[str, str], *, per_source: bool = True) -> None:
    """The job-level MetricsEvent and (``per_source``) the per-source ones."""
    from streams.events import MetricsEvent

    job = MetricsEvent(component="ingest", values=flat_values(summary), labels=labels)
    publish_events(bootstrap, [job, *(source_events(summary, labels) if per_source else [])])


def log_wandb(run_dir: str, summary: dict[str, Any], project: str = "headwater") -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=project, dir=run_dir, job_type="ingest", reinit="finish_previous")
    try:
        run.log(flat_values(summary))
    finally:
        run.finish()
