"""Deliver alerts to named hooks: an alert is done only once all its hooks succeeded.

Which hooks an alert goes to (and the control action it may trigger) is decided by
:class:`evaluators.alerts.routing.Router` from the rules TOML, never by the alert. Hooks are
declared there too::

    [dispatch]
    default_hooks = ["webhook", "control"]   # alerts whose rule names none
    retries = 2          # a failing hook is retried this many times per dispatch ...
    backoff_s = 0.5      # ... after 0.5 s, 1 s, ... (capped at max_backoff_s)

    [hooks.webhook]
    type = "webhook"
    url = "http://127.0.0.1:8080/alerts"
    secret_env = "HEADWATER_WEBHOOK_SECRET"   # or secret_file = "/run/secrets/webhook"
    retries = 4
    backoff_s = 0.5

    [hooks.page]
    type = "command"
    argv = ["/usr/local/bin/page-oncall", "--rule={rule}"]   # or "--", "{rule}": never an option
    env = ["PAGER_TOKEN"]    # passed through besides PATH and LANG; nothing else is inherited

    [hooks.control]
    type = "control"

    [actions]                                # control actions granted to alerts the engine did not raise
    eval_regression = ["rollback"]
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from evaluators.alerts.command import CommandHook
from evaluators.alerts.journal import IdJournal
from evaluators.alerts.routing import Route
from evaluators.alerts.webhook import WebhookHook, load_secret
from streams.events import Alert

__all__ = ["Dispatcher", "HookError", "HookPending", "build_hooks"]

log = logging.getLogger(__name__)
Hook = Callable[[Alert, str], dict]
"""called with the alert and the control action its route allows; returns a result dict"""


class HookError(ValueError):
    """A hook declaration is invalid."""


class HookPending(Exception):
    """A hook cannot act on an alert yet (not a failure): the alert stays not done, the hook is
    not retried within this dispatch and nothing is paged; the caller dispatches it again later."""


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
    """Deliver each alert (by ``alert_id``) to the hooks of its route until all have succeeded.

    A failing hook is retried ``retries`` times with exponential backoff within one
    :meth:`dispatch`; hooks that already succeeded for an alert are not called again when it is
    dispatched again. The caller decides what an alert that is still not done means
    (the sentinel keeps its offset uncommitted while a control hook fails or is pending) or gives up on it
    with :meth:`give_up`. With a ``journal`` the alerts done survive a restart (an alert
    redelivered because its offset was not committed yet runs no hook twice).
    """

    def __init__(self, hooks: dict[str, Hook], *, retries: int = 2, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, remember: int = 10_000,
                 sleep: Callable[[float], None] = time.sleep, journal: IdJournal | None = None):
        self.hooks = hooks
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep
        self._done: OrderedDict[str, None] = OrderedDict()
        self._succeeded: dict[str, set[str]] = {}  # alert_id -> hooks done, for alerts not done yet
        self._remember = remember
        self.journal = journal

    def is_done(self, alert_id: str) -> bool:
        return alert_id in self._done or (self.journal is not None and alert_id in self.journal)

    def dispatch(self, alert: Alert, route: Route) -> dict[str, dict]:
        """Results per hook called: ``{"ok": True, ...}`` or ``{"ok": False, "error": ...}``; {} when done before."""
        if self.is_done(alert.alert_id):
            return {}
        succeeded = self._succeeded.setdefault(alert.alert_id, set())
        results: dict[str, dict] = {}
        for name in route.hooks:
            if name in succeeded:
                continue
            results[name] = self._call(name, alert, route.action)
            if results[name]["ok"]:
                succeeded.add(name)
        if succeeded >= set(route.hooks):
            self._finish(alert.alert_id)
        return results

    def give_up(self, alert_id: str) -> None:
        """Stop retrying an alert's failed hooks (the caller has raised the failure)."""
        self._finish(alert_id)

    def _call(self, name: str, alert: Alert, action: str) -> dict:
        hook = self.hooks.get(name)
        if hook is None:
            return {"ok": False, "error": f"no hook named {name!r}"}
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                return {"ok": True, **hook(alert, action)}
            except HookPending as e:
                log.info("hook %s defers alert %s: %s", name, alert.alert_id, e)
                return {"ok": False, "pending": True, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - a broken hook must not silence the others
                error = f"{type(e).__name__}: {e}"
                log.error("hook %s failed for alert %s (attempt %d/%d): %s", name, alert.alert_id,
                          attempt + 1, self.retries + 1, error)
        log.critical("hook %s gave up on alert %s (%s) after %d attempts: %s", name, alert.alert_id,
                     alert.rule, self.retries + 1, error)
        return {"ok": False, "error": error, "attempts": self.retries + 1}

    def _finish(self, alert_id: str) -> None:
        self._succeeded.pop(alert_id, None)
        self._done[alert_id] = None
        if self.journal is not None:
            self.journal.add(alert_id)
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
