"""Alert rules over data metrics (the ``metrics.<component>`` topics) and eval metrics (``evals``).

Rules live in a TOML file (see ``infra/alerts/rules.toml``)::

    [[rule]]
    name = "pii_rate_spike"
    on = "metrics"              # "metrics" (MetricsEvent) or "evals" (EvalReport)
    component = "ingest"        # the producer: metrics read from its own topic, metrics.ingest
    metric = "pii_rate"
    kind = "spike"              # threshold | spike | absent
    op = ">"
    factor = 3.0                # spike: value > factor * median(last `window` values)
    group_by = ["source"]       # labels that make one alert stream (and the dedup key)
    severity = "critical"
    cooldown_s = 600
    action = "quarantine_source"  # what the rollback policy does (see evaluators.rollback)
    hooks = ["webhook", "control"]

Each (rule, group) pair fires at most once per ``cooldown_s``; repeats inside the
cooldown are counted and reported in the next alert's evidence.

Who produced a metric is the topic it came from (each credential may write only its own
``metrics.<component>``, streams/topics.py), never ``MetricsEvent.component``, which the sender
writes. A metrics rule with a control ``action`` must name its ``component``: a quarantine or a
pause is only ever triggered by that producer's metrics.
"""

from __future__ import annotations

import operator
import statistics
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.events import Alert, EvalReport, MetricsEvent
from streams.topics import METRICS_TOPICS

__all__ = ["ACTIONS", "AlertEngine", "Rule", "RuleError", "load_rules", "parse_rules"]

KINDS = ("threshold", "spike", "absent")
SOURCES = ("metrics", "evals")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
ACTIONS = ("none", "rollback", "quarantine_source", "quarantine_source_and_rollback", "pause_source", "pause_domain")


class RuleError(ValueError):
    """A rule file entry is invalid; the message names the rule and the field."""


@dataclass(kw_only=True, slots=True)
class Rule:
    """One alert rule; see the module docstring for the TOML form."""

    name: str
    metric: str
    on: str = "metrics"
    kind: str = "threshold"
    op: str = ">"
    threshold: float | None = None
    factor: float = 3.0
    window: int = 20
    min_history: int = 5
    min_value: float = 0.0
    max_silence_s: float | None = None
    component: str | None = None
    match: dict[str, str] = field(default_factory=dict)
    group_by: list[str] = field(default_factory=list)
    severity: str = "warning"
    cooldown_s: float = 300.0
    action: str = "none"
    hooks: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        def bad(field_name: str, problem: str) -> RuleError:
            return RuleError(f"rule {self.name!r}: {field_name}: {problem}")

        if self.on not in SOURCES:
            raise bad("on", f"expected one of {SOURCES}, got {self.on!r}")
        if self.kind not in KINDS:
            raise bad("kind", f"expected one of {KINDS}, got {self.kind!r}")
        if self.op not in OPS:
            raise bad("op", f"expected one of {tuple(OPS)}, got {self.op!r}")
        if self.kind == "threshold" and self.threshold is None:
            raise bad("threshold", "required for kind = 'threshold'")
        if self.kind == "absent" and not self.max_silence_s:
            raise bad("max_silence_s", "required (> 0) for kind = 'absent'")
        if self.kind == "spike" and (self.factor <= 0 or self.window < 1 or self.min_history < 1):
            raise bad("factor/window/min_history", "must be positive")
        if self.severity not in ("info", "warning", "critical"):
            raise bad("severity", f"expected info|warning|critical, got {self.severity!r}")
        if self.action not in ACTIONS:
            raise bad("action", f"expected one of {ACTIONS}, got {self.action!r}")
        if self.cooldown_s < 0:
            raise bad("cooldown_s", "must be >= 0")
        if self.on == "metrics" and self.action != "none" and self.component not in METRICS_TOPICS:
            raise bad("component", f"a metrics rule with action {self.action!r} must name the producer "
                                   f"whose metrics may trigger it, one of {sorted(METRICS_TOPICS)}")


def parse_rules(doc: dict[str, Any]) -> list[Rule]:
    """Rules from a parsed TOML document (its ``[[rule]]`` array)."""
    raw = doc.get("rule", [])
    if not isinstance(raw, list):
        raise RuleError("'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry or "metric" not in entry:
            raise RuleError(f"rule #{i}: 'name' and 'metric' are required")
        known = set(Rule.__dataclass_fields__)
        unknown = sorted(set(entry) - known)
        if unknown:
            raise RuleError(f"rule {entry['name']!r}: unknown field {unknown[0]!r}")
        rules.append(Rule(**entry))
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuleError(f"duplicate rule name {dupes[0]!r}")
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    """Rules from a TOML file."""
    with open(path, "rb") as f:
        return parse_rules(tomllib.load(f))


@dataclass(slots=True)
class _Stream:
    """Per (rule, group) state: recent values, last sighting, cooldown bookkeeping."""

    history: deque
    last_seen: float = 0.0
    last_fired: float | None = None
    suppressed: int = 0
    silent_fired: bool = False


class AlertEngine:
    """Evaluates rules on incoming events and returns the Alerts to raise."""

    def __init__(self, rules: list[Rule], *, clock: Callable[[], float] = time.time, source: str = "alert-rules"):
        self.rules = rules
        self.clock = clock
        self.source = source
        self._streams: dict[tuple[str, tuple[str, ...]], _Stream] = {}

    def observe_metrics(self, event: MetricsEvent, *, producer: str) -> list[Alert]:
        """Alerts raised by one MetricsEvent of ``producer``: the component whose metrics topic it
        was read from (``streams.topics.metrics_component``), not the event's own claim."""
        labels = {**event.labels, "component": producer}
        return self._observe("metrics", producer, event.values, labels, {"step": event.step})

    def observe_eval(self, report: EvalReport) -> list[Alert]:
        """Alerts raised by one EvalReport's metrics."""
        labels = {"suite": report.suite, "run_id": report.run_id}
        context = {"step": report.step, "checkpoint": report.checkpoint_path}
        return self._observe("evals", None, report.metrics, labels, context)

    def tick(self) -> list[Alert]:
        """Alerts for ``absent`` rules whose group has been silent too long."""
        now = self.clock()
        alerts = []
        for rule in self.rules:
            if rule.kind != "absent":
                continue
            for (name, group), st in self._streams.items():
                if name != rule.name or st.silent_fired:
                    continue
                silence = now - st.last_seen
                if silence > rule.max_silence_s:
                    st.silent_fired = True
                    labels = dict(zip(rule.group_by, group))
                    evidence = {"silence_s": round(silence, 3), "max_silence_s": rule.max_silence_s}
                    alert = self._fire(rule, group, labels, st, now, evidence,
                                       f"no {rule.metric!r} for {silence:.0f}s (limit {rule.max_silence_s:.0f}s)")
                    alerts += [alert] if alert else []
        return alerts

    def _observe(self, on: str, component: str | None, values: dict[str, float],
                 labels: dict[str, str], context: dict[str, Any]) -> list[Alert]:
        now = self.clock()
        alerts = []
        for rule in self.rules:
            if rule.on != on or rule.metric not in values:
                continue
            if rule.component is not None and rule.component != component:
                continue
            if any(labels.get(k) != v for k, v in rule.match.items()):
                continue
            group = tuple(str(labels.get(k, "")) for k in rule.group_by)
            st = self._streams.setdefault((rule.name, group), _Stream(deque(maxlen=rule.window)))
            value = float(values[rule.metric])
            st.last_seen, st.silent_fired = now, False
            evidence = self._check(rule, value, st)
            st.history.append(value)
            if evidence is None:
                continue
            evidence.update({k: v for k, v in context.items() if v is not None})
            group_labels = {k: labels.get(k, "") for k in rule.group_by}
            msg = f"{rule.metric}={value:.6g} {rule.op} {evidence.get('limit', 0.0):.6g}"
            alert = self._fire(rule, group, group_labels, st, now, evidence, msg)
            alerts += [alert] if alert else []
        return alerts

    @staticmethod
    def _check(rule: Rule, value: float, st: _Stream) -> dict[str, Any] | None:
        """The evidence if ``value`` breaks ``rule`` (given history before it), else None."""
        if rule.kind == "threshold":
            assert rule.threshold is not None
            if OPS[rule.op](value, rule.threshold):
                return {"value": value, "limit": rule.threshold}
            return None
        if rule.kind == "spike" and len(st.history) >= rule.min_history:
            baseline = statistics.median(st.history)
            limit = baseline * rule.factor if rule.op in (">", ">=") else baseline / rule.factor
            if OPS[rule.op](value, limit) and (rule.op in ("<", "<=") or value >= rule.min_value):
                return {"value": value, "limit": limit, "baseline": baseline, "window": len(st.history)}
        return None

    def _fire(self, rule: Rule, group: tuple[str, ...], labels: dict[str, str], st: _Stream,
              now: float, evidence: dict[str, Any], message: str) -> Alert | None:
        if st.last_fired is not None and now - st.last_fired < rule.cooldown_s:
            st.suppressed += 1
            return None
        evidence = {**evidence, "labels": labels, "action": rule.action, "hooks": rule.hooks,
                    "suppressed_repeats": st.suppressed}
        st.last_fired, st.suppressed = now, 0
        key = rule.name + "".join(f"|{k}={v}" for k, v in zip(rule.group_by, group))
        where = " ".join(f"{k}={v}" for k, v in labels.items())
        return Alert(rule=rule.name, severity=rule.severity, source=self.source, dedup_key=key,
                     message=f"{rule.name}: {message}" + (f" [{where}]" if where else ""),
                     evidence=evidence, created_at=now)
