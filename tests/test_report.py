"""`headwater report`: sections from a synthetic run, robustness to missing/torn files, Chromium render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from infra.cli import main as cli_main
from infra.report import RunData, build_sections, write_report
from infra.run_dir import RunDir
from infra.sample_run import write_sample_run

ALL = ["funnel", "rates", "shares", "codebook", "weights", "loss", "evals", "freshness", "timeline"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_run(tmp_path_factory.mktemp("run"), steps=60)


def test_every_section_has_data_and_an_embedded_plot(sample, tmp_path):
    out = tmp_path / "r.html"
    assert cli_main(["report", str(sample), "--out", str(out)]) == 0
    page = out.read_text()
    sections = {s.key: s for s in build_sections(RunData.load(RunDir(sample)))}
    assert list(sections) == ALL and all(s.has_data for s in sections.values())
    assert page.count('src="data:image/png;base64,') == len(ALL)
    assert not re.search(r'(src|href)="(https?:)?//', page), "report must be self-contained"
    # numbers from the run reach the page: drop reasons, the rollback, the failed eval
    assert "near_dup" in page and "rollback" in page and "FAIL" in page
    assert "steps were rolled back" in page


def test_empty_run_dir_says_no_data_everywhere(tmp_path):
    path = write_report(tmp_path)
    page = path.read_text()
    assert path == tmp_path / "report.html"
    assert page.count("no data:") == len(ALL)
    assert "data:image/png" not in page


def test_torn_lines_and_partial_parts_are_skipped_and_counted(sample, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sample, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 1.0, "weig')  # a writer died mid-line
    (run / "evals.jsonl").write_text('{"kind": "EvalReport", "schema_version": 99}\n[1, 2]\n')
    (run / "alerts.jsonl").unlink()
    (run / "lineage.jsonl").unlink()
    data = RunData.load(RunDir(run))
    assert data.bad_lines == {"metrics.jsonl": 1, "evals.jsonl": 2}
    sections = {s.key: s for s in build_sections(data)}
    assert not sections["evals"].has_data
    timeline = sections["timeline"].body  # the trainer's own rollback event still marks the timeline
    assert "no data: no alerts" in timeline and "no data: no control actions" in timeline
    assert sections["loss"].has_data and sections["funnel"].has_data
    assert "skipped unreadable lines: evals.jsonl: 2, metrics.jsonl: 1" in write_report(run).read_text()


def test_ingest_summary_written_by_the_ingest_job_is_read(tmp_path):
    # the shape beam_jobs.data_metrics.summarize writes to <run-dir>/metrics.json
    (tmp_path / "ingest").mkdir()
    (tmp_path / "ingest" / "metrics.json").write_text(json.dumps({
        "stages": {"validate": {"in": 100, "drop_bad_json": 3}, "dedup": {"in": 90, "drop_exact": 5, "drop_near": 7},
                   "language": {"en": 60, "de": 20}},
        "dup_rate": 0.13, "pii_rate": 0.02, "language_share": {"en": 0.75, "de": 0.25}}))
    sections = {s.key: s for s in build_sections(RunData.load(RunDir(tmp_path)))}
    assert sections["funnel"].has_data and sections["shares"].has_data and sections["rates"].has_data
    assert "exact: 5" in sections["funnel"].body and "near: 7" in sections["funnel"].body
    assert ">language<" not in sections["funnel"].body  # per-language counters are not a funnel stage


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian package `chromium` is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(sample, tmp_path):
    from PIL import Image

    page = write_report(sample, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--window-size=1100,2400", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120, cwd=tmp_path)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1100, 2400)
    # plots decoded and drawn: coloured bars/lines cover >2% of the page below the header;
    # the same page with no plots (empty run) measures ~0.2% (link text only)
    body = img.crop((0, 250, 1100, 2400))
    px = body.tobytes()
    saturated = sum(1 for i in range(0, len(px), 3) if max(px[i:i + 3]) - min(px[i:i + 3]) > 80)
    assert saturated / (len(px) // 3) > 0.02
