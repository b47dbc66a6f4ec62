"""Command hook: run a program with an argument list; the alert goes in on stdin as JSON.

No shell is ever involved. Argument elements may hold placeholders
``{rule} {severity} {alert_id} {dedup_key} {source}``, each replaced in one pass inside
its own element only (other braces stay literal), so alert text can never become extra
arguments or shell syntax. Whoever can write to ``alerts`` chooses that text, so it must not
become an *option* either: an element that starts with a placeholder is refused unless it comes
after a ``--`` element (end of options). Write ``"--rule={rule}"`` or ``"--", "{rule}"``, never
``"--rule", "{rule}"`` or a bare ``"{rule}"`` before ``--`` (a rule named ``--config=/x`` would
be parsed as an option).
The same values are exported as ``HEADWATER_ALERT_<NAME>`` environment variables.

The command runs with a minimal environment: ``PATH`` and ``LANG``, the alert variables, and
only the variables the hook's ``env`` allow list names (``env = ["PAGER_TOKEN"]``). Nothing
else of the sentinel's environment (e.g. ``HEADWATER_WEBHOOK_SECRET``) reaches it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from streams.events import Alert

__all__ = ["CommandError", "CommandHook"]

PLACEHOLDERS = ("rule", "severity", "alert_id", "dedup_key", "source")
BASE_ENV = ("PATH", "LANG")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


class CommandError(RuntimeError):
    """The command exited non-zero or timed out."""


@dataclass(kw_only=True, slots=True)
class CommandHook:
    """Run ``argv`` once per alert."""

    argv: list[str]
    timeout_s: float = 30.0
    env: list[str] = field(default_factory=list)
    """names of environment variables passed through besides PATH and LANG"""
    name: str = "command"

    def __post_init__(self) -> None:
        if not isinstance(self.argv, list) or not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("command hook: argv must be a non-empty list of strings")
        if not isinstance(self.env, list) or not all(isinstance(v, str) for v in self.env):
            raise ValueError("command hook: env must be a list of variable names")
        end = self.argv.index("--") if "--" in self.argv else len(self.argv)
        for arg in self.argv[1:end]:
            if _PLACEHOLDER.match(arg):
                raise ValueError(f"command hook: argument {arg!r} starts with alert text, which could become "
                                 f"an option; put it after a '--' element or inside one ('--name={{...}}')")

    def __call__(self, alert: Alert, action: str = "none") -> dict:
        values = {k: str(getattr(alert, k)) for k in PLACEHOLDERS}
        argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in self.argv]
        env = {k: os.environ[k] for k in (*BASE_ENV, *self.env) if k in os.environ}
        env.update({f"HEADWATER_ALERT_{k.upper()}": v for k, v in values.items()})
        try:
            proc = subprocess.run(argv, input=alert.to_bytes(), capture_output=True,
                                  timeout=self.timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise CommandError(f"{argv[0]}: timed out after {self.timeout_s}s") from None
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-500:]
            raise CommandError(f"{argv[0]}: exit {proc.returncode}: {tail}")
        return {"returncode": 0, "stdout": proc.stdout.decode(errors="replace")[-500:]}
