"""The wandb dashboard spec covers every report section and names keys the components really log."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import yaml

from infra.report import SECTIONS, RunData, build_sections
from infra.run_dir import RunDir
from infra.sample_run import write_sample_run
from trainer.metrics_log import _flatten

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "infra" / "wandb" / "dashboard.yaml").read_text())


def test_dashboard_spec_covers_every_report_section(tmp_path):
    panels = [p for s in SPEC["sections"] for p in s["panels"]]
    assert all(p["title"] and p["keys"] and p["type"] for p in panels)
    assert {s["job_type"] for s in SPEC["sections"]} == {"ingest", "train", "evaluate"}
    covered = {p["report_section"] for p in panels if "report_section" in p}
    keys = [s.key for s in build_sections(RunData.load(RunDir(tmp_path)))]
    assert len(keys) == len(SECTIONS) and covered == set(keys)


def test_training_panels_match_keys_the_trainer_logs(tmp_path):
    run = write_sample_run(tmp_path, steps=5)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    logged = set(_flatten(row))  # what trainer/metrics_log.py sends to wandb for a step record
    (train,) = [s for s in SPEC["sections"] if s["job_type"] == "train"]
    for panel in train["panels"]:
        for key in panel["keys"]:
            assert fnmatch.filter(logged, key), f"{panel['title']}: no logged key matches {key!r}"
