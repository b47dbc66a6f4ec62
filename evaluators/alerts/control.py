"""Control-topic hook: apply the rollback policy to an alert, publish its Controls, log lineage."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaProducer

from evaluators.lineage import LineageLog
from evaluators.rollback import RollbackPolicy
from streams.events import Alert
from streams.kafka import publish

__all__ = ["ControlHook"]


@dataclass(kw_only=True, slots=True)
class ControlHook:
    """Publish the policy's Controls for an alert on the ``control`` topic, each recorded in lineage."""

    producer: KafkaProducer
    policy: RollbackPolicy
    lineage: LineageLog
    topic: str = "control"
    name: str = "control"

    def __call__(self, alert: Alert) -> dict:
        decision = self.policy.decide(alert)
        if not decision.controls:
            self.lineage.record(action="skipped", reason=decision.skipped, alert=alert)
            return {"controls": [], "skipped": decision.skipped}
        for control in decision.controls:
            publish(self.producer, self.topic, control, key=control.command)
            self.lineage.record(action=control.command, reason=control.reason, alert=alert, control=control)
        return {"controls": [c.control_id for c in decision.controls]}
