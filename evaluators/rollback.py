"""Rollback policy, both ways: model regressions roll the trainer back and quarantine the
shards trained since the last good checkpoint; data alerts quarantine/pause their source.

The policy is a pure decision function over what it has observed (CheckpointSaved,
EvalReport, ShardPublished); publishing the Controls and logging lineage is done by
:class:`evaluators.alerts.control.ControlHook`.

Control commands it issues (args)::

    rollback           {"target": "last_good", "run_id", "checkpoint": <path>, "step"}
    quarantine_shards  {"run_id", "since_step", "shards": [<shard name>, ...]}
    quarantine_source  {"source"}        (ingest drops it, trainer skips its samples)
    pause_source       {"source"}        (ingest stops reading it until resume_source)
    pause_domain       {"domain"}        (trainer stops sampling it until resume_domain)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.events import Alert, CheckpointSaved, Control, EvalReport, Event, ShardPublished

__all__ = ["Decision", "RollbackPolicy"]


@dataclass(slots=True)
class Decision:
    """Controls to issue for one alert, or why none are issued."""

    controls: list[Control] = field(default_factory=list)
    skipped: str = ""


class RollbackPolicy:
    """Turns alerts into Control commands from the checkpoint/eval/shard history it observes."""

    def __init__(self, *, issued_by: str = "headwater-evaluate"):
        self.issued_by = issued_by
        self.checkpoints: dict[str, CheckpointSaved] = {}
        self.reports: dict[str, list[EvalReport]] = {}
        self.shards: dict[str, ShardPublished] = {}

    def observe(self, event: Event) -> None:
        """Track checkpoints, eval reports and published shards."""
        if isinstance(event, CheckpointSaved):
            self.checkpoints[event.path] = event
        elif isinstance(event, EvalReport):
            self.reports.setdefault(event.checkpoint_path, []).append(event)
        elif isinstance(event, ShardPublished):
            self.shards.setdefault(event.shard, event)

    def is_good(self, path: str) -> bool:
        """A checkpoint is good when it has eval reports and every one passed without error."""
        reports = self.reports.get(path, [])
        return bool(reports) and all(r.passed and r.error is None for r in reports)

    def last_good(self, run_id: str) -> CheckpointSaved | None:
        """The most recent (highest step) good checkpoint of ``run_id``."""
        good = [c for c in self.checkpoints.values() if c.run_id == run_id and self.is_good(c.path)]
        return max(good, key=lambda c: (c.step, c.wall_time), default=None)

    def shards_since(self, good: CheckpointSaved) -> list[str]:
        """Shards the trainer may have taken since ``good``: published after it was saved."""
        return sorted(s.shard for s in self.shards.values() if s.published_at > good.wall_time)

    def decide(self, alert: Alert) -> Decision:
        """The Controls an alert calls for (by its ``evidence['action']``)."""
        action = alert.evidence.get("action", "none")
        labels = alert.evidence.get("labels", {})
        reason = f"{alert.rule}: {alert.message}"
        if action == "rollback":
            return self._rollback(alert, reason)
        if action in ("quarantine_source", "pause_source"):
            source = labels.get("source") or alert.evidence.get("source")
            if not source:
                return Decision(skipped=f"{action} needs a 'source' label in the alert")
            commands = ["quarantine_source", "pause_source"] if action == "quarantine_source" else ["pause_source"]
            return Decision([self._control(c, {"source": source}, reason) for c in commands])
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
        good = self.last_good(run_id)
        if good is None:
            return Decision(skipped=f"no checkpoint of run {run_id!r} has passed evaluation; rollback needs a human")
        controls = [self._control("rollback", {"target": "last_good", "run_id": run_id,
                                               "checkpoint": good.path, "step": good.step}, reason)]
        shards = self.shards_since(good)
        if shards:
            controls.append(self._control("quarantine_shards", {"run_id": run_id, "since_step": good.step,
                                                                "shards": shards}, reason))
        return Decision(controls)

    def _control(self, command: str, args: dict, reason: str) -> Control:
        return Control(command=command, args=args, reason=reason, issued_by=self.issued_by)
