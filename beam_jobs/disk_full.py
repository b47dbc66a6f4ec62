"""Disk full on the stream root: recognise ENOSPC, alert once, wait for space, resume.

A micro-batch that runs out of space publishes nothing past its last complete shard: a shard
is published by the atomic index.json rewrite, and the writer removes its temp files and any
shard it moved in but could not publish. The batch's unsettled offsets are simply read again
by the next batch, so waiting and retrying loses and duplicates nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from beam_jobs.alerts_out import publish_alert
from streams.events import Alert

__all__ = ["ALERT_RULE", "RESOLVED_RULE", "DiskFullGuard", "disk_full_error", "is_disk_full"]

log = logging.getLogger("headwater.ingest.disk")

ALERT_RULE = "ingest.disk_full"
RESOLVED_RULE = "ingest.disk_full_resolved"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


_FULL_TEXT = re.compile("|".join([rf"\[Errno {n}\]" for n in _FULL_ERRNOS]
                                  + [re.escape(os.strerror(n)) for n in _FULL_ERRNOS]))


def disk_full_error(exc: BaseException | None) -> str | None:
    """One line naming the ENOSPC/EDQUOT error in ``exc``'s cause/context chain, or None.

    The in-memory DirectRunner re-raises a DoFn's error as a RuntimeError whose cause is the
    original; the multi-threading/multi-processing and portable runners keep only its text
    (``OSError: [Errno 28] No space left on device: ...`` inside a worker traceback), so the
    messages are searched too."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return str(exc)[:500]
        line = next((ln for ln in str(exc).splitlines() if _FULL_TEXT.search(ln)), None)
        if line is not None:
            return line.strip()[:500]
        exc = exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception in its cause/context chain is ENOSPC or EDQUOT."""
    return disk_full_error(exc) is not None


@dataclass(kw_only=True, slots=True)
class DiskFullGuard:
    """One disk-full episode at a time: an Alert when it starts, backoff while it lasts, and a
    resolved Alert (with its duration) after the first batch that completes again."""

    path: str
    bootstrap: str | None = None
    max_backoff_s: float = 30.0
    poll_s: float = 0.5
    started: float | None = field(default=None, init=False)  # monotonic start of the episode
    failures: int = field(default=0, init=False)
    free_at_failure: int = field(default=0, init=False)

    def _alert(self, rule: str, severity: str, message: str, **evidence) -> None:
        log.log(logging.ERROR if severity == "critical" else logging.WARNING, "[alert] %s: %s", rule, message)
        if not self.bootstrap:
            return
        alert = Alert(rule=rule, severity=severity, message=message, source="ingest",
                      dedup_key=f"{ALERT_RULE}:{self.path}", evidence={"path": self.path, **evidence})
        try:
            publish_alert(self.bootstrap, alert)
        except Exception as e:  # noqa: BLE001 - the log line above is the fallback
            log.error("could not publish the %s alert: %s", rule, e)

    def failed(self, exc: BaseException) -> None:
        """A batch failed with ENOSPC/EDQUOT: log it; alert if this starts an episode."""
        usage = shutil.disk_usage(self.path)
        self.free_at_failure = usage.free
        self.failures += 1
        error = disk_full_error(exc) or f"{type(exc).__name__}: {str(exc)[:500]}"  # not a worker traceback
        if self.started is None:
            self.started = time.monotonic()
            self._alert(ALERT_RULE, "critical",
                        f"disk full on stream root {self.path} ({usage.free} of {usage.total} bytes free): {error}; "
                        "ingest is paused and retries until space is freed, nothing settled is lost",
                        free_bytes=usage.free, total_bytes=usage.total, error=error)
        else:
            log.warning("still no space on %s (attempt %d, %d bytes free)", self.path, self.failures, usage.free)

    def wait(self) -> None:
        """Back off (1 s doubling to ``max_backoff_s``), returning early once space was freed."""
        backoff = min(self.max_backoff_s, 2.0 ** (self.failures - 1))
        total = shutil.disk_usage(self.path).total
        wanted = self.free_at_failure + min(1 << 20, max(total // 10, 64 << 10))
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline:
            if shutil.disk_usage(self.path).free >= wanted:
                return
            time.sleep(self.poll_s)

    def succeeded(self) -> None:
        """A batch completed: close the episode, if one is open."""
        if self.started is None:
            return
        took = time.monotonic() - self.started
        self._alert(RESOLVED_RULE, "info",
                    f"stream root {self.path} writable again after {took:.1f}s and {self.failures} failed attempts",
                    duration_s=took, failures=self.failures)
        self.started, self.failures = None, 0
