"""Broker liveness for long-running clients: a clear warning while Kafka does not answer.

kafka-python blocks quietly while a broker is hung (a paused or overloaded process still
accepts TCP connections, it just never answers): produce flushes and offset look-ups wait for
their request timeouts, and nothing tells an operator why the job stalled. :class:`BrokerWatch`
probes the bootstrap broker from a daemon thread with a raw ApiVersions request (no client
state shared with the job), logs a WARNING once it has not answered for ``warn_after_s`` (and
again every ``repeat_s``), and after such a warned-about outage calls ``on_restored(seconds)``
when it answers again, where the caller publishes an Alert (Kafka is reachable again by then).
A single slow or lost probe shorter than ``warn_after_s`` (a loaded broker) raises nothing.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

__all__ = ["BrokerWatch", "probe"]

log = logging.getLogger("headwater.kafka.watch")

_API_VERSIONS = 18


def probe(bootstrap: str, *, timeout_s: float = 3.0) -> bool:
    """True if the first bootstrap broker answers an ApiVersions request within ``timeout_s``."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    client = b"headwater-watch"
    body = struct.pack(">hhih", _API_VERSIONS, 0, 1, len(client)) + client
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                chunk = s.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return struct.unpack(">i", head[4:8])[0] == 1


class BrokerWatch:
    """Background prober of ``bootstrap``; ``close()`` stops it."""

    def __init__(self, bootstrap: str, *, who: str, on_restored: Callable[[float], None] | None = None,
                 interval_s: float = 2.0, timeout_s: float = 3.0, warn_after_s: float = 5.0, repeat_s: float = 15.0):
        self.bootstrap, self.who, self.on_restored = bootstrap, who, on_restored
        self.interval_s, self.timeout_s, self.warn_after_s, self.repeat_s = interval_s, timeout_s, warn_after_s, repeat_s
        self.down_since: float | None = None
        self.outages: list[float] = []  # seconds each closed outage lasted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        warned_at: float | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            up = probe(self.bootstrap, timeout_s=self.timeout_s)
            now = time.monotonic()
            if not up:
                if self.down_since is None:  # measured from the first unanswered probe's start
                    self.down_since = started
                down = now - self.down_since
                if down >= self.warn_after_s and (warned_at is None or now - warned_at >= self.repeat_s):
                    log.warning("Kafka broker %s unreachable for %.0fs (no answer within %.0fs): %s is stalled "
                                "until it answers; nothing is lost", self.bootstrap, down, self.timeout_s, self.who)
                    warned_at = now
            elif self.down_since is not None:
                down, warned = now - self.down_since, warned_at is not None
                self.down_since, warned_at = None, None
                if warned:  # an outage only once it was seen (and warned about): one slow probe is not one
                    self.outages.append(down)
                    log.warning("Kafka broker %s reachable again after %.1fs", self.bootstrap, down)
                    if self.on_restored is not None:
                        try:
                            self.on_restored(down)
                        except Exception as e:  # noqa: BLE001 - a failed notification must not kill the watch
                            log.error("broker-restored notification failed: %s", e)
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + self.interval_s + 1)
