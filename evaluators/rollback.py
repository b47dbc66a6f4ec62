"""Rollback policy, both ways: model regressions roll the trainer back to its last good
checkpoint (the trainer quarantines the shards it read since); data alerts quarantine/pause
their source.

The policy is a pure decision function over what it has observed (CheckpointSaved,
EvalReport, the rollback Controls issued and the trainer's ``trainer.rollback`` alerts);
publishing the Controls and logging lineage is done by
:class:`evaluators.alerts.control.ControlHook`.

The action comes from the caller (the sentinel looks it up in rules.toml), never from the
alert. A rollback for an eval regression must be corroborated: the alert names a checkpoint
(``evidence.checkpoint`` and ``checkpoint_wall_time``) whose EvalReport on ``evals`` failed
with significant findings; the run, the regressed metrics and domains come from that report.

Control commands it issues (args; the full list is in docs/TEAM_CONTRACTS.md)::

    rollback           {"target": "last_good", "run_id", "checkpoint": <path>, "checkpoint_wall_time",
                        "step", "quarantine": "since", "domains": [...], "regression": [metrics]}
                       (the trainer quarantines only the shards of ``domains`` read since ``step``;
                        ``domains`` is explicit, see :func:`implicated_domains`)
    rollback           {"target": "step", "run_id", "checkpoint", "step", "quarantine": "none"}
                       (data alerts with action quarantine_source_and_rollback: the last good
                       checkpoint saved before the source's first published shard)
    quarantine_source  {"source"}        (ingest drops it, trainer skips its samples)
    pause_source       {"source"}        (ingest stops reading it until resume_source)
    pause_domain       {"domain", "run_id"}  (trainer stops sampling it until resume_domain)

Every trainer-only command names its run (streams/signing.py rejects one that does not). A
data-side ``pause_domain`` (e.g. ``codebook_collapse``: the domain's tokens are bad, whatever run
reads them) is issued once per run the policy knows of (runs with a CheckpointSaved or
EvalReport seen); a run that has announced nothing yet is not paused, and the alert's page says
which runs were.

A regression alert is not acted on twice: for checkpoints saved before the last rollback it is
skipped with its reason. While a rollback of the run is issued but not yet applied by the
trainer (at most ``pending_s``), the decision is ``pending``: the control hook raises
:class:`~evaluators.alerts.dispatch.HookPending` and the sentinel redelivers the alert later,
so a regression of a checkpoint saved after that rollback is not lost (its alert may be read
before the trainer's confirmation, e.g. from another partition of ``alerts``).

Circuit breaker: when a regression of the same run and metric recurs against the same good
checkpoint that an earlier rollback for that metric returned to, rolling back again would loop.
The policy issues no rollback; it pauses the regressed domains (pause_domain for the run) and
returns a critical ``rollback.circuit_open`` Alert to page a human. Only rollbacks the trainer
applied count: it confirmed the control id (``trainer.rollback`` evidence), or the run saved a
checkpoint after the rollback at a step it had already passed before (it went back). A rollback
the trainer never received (e.g. issued while it restarted) does not open the circuit. Later
regressions of that (run, metric) are skipped until a ``resume_domain`` for the run's domain
closes the circuit.

A ``trainer.rollback`` alert counts as applied only for a rollback Control the policy saw
issued (its ``evidence.control_id``), and its time is capped at the policy's clock and at
``issued_at + pending_s``: anyone who can write ``alerts`` could otherwise make every later
checkpoint look rolled back with one alert dated in the future. The trainer's own
loss-spike rollbacks (no Control) are therefore not known to the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evaluators.identity import CheckpointKey, checkpoint_key, report_key
from streams.events import Alert, CheckpointSaved, Control, EvalReport, Event, ShardPublished
from streams.source_names import canonical_source

__all__ = ["CIRCUIT_RULE", "Decision", "RollbackPolicy", "implicated_domains"]

CIRCUIT_RULE = "rollback.circuit_open"


@dataclass(slots=True)
class Decision:
    """Controls to issue for one alert, or why none are issued."""

    controls: list[Control] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)  # pages to publish (circuit breaker)
    skipped: str = ""
    pending: bool = False
    """not decided yet (a rollback of the run is in flight): the alert must be decided again later"""


def implicated_domains(report: EvalReport, metrics: list[str]) -> list[str]:
    """The domains a regression implicates, from its report: ``domain/<d>`` names ``d``;
    ``modality/<m>`` every domain of that modality in the report's item table; ``overall`` alone
    the domains whose own log-perplexity rose (all of the table's if none did). [] without an
    item table (the trainer then quarantines every domain's shards)."""
    items = report.details.get("items") or {}
    rows = list(zip(items.get("modality", []), items.get("domain", [])))
    domains = {m.split("/", 1)[1] for m in metrics if m.startswith("domain/")}
    for metric in metrics:
        if metric.startswith("modality/"):
            domains |= {d for mod, d in rows if mod == metric.split("/", 1)[1]}
    if not domains and "overall" in metrics:
        findings = report.details.get("regression", {}).get("findings", [])
        domains = {f["metric"].split("/", 1)[1] for f in findings
                   if f.get("metric", "").startswith("domain/") and f.get("delta", 0.0) > 0}
        domains = domains or {d for _, d in rows}
    return sorted(str(d) for d in domains if d)


class RollbackPolicy:
    """Turns alerts into Control commands from the checkpoint/eval/rollback history it observes."""

    def __init__(self, *, issued_by: str = "headwater-evaluate", pending_s: float = 300.0,
                 clock: Callable[[], float] = time.time, confirm_checkpoints: int = 1):
        if confirm_checkpoints < 1:
            raise ValueError(f"confirm_checkpoints must be >= 1, got {confirm_checkpoints}")
        self.issued_by = issued_by
        self.pending_s = pending_s
        self.confirm_checkpoints = confirm_checkpoints
        self.clock = clock
        self.checkpoints: dict[CheckpointKey, CheckpointSaved] = {}
        self.reports: dict[CheckpointKey, list[EvalReport]] = {}
        self.issued: dict[str, float] = {}   # run_id -> issue time of its latest rollback Control
        self.applied: dict[str, float] = {}  # run_id -> time the trainer last reported a rollback
        self.first_shard_at: dict[str, float] = {}  # domain -> publish time of its first shard
        self.rolled_back: dict[str, list[tuple[float, int]]] = {}  # run_id -> (issued_at, to step) per rollback
        # run_id -> (target checkpoint key, regressed metrics, control id, issued_at) per regression rollback
        self.rollbacks: dict[str, list[tuple[CheckpointKey, frozenset[str], str, float]]] = {}
        self.confirmed: set[str] = set()  # control ids the trainer reported applied
        self.issued_ids: dict[str, tuple[str, float]] = {}  # rollback control id -> (run_id, issued_at)
        self.open_circuits: set[tuple[str, str]] = set()  # (run_id, metric) paused by the breaker

    def observe(self, event: Event) -> None:
        """Track checkpoints, eval reports, issued rollbacks and rollbacks the trainer applied."""
        if isinstance(event, CheckpointSaved):
            self.checkpoints[checkpoint_key(event)] = event
        elif isinstance(event, ShardPublished):
            first = self.first_shard_at.get(event.domain, event.published_at)
            self.first_shard_at[event.domain] = min(first, event.published_at)
        elif isinstance(event, EvalReport):
            self.reports.setdefault(report_key(event), []).append(event)
        elif isinstance(event, Control) and event.command == "rollback" and event.args.get("run_id"):
            run = event.args["run_id"]
            self.issued[run] = max(self.issued.get(run, 0.0), event.issued_at)
            self._remember_rollback(run, event.issued_at, event.args, event.control_id)
            self.issued_ids[event.control_id] = (run, event.issued_at)
        elif isinstance(event, Control) and event.command in ("pause_domain", "resume_domain") \
                and event.args.get("run_id") and event.args.get("domain"):
            circuit = (event.args["run_id"], f"domain/{event.args['domain']}")
            if event.command == "pause_domain":
                self.open_circuits.add(circuit)
            else:
                self.open_circuits.discard(circuit)
        elif isinstance(event, Alert) and event.rule == "trainer.rollback" and event.evidence.get("run_id"):
            run, cid = event.evidence["run_id"], event.evidence.get("control_id")
            if isinstance(cid, str) and self.issued_ids.get(cid, ("",))[0] == run:
                issued_at = self.issued_ids[cid][1]  # applied after it was issued, whatever the trainer's clock
                at = max(issued_at, min(event.created_at, self.clock(), issued_at + self.pending_s))
                self.applied[run] = max(self.applied.get(run, 0.0), at)
                self.confirmed.add(cid)

    def known_runs(self) -> list[str]:
        """Runs that announced a checkpoint or were evaluated, sorted."""
        runs = {c.run_id for c in self.checkpoints.values()}
        runs |= {r.run_id for reports in self.reports.values() for r in reports}
        return sorted(r for r in runs if r)

    def is_good(self, ckpt: CheckpointSaved) -> bool:
        """A checkpoint is good when it has eval reports and every one passed without error."""
        key = checkpoint_key(ckpt)
        reports = self.reports.get(key, []) + self.reports.get((key[0], None), [])  # + legacy reports
        return bool(reports) and all(r.passed and r.error is None for r in reports)

    def abandoned(self, ckpt: CheckpointSaved) -> bool:
        """Saved on a branch a later rollback abandoned (step beyond its target, saved before it)."""
        return any(ckpt.wall_time < at and ckpt.step > step for at, step in self.rolled_back.get(ckpt.run_id, []))

    def last_good(self, run_id: str) -> CheckpointSaved | None:
        """The most recent (highest step, then latest) good checkpoint of ``run_id`` not abandoned."""
        good = [c for c in self.checkpoints.values()
                if c.run_id == run_id and self.is_good(c) and not self.abandoned(c)]
        return max(good, key=lambda c: (c.step, c.wall_time), default=None)

    def decide(self, alert: Alert, action: str) -> Decision:
        """The Controls an alert calls for, given the ``action`` its rule allows (not the alert's own)."""
        labels = alert.evidence.get("labels")
        labels = labels if isinstance(labels, dict) else {}
        reason = f"{alert.rule}: {alert.message}"
        if action == "rollback":
            return self._rollback(alert, reason)
        if action in ("quarantine_source", "pause_source", "quarantine_source_and_rollback"):
            source = labels.get("source")
            if not source:
                return Decision(skipped=f"{action} needs a 'source' label in the alert")
            commands = ["pause_source"] if action == "pause_source" else ["quarantine_source", "pause_source"]
            decision = Decision([self._control(c, {"source": source}, reason) for c in commands])
            if action == "quarantine_source_and_rollback":
                controls, decision.skipped = self._rollback_before_source(source, reason)
                decision.controls += controls
            return decision
        if action == "pause_domain":
            domain = labels.get("domain")
            if not domain:
                return Decision(skipped="pause_domain needs a 'domain' label in the alert")
            runs = self.known_runs()
            if not runs:
                return Decision(skipped=f"pause_domain {domain!r}: no run known (no checkpoint or report seen)")
            return Decision([self._control("pause_domain", {"domain": domain, "run_id": run}, reason)
                             for run in runs])
        return Decision(skipped=f"no automatic action for action={action!r}")

    def regression_report(self, alert: Alert) -> EvalReport | None:
        """The failed EvalReport on ``evals`` that corroborates a regression alert, if there is one."""
        ev = alert.evidence
        try:
            key = (str(ev["checkpoint"]), round(float(ev["checkpoint_wall_time"]), 6))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        failed = [r for r in self.reports.get(key, []) if not r.passed and r.error is None
                  and any(f.get("significant") for f in r.details.get("regression", {}).get("findings", []))]
        return failed[0] if failed else None

    def failing_streak(self, report: EvalReport) -> int:
        """How many consecutive evaluated checkpoints of the report's branch, ending with its own,
        failed on significant findings (an unevaluated checkpoint between them does not break the
        streak; a passing one does). With ``confirm_checkpoints`` > 1 a transient bump of the loss
        curve that the next checkpoint recovers from rolls nothing back."""
        branch: dict[CheckpointKey, list[EvalReport]] = {}
        for key, reports in self.reports.items():
            wall = key[1]
            for r in reports:
                if r.run_id != report.run_id or r.step > report.step or r.error is not None or wall is None:
                    continue
                if any(wall < at and r.step > step for at, step in self.rolled_back.get(r.run_id, [])):
                    continue  # on a branch a rollback abandoned
                branch.setdefault(key, []).append(r)
        streak = 0
        for key, reports in sorted(branch.items(), key=lambda kv: (kv[1][0].step, kv[0][1]), reverse=True):
            if all(r.passed for r in reports):
                break
            streak += 1
        return streak

    def was_applied(self, run_id: str, control_id: str, issued_at: float) -> bool:
        """Whether the trainer applied a rollback: it confirmed ``control_id``, or ``run_id`` saved a
        checkpoint after ``issued_at`` at a step no later than one it had saved before (it went back)."""
        if control_id in self.confirmed:
            return True
        ckpts = [c for c in self.checkpoints.values() if c.run_id == run_id]
        reached = max((c.step for c in ckpts if c.wall_time < issued_at), default=None)
        return reached is not None and any(c.wall_time > issued_at and c.step <= reached for c in ckpts)

    def _remember_rollback(self, run_id: str, issued_at: float, args: dict, control_id: str) -> None:
        if isinstance(args.get("step"), int):
            self.rolled_back.setdefault(run_id, []).append((issued_at, args["step"]))
        if args.get("regression") and args.get("checkpoint_wall_time") is not None:
            target = (str(args["checkpoint"]), round(float(args["checkpoint_wall_time"]), 6))
            entry = (target, frozenset(args["regression"]), control_id, issued_at)
            if entry not in self.rollbacks.setdefault(run_id, []):
                self.rollbacks[run_id].append(entry)

    def _rollback(self, alert: Alert, reason: str) -> Decision:
        report = self.regression_report(alert)
        if report is None:
            return Decision(skipped="no failed EvalReport on 'evals' corroborates this regression "
                                    "(evidence.checkpoint + checkpoint_wall_time): not acted on")
        run_id = report.run_id
        metrics = sorted({f["metric"] for f in report.details["regression"]["findings"] if f.get("significant")})
        issued, applied = self.issued.get(run_id), self.applied.get(run_id, 0.0)
        latest = max((cid for cid, (run, _) in self.issued_ids.items() if run == run_id),
                     key=lambda cid: self.issued_ids[cid][1], default="")
        if (issued is not None and applied < issued and self.clock() - issued < self.pending_s
                and not self.was_applied(run_id, latest, issued)):
            return Decision(skipped=f"a rollback of run {run_id!r} issued at {issued:.3f} is not applied yet",
                            pending=True)
        saved_at = float(report.details["checkpoint_wall_time"])
        if saved_at <= max(issued or 0.0, applied):
            return Decision(skipped=f"checkpoint saved at {saved_at:.3f} predates the last rollback of run "
                                    f"{run_id!r}: already rolled back")
        good = self.last_good(run_id)
        if good is None:
            return Decision(skipped=f"no checkpoint of run {run_id!r} has passed evaluation; rollback needs a human")
        if all((run_id, m) in self.open_circuits for m in metrics):
            return Decision(skipped=f"circuit open for run {run_id!r} {metrics}: paused, needs a human")
        streak = self.failing_streak(report)
        if streak < self.confirm_checkpoints:
            return Decision(skipped=f"regression at step {report.step} not confirmed yet: {streak} of "
                                    f"{self.confirm_checkpoints} consecutive checkpoints failed")
        target = checkpoint_key(good)
        repeated = sorted({m for t, ms, cid, at in self.rollbacks.get(run_id, [])
                           if t == target and self.was_applied(run_id, cid, at) for m in ms} & set(metrics))
        if repeated:
            return self._open_circuit(run_id, good, repeated, implicated_domains(report, repeated), alert, reason)
        domains = implicated_domains(report, metrics)
        args = {"target": "last_good", "run_id": run_id, "checkpoint": good.path,
                "checkpoint_wall_time": target[1], "step": good.step, "quarantine": "since",
                "regression": metrics, **({"domains": domains} if domains else {})}
        control = self._control("rollback", args, reason)
        self.issued[run_id] = control.issued_at
        self.issued_ids[control.control_id] = (run_id, control.issued_at)
        self._remember_rollback(run_id, control.issued_at, args, control.control_id)
        return Decision([control])

    def _open_circuit(self, run_id: str, good: CheckpointSaved, metrics: list[str], domains: list[str],
                      alert: Alert, reason: str) -> Decision:
        """The same regression came back after a rollback to ``good``: pause its domains and page."""
        self.open_circuits.update((run_id, m) for m in metrics)
        why = (f"{CIRCUIT_RULE}: {metrics} of run {run_id!r} regressed again after a rollback to step "
               f"{good.step}; no further automatic rollback")
        controls = [self._control("pause_domain", {"domain": d, "run_id": run_id}, f"{why} ({reason})")
                    for d in domains]
        page = Alert(rule=CIRCUIT_RULE, severity="critical", source=self.issued_by,
                     dedup_key=f"{CIRCUIT_RULE}|{run_id}|{','.join(metrics)}",
                     message=(f"{why}; " + (f"paused domain(s) {domains}" if domains else "nothing paused")
                              + ": a human must decide (see docs/RUNBOOK.md)"),
                     evidence={"run_id": run_id, "metrics": metrics, "domains": domains,
                               "checkpoint": good.path, "step": good.step, "alert_id": alert.alert_id,
                               "alert_step": alert.evidence.get("step")})
        return Decision(controls, alerts=[page], skipped="" if controls else why)

    def _rollback_before_source(self, source: str, reason: str) -> tuple[list[Control], str]:
        """Roll every run that trained on ``source`` back to its last good checkpoint that did not.

        A checkpoint's lineage (CheckpointSaved.lineage ``tokens_by_source``) says how many tokens
        of each source its weights were trained on; a run whose checkpoints never saw the source
        is rolled back to its latest good checkpoint only if its live weights trained on the source
        since (args ``only_if_trained_on``: the trainer checks its own live lineage after applying
        the quarantine that is sent first, and skips the rollback when it never saw the source). Checkpoints with
        no lineage (older trainers) count as clean only if saved before a shard of domain
        ``source`` (exactly) was first published. Only the source's data is quarantined (by
        quarantine_source), so clean shards read since are trained again."""
        controls, notes = [], []
        for run_id in sorted({c.run_id for c in self.checkpoints.values()}):
            ckpts = [c for c in self.checkpoints.values() if c.run_id == run_id]
            seen = [c for c in ckpts if self._source_tokens(c, source)]
            # Lineage survives rollbacks (it is restored with the weights): a 0 count is clean.
            good = [c for c in ckpts if self._source_tokens(c, source) == 0 and self.is_good(c)
                    and not self.abandoned(c)]
            if not seen and not good:
                notes.append(f"run {run_id!r}: no checkpoint trained on {source!r}")
                continue
            if not good:
                notes.append(f"run {run_id!r} has no good checkpoint from before it trained on {source!r}")
                continue
            target = max(good, key=lambda c: (c.step, c.wall_time))
            args = {"target": "step", "run_id": run_id, "checkpoint": target.path, "step": target.step,
                    "quarantine": "none"}
            if not seen:  # no checkpoint saw it: only the live weights may have; the trainer knows
                args["only_if_trained_on"] = source
            control = self._control("rollback", args, reason)
            self.issued[run_id] = control.issued_at
            self.issued_ids[control.control_id] = (run_id, control.issued_at)
            self._remember_rollback(run_id, control.issued_at, args, control.control_id)
            controls.append(control)
        return controls, "; ".join(notes)

    def _source_tokens(self, ckpt: CheckpointSaved, source: str) -> int | None:
        """Tokens of ``source`` the checkpoint trained on: from its lineage, else (older trainers)
        1 if saved after a shard of domain ``source`` was published, 0 if before, None if unknown."""
        by_source = ckpt.lineage.get("tokens_by_source") if isinstance(ckpt.lineage, dict) else None
        if isinstance(by_source, dict):
            name = canonical_source(source)
            return sum(int(n) for s, n in by_source.items() if canonical_source(s) == name)
        first = self.first_shard_at.get(source)
        if first is None:
            return None
        return int(ckpt.wall_time >= first)

    def _control(self, command: str, args: dict, reason: str) -> Control:
        return Control(command=command, args=args, reason=reason, issued_by=self.issued_by, issued_at=self.clock())
