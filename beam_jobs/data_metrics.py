"""Data metrics of an ingest run: Beam counters -> per-stage in/out/drops, dup/PII rates, language share.

Written to ``<run_dir>/metrics.json``, published as a MetricsEvent on the ``metrics``
topic (streaming) and logged to wandb (offline unless WANDB_MODE says otherwise).
"""

from __future__ import annotations

import json
import os
from typing import Any

from apache_beam.metrics.metric import MetricsFilter

__all__ = ["counters_of", "log_wandb", "publish_metrics", "summarize", "write_metrics"]


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
        stages.setdefault(ns, {})[name] = value
    dedup = stages.get("dedup", {})
    dups = sum(v for k, v in dedup.items() if k.startswith("drop_"))
    pii = stages.get("pii", {})
    docs = stages.get("tokenize", {}).get("docs", 0)
    langs = stages.get("language", {})
    total_lang = sum(langs.values()) or 1
    return {
        "stages": stages,
        "dup_rate": dups / dedup["in"] if dedup.get("in") else 0.0,
        "pii_rate": pii.get("docs", 0) / docs if docs else 0.0,
        "language_share": {k: v / total_lang for k, v in sorted(langs.items())},
        "records_in": stages.get("validate", {}).get("in", 0),
        "samples_written": stages.get("sink", {}).get("samples", 0),
        "dead_letters": stages.get("sink", {}).get("dead_letters", 0),
    }


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


def publish_metrics(bootstrap: str, summary: dict[str, Any], labels: dict[str, str]) -> None:
    from streams.events import MetricsEvent
    from streams.kafka import KafkaSettings, make_producer, publish

    producer = make_producer(KafkaSettings.load(bootstrap=bootstrap))
    try:
        publish(producer, "metrics", MetricsEvent(component="ingest", values=flat_values(summary), labels=labels))
    finally:
        producer.close()


def log_wandb(run_dir: str, summary: dict[str, Any], project: str = "headwater") -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=project, dir=run_dir, job_type="ingest", reinit="finish_previous")
    try:
        run.log(flat_values(summary))
    finally:
        run.finish()
