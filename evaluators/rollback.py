"""Rollback policy, both ways: model regressions roll the trainer back to its last good
checkpoint (the trainer quarantines the shards it read since); data alerts quarantine/pause
their source.

The policy is a pure decision function over what it has observed (CheckpointSaved,
EvalReport, the rollback Controls issued and the trainer's ``trainer.rollback`` alerts);
publishing the Controls and logging lineage is done by
:class:`evaluators.alerts.control.ControlHook`.

Control commands it issues (args; the full list is in docs/TEAM_CONTRACTS.md)::

    rollback           {"target": "last_good", "run_id", "checkpoint": <path>, "step", "quarantine": "since"}
    rollback           {"target": "step", "run_id", "checkpoint", "step", "quarantine": "none"}
                       (data alerts with action quarantine_source_and_rollback: the last good
                       checkpoint saved before the source's first published shard)
    quarantine_source  {"source"}        (ingest drops it, trainer skips its samples)
    pause_source       {"source"}        (ingest stops reading it until resume_source)
    pause_domain       {"domain"}        (trainer stops sampling it until resume_domain)

A regression alert is not acted on twice: while a rollback of the run is issued but not yet
applied by the trainer, and for checkpoints saved before the last rollback, it is skipped
with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evaluators.identity import CheckpointKey, checkpoint_key, report_key
from streams.events import Alert, CheckpointSaved, Control, EvalReport, Event, ShardPublished

__all__ = ["Decision", "RollbackPolicy"]


@dataclass(slots=True)
class Decision:
    """Controls to issue for one alert, or why none are issued."""

    controls: list[Control] = field(default_factory=list)
    skipped: str = ""


class RollbackPolicy:
    """Turns alerts into Control commands from the checkpoint/eval/rollback history it observes."""

    def __init__(self, *, issued_by: str = "headwater-evaluate", pending_s: float = 300.0,
                 clock: Callable[[], float] = time.time):
        self.issued_by = issued_by
        self.pending_s = pending_s
        self.clock = clock
        self.checkpoints: dict[CheckpointKey, CheckpointSaved] = {}
        self.reports: dict[CheckpointKey, list[EvalReport]] = {}
        self.issued: dict[str, float] = {}   # run_id -> issue time of its latest rollback Control
        self.applied: dict[str, float] = {}  # run_id -> time the trainer last reported a rollback
        self.first_shard_at: dict[str, float] = {}  # domain -> publish time of its first shard

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
        elif isinstance(event, Alert) and event.rule == "trainer.rollback" and event.evidence.get("run_id"):
            run = event.evidence["run_id"]
            self.applied[run] = max(self.applied.get(run, 0.0), event.created_at)

    def is_good(self, ckpt: CheckpointSaved) -> bool:
        """A checkpoint is good when it has eval reports and every one passed without error."""
        key = checkpoint_key(ckpt)
        reports = self.reports.get(key, []) + self.reports.get((key[0], None), [])  # + legacy reports
        return bool(reports) and all(r.passed and r.error is None for r in reports)

    def last_good(self, run_id: str) -> CheckpointSaved | None:
        """The most recent (highest step, then latest) good checkpoint of ``run_id``."""
        good = [c for c in self.checkpoints.values() if c.run_id == run_id and self.is_good(c)]
        return max(good, key=lambda c: (c.step, c.wall_time), default=None)

    def decide(self, alert: Alert) -> Decision:
        """The Controls an alert calls for (by its ``evidence['action']``)."""
        action = alert.evidence.get("action", "none")
        labels = alert.evidence.get("labels", {})
        reason = f"{alert.rule}: {alert.message}"
        if action == "rollback":
            return self._rollback(alert, reason)
        if action in ("quarantine_source", "pause_source", "quarantine_source_and_rollback"):
            source = labels.get("source") or alert.evidence.get("source")
            if not source:
                return Decision(skipped=f"{action} needs a 'source' label in the alert")
            commands = ["pause_source"] if action == "pause_source" else ["quarantine_source", "pause_source"]
            decision = Decision([self._control(c, {"source": source}, reason) for c in commands])
            if action == "quarantine_source_and_rollback":
                controls, decision.skipped = self._rollback_before_source(source, reason)
                decision.controls += controls
            return decision
        if action == "pause_domain":
            domain = labels.get("domain") or alert.evidence.get("domain")
            if not domain:
                return Decision(skipped="pause_domain needs a 'domain' label in the alert")
            return Decision([self._control("pause_domain", {"domain": domain}, reason)])
        return Decision(skipped=f"no automatic action for action={action!r}")

    def _rollback(self, alert: Alert, reason: str) -> Decision:
        run_id = alert.evidence.get("run_id") or alert.evidence.get("labels", {}).get("run_id")
        if not run_id:
            return Decision(skipped="rollback needs evidence.run_id")
        issued, applied = self.issued.get(run_id), self.applied.get(run_id, 0.0)
        if issued is not None and applied < issued and self.clock() - issued < self.pending_s:
            return Decision(skipped=f"a rollback of run {run_id!r} issued at {issued:.3f} is not applied yet")
        saved_at = alert.evidence.get("checkpoint_wall_time")
        if saved_at is not None and saved_at <= max(issued or 0.0, applied):
            return Decision(skipped=f"checkpoint saved at {saved_at:.3f} predates the last rollback of run "
                                    f"{run_id!r}: already rolled back")
        good = self.last_good(run_id)
        if good is None:
            return Decision(skipped=f"no checkpoint of run {run_id!r} has passed evaluation; rollback needs a human")
        args = {"target": "last_good", "run_id": run_id, "checkpoint": good.path, "step": good.step,
                "quarantine": "since"}
        control = self._control("rollback", args, reason)
        self.issued[run_id] = control.issued_at
        return Decision([control])

    def _rollback_before_source(self, source: str, reason: str) -> tuple[list[Control], str]:
        """Roll every run back to its last good checkpoint from before ``source`` first published.

        Only the source's data is quarantined (by quarantine_source), so clean shards read since
        are trained again. Domains are ``{source}`` or ``{source}_*``."""
        times = [t for d, t in self.first_shard_at.items() if d == source or d.startswith(f"{source}_")]
        if not times:
            return [], f"no shard of source {source!r} was published: nothing to roll back"
        since = min(times)
        controls, notes = [], []
        for run_id in sorted({c.run_id for c in self.checkpoints.values()}):
            ckpts = [c for c in self.checkpoints.values() if c.run_id == run_id]
            # Conservative: even with no checkpoint saved since, the live weights may have trained on it.
            good = [c for c in ckpts if c.wall_time < since and self.is_good(c)]
            if not good:
                notes.append(f"run {run_id!r} has no good checkpoint from before {source!r} appeared")
                continue
            target = max(good, key=lambda c: (c.step, c.wall_time))
            args = {"target": "step", "run_id": run_id, "checkpoint": target.path, "step": target.step,
                    "quarantine": "none"}
            control = self._control("rollback", args, reason)
            self.issued[run_id] = control.issued_at
            controls.append(control)
        return controls, "; ".join(notes)

    def _control(self, command: str, args: dict, reason: str) -> Control:
        return Control(command=command, args=args, reason=reason, issued_by=self.issued_by)
