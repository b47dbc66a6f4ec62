"""`headwater report RUN_DIR [--out FILE]`: one self-contained HTML page about a run.

Reads the run directory (layout in :mod:`infra.run_dir`) and writes a single HTML file
with every plot embedded as a base64 PNG: the data funnel per stage and drop reason,
dup/PII rates, language and modality shares, codebook usage, domain weights, per-domain
loss, eval metrics per checkpoint, freshness, and alerts and rollbacks on a timeline.
A part of the run that wrote nothing yields a section saying "no data", never a crash.
"""

from __future__ import annotations

import argparse
import html
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra import report_plots as plots
from infra.run_dir import RunDir, flatten, ordered_stages
from streams.events import Alert, EvalReport

__all__ = ["RunData", "Section", "build_sections", "main", "render_html", "write_report"]


@dataclass(slots=True)
class RunData:
    """Everything the report needs, read once from a run directory."""

    root: Path
    steps: list[dict]
    events: list[dict]
    snapshots: list[dict]
    evals: list[EvalReport]
    alerts: list[Alert]
    lineage: list[dict]
    shards: int
    samples: int
    bad_lines: dict[str, int]

    @classmethod
    def load(cls, run: RunDir) -> RunData:
        data = cls(root=run.root, steps=run.trainer_steps(), events=run.trainer_events(), snapshots=run.ingest_snapshots(),
                   evals=run.evals(), alerts=run.alerts(), lineage=run.lineage(), shards=0, samples=0,
                   bad_lines={})
        data.shards, data.samples = run.shard_counts()
        data.bad_lines = dict(run.bad_lines)
        return data

    @property
    def last_snapshot(self) -> dict:
        return self.snapshots[-1] if self.snapshots else {}

    @property
    def t0(self) -> float:
        """Earliest timestamp seen anywhere in the run (the timeline's zero)."""
        times = [s["time"] for s in self.snapshots if _num(s.get("time"))]
        times += [s["wall_time"] for s in self.steps if _num(s.get("wall_time"))]
        times += [e.created_at for e in self.evals] + [a.created_at for a in self.alerts]
        times += [x["at"] for x in self.lineage]
        return min(times, default=0.0)


@dataclass(slots=True)
class Section:
    """One titled part of the report; ``has_data`` is False when it only says "no data"."""

    key: str
    title: str
    body: str
    has_data: bool


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _esc(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _esc(v)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _no_data(what: str) -> str:
    return f'<p class="nodata">no data: {_esc(what)}</p>'


def _branches(steps: list[dict]) -> list[list[dict]]:
    """Split trainer rows where the step goes back (a rollback): the last branch is current."""
    out: list[list[dict]] = []
    for row in steps:
        if not out or row["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(row)
    return out


def _current(steps: list[dict]) -> list[dict]:
    """Rows of the surviving history: each branch cut where the next one resumed."""
    rows: list[dict] = []
    for branch in _branches(steps):
        rows = [r for r in rows if r["step"] < branch[0]["step"]] + branch
    return rows


def _funnel(d: RunData) -> Section:
    stages = d.last_snapshot.get("stages")
    if not isinstance(stages, dict) or not stages:
        return Section("funnel", "Data funnel", _no_data("ingest/metrics.jsonl has no stage counters"), False)
    stages = ordered_stages(stages)
    rows = []
    for name, s in stages.items():
        drops = {k: v for k, v in s.get("drop", {}).items() if _num(v)}
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])) or "-"
        rows.append([name, s.get("in", 0), s.get("out", 0), sum(drops.values()), reasons])
    body = _img(plots.funnel_png(stages), "data funnel") + _table(
        ["stage", "in", "out", "dropped", "drop reasons"], rows)
    return Section("funnel", "Data funnel", body, True)


def _rates(d: RunData) -> Section:
    names = ("dup_rate", "pii_rate")
    timed = [s for s in d.snapshots if _num(s.get("time")) and any(_num(s.get(n)) for n in names)]
    if not timed:
        return Section("rates", "Duplicate and PII rates", _no_data("no dup_rate/pii_rate in ingest metrics"), False)
    t0 = d.t0
    series = {n: [float(s.get(n, 0.0)) for s in timed] for n in names if any(_num(s.get(n)) for s in timed)}
    last = timed[-1]
    body = _img(plots.rates_png([s["time"] - t0 for s in timed], series), "dup and PII rates")
    body += _table(["rate", "latest", "max"], [[n, float(last.get(n, 0.0)), max(v)] for n, v in series.items()])
    return Section("rates", "Duplicate and PII rates", body, True)


def _shares(d: RunData) -> Section:
    groups = {title: {k: float(v) for k, v in d.last_snapshot.get(key, {}).items() if _num(v)}
              for title, key in (("languages", "languages"), ("modalities", "modalities"), ("licenses", "licenses"))
              if isinstance(d.last_snapshot.get(key), dict)}
    groups = {k: v for k, v in groups.items() if v and sum(v.values()) > 0}
    if not groups:
        return Section("shares", "Language, modality and license shares",
                       _no_data("no languages/modalities/licenses counts"), False)
    rows = [[g, k, int(v), v / sum(c.values())] for g, c in groups.items()
            for k, v in sorted(c.items(), key=lambda kv: -kv[1])]
    body = _img(plots.shares_png(groups), "shares") + _table(["group", "value", "records", "share"], rows)
    return Section("shares", "Language, modality and license shares", body, True)


def _codebook(d: RunData) -> Section:
    usage = flatten(d.last_snapshot.get("codebook_usage", {}))
    if not usage:
        return Section("codebook", "Codebook utilization", _no_data("no codebook_usage in ingest metrics"), False)
    body = _img(plots.codebook_png(usage), "codebook usage") + _table(
        ["codebook", "fraction of codes used"], [[k, usage[k]] for k in sorted(usage)])
    return Section("codebook", "Codebook utilization", body, True)


def _weights(d: RunData) -> Section:
    rows = [s for s in _current(d.steps) if isinstance(s.get("weights"), dict) and s["weights"]]
    if not rows:
        return Section("weights", "Domain weights over time", _no_data("metrics.jsonl has no weights"), False)
    names = sorted({k for r in rows for k in r["weights"]})
    weights = {n: [float(r["weights"].get(n, 0.0)) for r in rows] for n in names}
    body = _img(plots.weights_png([r["step"] for r in rows], weights), "domain weights")
    body += _table(["domain", "first", "last", "min", "max"],
                   [[n, w[0], w[-1], min(w), max(w)] for n, w in weights.items()])
    return Section("weights", "Domain weights over time", body, True)


def _rollback_steps(d: RunData) -> list[int]:
    """Steps the trainer went back to: applied rollbacks, else the ones the sentinel ordered."""
    applied = [int(e["to_step"]) for e in d.events if e["event"] == "rollback" and _num(e.get("to_step"))]
    return applied or [int(x["args"]["step"]) for x in d.lineage if x["action"] == "rollback"
                       and isinstance(x.get("args"), dict) and _num(x["args"].get("step"))]


def _loss(d: RunData) -> Section:
    if not d.steps:
        return Section("loss", "Loss per domain", _no_data("metrics.jsonl is missing or empty"), False)
    current = _current(d.steps)
    abandoned = [[(r["step"], float(r["loss"])) for r in b if r not in current] for b in _branches(d.steps)]
    domain: dict[str, list[tuple[int, float]]] = {}
    for s in current:
        for k, v in (s.get("domain_loss") or {}).items():
            if _num(v):
                domain.setdefault(k, []).append((s["step"], float(v)))
    body = _img(plots.loss_png([(s["step"], float(s["loss"])) for s in current], domain,
                               [b for b in abandoned if b], _rollback_steps(d)), "loss")
    rows = [["(all)", float(current[0]["loss"]), float(current[-1]["loss"])]]
    rows += [[k, v[0][1], v[-1][1]] for k, v in sorted(domain.items())]
    body += _table(["domain", "first loss", "last loss"], rows)
    if any(abandoned):
        body += f"<p>{sum(len(b) for b in abandoned)} steps were rolled back (dotted grey in the plot).</p>"
    return Section("loss", "Loss per domain", body, True)


def _evals(d: RunData) -> Section:
    if not d.evals:
        return Section("evals", "Evaluations per checkpoint", _no_data("evals.jsonl is missing or empty"), False)
    reports = sorted(d.evals, key=lambda r: (r.step, r.suite))
    rows = [[r.step, r.suite, "pass" if r.passed else "FAIL",
             ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())), r.error or ""] for r in reports]
    body = (_img(plots.evals_png(reports), "eval metrics") if any(r.metrics for r in reports) else "")
    body += _table(["step", "suite", "result", "metrics", "error"], rows)
    return Section("evals", "Evaluations per checkpoint", body, True)


def _freshness(d: RunData) -> Section:
    ages = [float(s["freshness_s"]) for s in d.steps if _num(s.get("freshness_s"))]
    if not ages:
        return Section("freshness", "Freshness", _no_data("metrics.jsonl has no freshness_s"), False)
    q = statistics.quantiles(ages, n=20) if len(ages) > 1 else [ages[0]] * 19
    body = _img(plots.freshness_png(ages), "freshness") + _table(
        ["steps", "median (s)", "p95 (s)", "max (s)"], [[len(ages), statistics.median(ages), q[18], max(ages)]])
    return Section("freshness", "Freshness (sample age at training)", body, True)


def _timeline(d: RunData) -> Section:
    if not (d.alerts or d.lineage or d.events):
        return Section("timeline", "Alerts and rollbacks", _no_data("no alerts and no control actions"), False)
    t0 = d.t0
    timed = [(float(s["wall_time"]), float(s["loss"])) for s in d.steps if _num(s.get("wall_time"))]
    actions = [x for x in d.lineage if x["action"] != "skipped"]
    actions += [{"at": float(e["wall_time"]), "action": f"trainer {e['event']}"} for e in d.events
                if _num(e.get("wall_time"))]
    body = _img(plots.timeline_png(t0, timed, d.alerts, actions, d.evals), "timeline")
    body += "<h3>Alerts</h3>" + (_table(
        ["t (s)", "severity", "rule", "source", "message"],
        [[a.created_at - t0, a.severity, a.rule, a.source, a.message] for a in d.alerts]) if d.alerts else _no_data("no alerts"))
    body += "<h3>Control actions (lineage)</h3>" + (_table(
        ["t (s)", "action", "rule", "reason", "args"],
        [[x["at"] - t0, x["action"], x.get("rule", ""), x.get("reason", ""), x.get("args", "")] for x in d.lineage])
        if d.lineage else _no_data("no control actions"))
    return Section("timeline", "Alerts and rollbacks on the timeline", body, True)


SECTIONS: tuple[Callable[[RunData], Section], ...] = (
    _funnel, _rates, _shares, _codebook, _weights, _loss, _evals, _freshness, _timeline)


def build_sections(data: RunData) -> list[Section]:
    """All report sections in page order."""
    return [make(data) for make in SECTIONS]


def _summary(d: RunData) -> str:
    last = _current(d.steps)[-1] if d.steps else {}
    items = [
        ("trainer steps", last.get("step", 0)), ("tokens trained", last.get("tokens_seen", 0)),
        ("shards published", d.shards), ("samples published", d.samples),
        ("eval reports", len(d.evals)), ("alerts", len(d.alerts)),
        ("rollbacks", sum(1 for x in d.lineage if x["action"] == "rollback")),
        ("quarantines", sum(1 for x in d.lineage if x["action"].startswith("quarantine"))),
    ]
    out = '<div class="summary">' + "".join(
        f'<div><b>{_fmt(v)}</b><span>{_esc(k)}</span></div>' for k, v in items) + "</div>"
    if d.bad_lines:
        out += '<p class="warn">skipped unreadable lines: ' + ", ".join(
            f"{_esc(k)}: {v}" for k, v in sorted(d.bad_lines.items())) + "</p>"
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:4px}
section{border-top:1px solid #ddd;padding:8px 0 16px}
img{max-width:100%;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} .nodata{color:#888;font-style:italic}
.warn{color:#a60} .summary{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.summary div{background:#f4f6fa;border-radius:6px;padding:8px 14px;min-width:110px}
.summary b{display:block;font-size:20px} .summary span{color:#555;font-size:12px}
nav a{margin-right:10px;font-size:13px}
"""


def render_html(data: RunData, sections: list[Section]) -> str:
    """The whole report as one HTML string (no external resources)."""
    nav = "".join(f'<a href="#{s.key}">{_esc(s.title)}</a>' for s in sections)
    parts = "".join(f'<section id="{s.key}"><h2>{_esc(s.title)}</h2>{s.body}</section>' for s in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>headwater run report'
            f"</title><style>{_CSS}</style></head><body><h1>headwater run report</h1>"
            f'<p class="sub">{_esc(data.root)} · generated {stamp}</p>{_summary(data)}<nav>{nav}</nav>'
            f"{parts}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``)."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory not found: {run.root}")
    data = RunData.load(run)
    target = Path(out) if out else run.root / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(render_html(data, build_sections(data)), encoding="utf-8")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwater report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory (see infra/run_dir.py for its layout)")
    parser.add_argument("--out", help="output HTML file (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"headwater report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
