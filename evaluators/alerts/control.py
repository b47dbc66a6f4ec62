"""Control-topic hook: apply the rollback policy to an alert, publish its Controls, log lineage."""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka import KafkaProducer

from evaluators.alerts.dispatch import HookPending
from evaluators.lineage import LineageLog
from evaluators.rollback import Decision, RollbackPolicy
from streams.events import Alert
from streams.kafka import publish
from streams.signing import SigningKey, sign_control

__all__ = ["ControlHook"]


@dataclass(kw_only=True, slots=True)
class ControlHook:
    """Publish the policy's Controls for an alert on ``control`` (each recorded in lineage) and its
    pages on ``alerts``.

    Pages go out before Controls. The policy decides once per alert; if a publish fails the hook
    raises, and calling it again for the same alert publishes what is left of that same decision
    (same ``control_id``s, which the trainer applies at most once), never a second decision. A
    ``pending`` decision is no decision: it raises :class:`HookPending` and keeps nothing. With
    a ``key`` every Control is signed (streams/signing.py) when decided.
    """

    producer: KafkaProducer
    policy: RollbackPolicy
    lineage: LineageLog
    topic: str = "control"
    name: str = "control"
    key: SigningKey | None = None
    _pending: dict[str, tuple[Decision, list[int]]] = field(default_factory=dict)  # + #controls, #alerts sent

    def __call__(self, alert: Alert, action: str = "none") -> dict:
        if alert.alert_id not in self._pending:
            decision = self.policy.decide(alert, action)
            if decision.pending:  # not decided: decided afresh when the alert comes again
                raise HookPending(decision.skipped)
            if self.key is not None:
                decision.controls = [sign_control(c, self.key) for c in decision.controls]
            if decision.skipped:
                self.lineage.record(action="skipped", reason=decision.skipped, alert=alert)
            self._pending[alert.alert_id] = (decision, [0, 0])
        decision, sent = self._pending[alert.alert_id]
        # pages first: a sentinel dying before its pause_domain is on `control` decides (and pages)
        # again after a restart, whereas one dying after the pause would find the circuit open and
        # never page (a duplicate page carries the same dedup_key; a lost one pages nobody)
        for page in decision.alerts[sent[1]:]:
            publish(self.producer, "alerts", page, key=page.rule)
            sent[1] += 1
        for control in decision.controls[sent[0]:]:
            publish(self.producer, self.topic, control, key=control.command)
            self.lineage.record(action=control.command, reason=control.reason, alert=alert, control=control)
            sent[0] += 1
        del self._pending[alert.alert_id]
        return {"controls": [c.control_id for c in decision.controls],
                **({"skipped": decision.skipped} if decision.skipped else {})}
