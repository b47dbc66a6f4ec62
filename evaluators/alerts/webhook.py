"""Webhook hook: POST the Alert as JSON, HMAC-SHA256 signed, retried with backoff.

Headers sent::

    X-Headwater-Timestamp: <unix seconds>
    X-Headwater-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

Receivers verify with :func:`verify_signature` (constant-time compare, finite timestamp within
``max_age_s``) and reject replays with :class:`ReplayGuard` (alert ids seen within the window,
kept in an :class:`~evaluators.alerts.journal.IdJournal` file when given one, so a restarted
receiver still refuses a replay of a post it accepted before); a replay is answered 409, which
the hook takes as "delivered before".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from evaluators.alerts.journal import IdJournal
from streams.events import Alert

__all__ = ["ReplayGuard", "WebhookError", "WebhookHook", "load_secret", "sign", "verify_signature"]

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Headwater-Signature"
TIMESTAMP_HEADER = "X-Headwater-Timestamp"


class WebhookError(RuntimeError):
    """Delivery failed after all retries (or was rejected with a 4xx)."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: bytes, timestamp: str, body: bytes, signature: str,
                     *, max_age_s: float = 300.0, now: float | None = None) -> bool:
    """True if ``signature`` is valid for ``body`` and the timestamp is fresh."""
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    if not math.isfinite(sent) or abs((time.time() if now is None else now) - sent) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class ReplayGuard:
    """Signature + freshness check, and each alert id accepted once within the freshness window.

    With ``journal_path`` the accepted ids are also appended to that file (kept twice the window)
    and read back at start-up: a restart does not reopen the window for a captured post."""

    def __init__(self, secret: bytes, *, max_age_s: float = 300.0, journal_path: str | Path | None = None):
        self.secret, self.max_age_s = secret, max_age_s
        self._seen: dict[str, float] = {}  # alert_id -> when accepted
        self._lock = threading.Lock()
        self.journal = None if journal_path is None else IdJournal(journal_path, max_age_s=2 * max_age_s)

    def check(self, timestamp: str, body: bytes, signature: str, *, now: float | None = None) -> str:
        """``"ok"``, ``"invalid"`` (signature, timestamp or body) or ``"replay"`` (id seen in the window)."""
        now = time.time() if now is None else now
        if not verify_signature(self.secret, timestamp, body, signature, max_age_s=self.max_age_s, now=now):
            return "invalid"
        try:
            alert_id = json.loads(body).get("alert_id")
        except (ValueError, AttributeError):
            return "invalid"
        if not isinstance(alert_id, str) or not alert_id:
            return "invalid"
        with self._lock:
            # a timestamp older than the window is rejected above, so older ids can be forgotten
            self._seen = {k: t for k, t in self._seen.items() if now - t <= 2 * self.max_age_s}
            if alert_id in self._seen or (self.journal is not None and alert_id in self.journal):
                return "replay"
            self._seen[alert_id] = now
            if self.journal is not None:
                self.journal.add(alert_id)
        return "ok"


def load_secret(*, env: str | None = None, file: str | None = None) -> bytes:
    """The shared secret from an environment variable or a file (first line, stripped)."""
    if env and os.environ.get(env):
        return os.environ[env].encode()
    if file:
        secret = Path(file).read_text().strip()
        if secret:
            return secret.encode()
        raise WebhookError(f"webhook secret file {file} is empty")
    raise WebhookError(f"no webhook secret: set ${env}" if env else "no webhook secret configured (secret_env or secret_file)")


@dataclass(kw_only=True, slots=True)
class WebhookHook:
    """Deliver alerts to ``url``; retries connection errors, 5xx and 429 with exponential backoff."""

    url: str
    secret: bytes
    retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 10.0
    name: str = "webhook"

    def __call__(self, alert: Alert, action: str = "none") -> dict:
        body = alert.to_bytes()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            ts = f"{time.time():.3f}"
            req = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: ts,
                SIGNATURE_HEADER: sign(self.secret, ts, body),
                "X-Headwater-Alert-Id": alert.alert_id,
            })
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return {"status": resp.status, "attempts": attempt + 1}
            except urllib.error.HTTPError as e:
                if e.code == 409:  # the receiver has this alert already (an earlier attempt got through)
                    return {"status": 409, "attempts": attempt + 1, "duplicate": True}
                last_error = f"HTTP {e.code}"
                if 400 <= e.code < 500 and e.code != 429:
                    raise WebhookError(f"{self.url} rejected alert {alert.alert_id}: {last_error}") from None
            except (urllib.error.URLError, OSError) as e:
                last_error = str(getattr(e, "reason", e))
            log.warning("webhook %s attempt %d failed: %s", self.url, attempt + 1, last_error)
        raise WebhookError(f"{self.url}: gave up after {self.retries + 1} attempts: {last_error}")
