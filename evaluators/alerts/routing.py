"""What an alert may trigger: its hooks and its control action, decided by rules.toml alone.

An alert's own ``evidence.action`` and ``evidence.hooks`` are never trusted as such:

* an alert the sentinel's rule engine raised itself gets its ``[[rule]]``'s ``action`` and
  ``hooks`` (``default_hooks`` if none). "Raised itself" means: its id is in the sentinel's
  record of raised alerts *and* its :func:`alert_digest` (every field: rule, labels, evidence,
  message, severity, ...) equals the one recorded, so a copy of a real alert's id with other
  content (read off ``alerts`` by anyone) is just another external alert;
* any other alert (evaluators, ingest, the trainer, or a forgery) gets the default hooks
  without the control hook, unless the ``[actions]`` table grants its rule name some actions::

      [actions]
      eval_regression = ["rollback"]       # corroborated against `evals` by the rollback policy
      codebook_collapse = ["pause_domain"]

  then the alert's ``evidence.action`` is used if it is one of them (else ``none``).
* rules of the trainer (``trainer.*``) can never be granted an action: the trainer's
  credential can write ``alerts``, and it must not be able to issue controls.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from evaluators.alerts.rules import ACTIONS, Rule, RuleError
from streams.events import Alert

__all__ = ["NO_CONTROL_PREFIXES", "Route", "Router", "alert_digest"]

NO_CONTROL_PREFIXES = ("trainer.",)
"""alert rule names that can never trigger a control action"""


def alert_digest(alert: Alert) -> str:
    """SHA-256 of the alert's canonical JSON (sorted keys): equal only for the same content."""
    return hashlib.sha256(alert.to_bytes()).hexdigest()


@dataclass(kw_only=True, slots=True)
class Route:
    """The hooks an alert goes to and the control action the control hook may take for it."""

    hooks: list[str] = field(default_factory=list)
    action: str = "none"


class Router:
    """Routes from the rules, the ``[actions]`` grants and ``[dispatch] default_hooks``."""

    def __init__(self, doc: dict[str, Any], rules: list[Rule], *, control_hooks: set[str], declared: set[str]):
        self.rules = {r.name: r for r in rules}
        self.control_hooks = set(control_hooks)
        self.default_hooks = list(doc.get("dispatch", {}).get("default_hooks", []))
        self.grants = _parse_grants(doc.get("actions", {}))
        for name, hooks in [("default_hooks", self.default_hooks)] + [(r.name, r.hooks) for r in rules]:
            unknown = sorted(set(hooks) - declared)
            if unknown:
                raise RuleError(f"{name}: undeclared hook(s) {unknown}")

    def route(self, alert: Alert, raised: dict[str, Any] | None) -> Route:
        """The route of ``alert``, given the sentinel's record of what it raised under that id
        (``{"digest": ...}``, None if nothing): its rule's only for the very alert raised."""
        ours = raised is not None and raised.get("digest") == alert_digest(alert) and alert.rule in self.rules
        return self.for_raised(alert) if ours else self.for_external(alert)

    def for_raised(self, alert: Alert) -> Route:
        """Route of an alert this sentinel's engine raised (its rule decides everything)."""
        rule = self.rules[alert.rule]
        hooks = list(rule.hooks or self.default_hooks)
        if rule.action == "none":
            hooks = [h for h in hooks if h not in self.control_hooks]
        return Route(hooks=hooks, action=rule.action)

    def for_external(self, alert: Alert) -> Route:
        """Route of any other alert: default hooks, control only for an action granted to its rule."""
        allowed = () if alert.rule.startswith(NO_CONTROL_PREFIXES) else self.grants.get(alert.rule, ())
        action = alert.evidence.get("action")
        action = action if isinstance(action, str) and action in allowed and action != "none" else "none"
        hooks = [h for h in self.default_hooks if action != "none" or h not in self.control_hooks]
        return Route(hooks=hooks, action=action)


def _parse_grants(table: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise RuleError("[actions] must be a table of rule name = [actions]")
    grants = {}
    for rule, actions in table.items():
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise RuleError(f"[actions] {rule!r}: expected a list of action names")
        bad = sorted(set(actions) - set(ACTIONS))
        if bad:
            raise RuleError(f"[actions] {rule!r}: unknown action(s) {bad}; expected some of {ACTIONS}")
        if rule.startswith(NO_CONTROL_PREFIXES) and set(actions) - {"none"}:
            raise RuleError(f"[actions] {rule!r}: trainer alerts can never trigger a control action")
        grants[rule] = tuple(actions)
    return grants
