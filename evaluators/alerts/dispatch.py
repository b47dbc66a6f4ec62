"""Route alerts to named hooks; each alert is delivered once, a failing hook never stops the others.

Hooks are declared in the rules TOML::

    [dispatch]
    default_hooks = ["webhook", "control"]   # for alerts that name none (e.g. eval regressions)

    [hooks.webhook]
    type = "webhook"
    url = "http://127.0.0.1:8080/alerts"
    secret_env = "HEADWATER_WEBHOOK_SECRET"   # or secret_file = "/run/secrets/webhook"
    retries = 4
    backoff_s = 0.5

    [hooks.page]
    type = "command"
    argv = ["/usr/local/bin/page-oncall", "--rule", "{rule}"]

    [hooks.control]
    type = "control"
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from evaluators.alerts.command import CommandHook
from evaluators.alerts.webhook import WebhookHook, load_secret
from streams.events import Alert

__all__ = ["Dispatcher", "HookError", "build_hooks"]

log = logging.getLogger(__name__)
Hook = Callable[[Alert], dict]


class HookError(ValueError):
    """A hook declaration is invalid."""


def build_hooks(doc: dict[str, Any], *, control: Hook | None = None) -> dict[str, Hook]:
    """Hooks from the ``[hooks.*]`` tables; ``control`` is the ready ControlHook for type="control"."""
    hooks: dict[str, Hook] = {}
    for name, spec in doc.get("hooks", {}).items():
        spec = dict(spec)
        kind = spec.pop("type", name)
        if kind == "webhook":
            secret = load_secret(env=spec.pop("secret_env", None), file=spec.pop("secret_file", None))
            hooks[name] = WebhookHook(secret=secret, name=name, **spec)
        elif kind == "command":
            hooks[name] = CommandHook(name=name, **spec)
        elif kind == "control":
            if control is None:
                raise HookError(f"hook {name!r}: the control hook needs a Kafka producer (none given)")
            hooks[name] = control
        else:
            raise HookError(f"hook {name!r}: unknown type {kind!r} (webhook | command | control)")
    return hooks


class Dispatcher:
    """Deliver each alert (by ``alert_id``, once) to the hooks it names or the defaults."""

    def __init__(self, hooks: dict[str, Hook], *, default_hooks: list[str] | None = None, remember: int = 10_000):
        unknown = [h for h in default_hooks or [] if h not in hooks]
        if unknown:
            raise HookError(f"default_hooks names undeclared hook(s): {unknown}")
        self.hooks = hooks
        self.default_hooks = list(default_hooks or [])
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def dispatch(self, alert: Alert) -> dict[str, dict]:
        """Results per hook name: ``{"ok": True, ...}`` or ``{"ok": False, "error": ...}``; {} for repeats."""
        if alert.alert_id in self._seen:
            return {}
        self._seen[alert.alert_id] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        names = alert.evidence.get("hooks") or self.default_hooks
        results: dict[str, dict] = {}
        for name in names:
            hook = self.hooks.get(name)
            if hook is None:
                results[name] = {"ok": False, "error": f"no hook named {name!r}"}
                continue
            try:
                results[name] = {"ok": True, **hook(alert)}
            except Exception as e:  # noqa: BLE001 - a broken hook must not silence the others
                log.error("hook %s failed for alert %s: %s", name, alert.alert_id, e)
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return results
