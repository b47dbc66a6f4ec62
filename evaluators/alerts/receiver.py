"""A signed-webhook endpoint on 127.0.0.1: what an on-call integration looks like locally.

It verifies each POST's HMAC signature and freshness and rejects replays (see
:class:`evaluators.alerts.webhook.ReplayGuard`: 401 invalid, 409 replay), keeps what it
received, and optionally appends it to a JSON-lines file. ``headwater demo`` uses it as the
on-call endpoint; the tests use it (``fail_first``) to exercise retries.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from evaluators.alerts.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, ReplayGuard

__all__ = ["SignedWebhookReceiver"]


class SignedWebhookReceiver:
    """HTTP server verifying alert signatures; the first ``fail_first`` posts get ``status_on_fail``."""

    def __init__(self, secret: bytes, *, fail_first: int = 0, status_on_fail: int = 503,
                 log_path: Path | None = None, seen_path: Path | None = None):
        self.received: list[dict] = []
        self.attempts: list[float] = []
        self.rejected: list[str] = []  # "invalid" | "replay", one per rejected post
        guard = ReplayGuard(secret, journal_path=seen_path)  # seen_path: replays refused across restarts
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts.append(time.monotonic())
                if len(receiver.attempts) <= fail_first:
                    self.send_response(status_on_fail)
                    self.end_headers()
                    return
                verdict = guard.check(self.headers.get(TIMESTAMP_HEADER, ""), body,
                                      self.headers.get(SIGNATURE_HEADER, ""))
                if verdict == "replay":
                    receiver.rejected.append(verdict)
                    self.send_response(409)
                    self.end_headers()
                    return
                ok = verdict == "ok"
                if not ok:
                    receiver.rejected.append(verdict)
                try:
                    alert = json.loads(body or b"{}")
                except ValueError:
                    alert = {}
                entry = {"valid": ok, "alert": alert, "path": self.path, "received_at": time.time()}
                receiver.received.append(entry)
                if log_path is not None:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook-receiver").start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
