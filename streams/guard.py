"""The one guard every consumer loop uses: no record, however malformed, stops the loop.

``decode(record)`` turns a Kafka record into an :class:`Event`, or dead-letters it (reason
``undecodable_event``, stage ``consume:<component>``, its topic/partition/offset, a capped
copy of its bytes) and returns ``None``. ``handle(record, fn)`` also runs ``fn(event)`` so an
unexpected exception in the handler is logged, dead-lettered (reason ``consumer_error``) and
counted instead of killing the loop (also a ``BaseException`` such as torch DCP's
``CheckpointException``); ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` still propagate.
Both raise an :class:`Alert` on ``alerts`` (rules ``consumer.undecodable`` and
``consumer.handler_error``) and log a warning, at most one per rule and topic every
``alert_every_s`` (the rest of a flood is logged at debug level and dead-lettered as usual);
the next alert carries the number suppressed meanwhile, and :meth:`ConsumerGuard.flush` (called
by the loops on their idle ticks and at close) reports what a flood suppressed once its window has
passed, without waiting for the next failure. A failed DLQ or alert send is logged and counted
(``dlq_failed`` / ``alert_failed``), never raised: the loop keeps obeying valid records.

A *transient* handler error (:func:`is_transient`: a retriable Kafka error such as
``KafkaTimeoutError``, ``ConnectionError``, ``TimeoutError``, an ``OSError`` like ``EAGAIN``) is
not the record's fault: ``handle`` returns :data:`REDELIVER` without dead-lettering, and the loop
must not commit or advance past the record but seek back to it and retry after
:meth:`ConsumerGuard.retry_delay_s` (so no valid action is lost to a broker hiccup). Handlers
must therefore be replay-safe.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from kafka.errors import KafkaError

from streams.events import Alert, DeadLetter, Event, EventError, decode_event
from streams.kafka import publish

__all__ = ["ALERT_HANDLER_ERROR", "ALERT_UNDECODABLE", "CONTROL_MAX_POLL_RECORDS", "REDELIVER", "ConsumerGuard",
           "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

ALERT_UNDECODABLE = "consumer.undecodable"
ALERT_HANDLER_ERROR = "consumer.handler_error"
_PROPAGATE = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""What a handler may raise through the guard. Everything else is the record's failure, including
non-``Exception`` errors libraries raise on bad data (torch DCP's ``CheckpointException`` is a
``BaseException``: a checkpoint that fails to load must not crash-loop the evaluator)."""
CONTROL_MAX_POLL_RECORDS = 50
"""Records per poll for the ``control`` consumers: with ``Control.MAX_BYTES`` records a flood costs a
poll loop at most a few seconds before it checks its deadline or stop flag again."""
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT,
                              errno.ENOBUFS, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


class _Redeliver(enum.Enum):
    REDELIVER = "redeliver"


REDELIVER: Literal[_Redeliver.REDELIVER] = _Redeliver.REDELIVER
"""What :meth:`ConsumerGuard.handle` returns after a transient handler error: redeliver the record."""


def is_transient(error: BaseException) -> bool:
    """True for errors that retrying the same record may cure (it or its ``__cause__`` chain is a
    retriable Kafka error, a connection error, a timeout, or an ``OSError`` such as ``EAGAIN``)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KafkaError) and getattr(e, "retriable", False):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        e = e.__cause__
    return False


class ConsumerGuard:
    """Decode records and run their handlers for one component; failures go to the DLQ + an alert.

    ``max_bytes``: records larger than this are undecodable before any parsing (a consumer that
    reads only small kinds, e.g. ``Control.MAX_BYTES``, spends no time on a flood of big ones).
    ``producer`` may be ``None`` (no broker to write to): failures are then only logged and
    counted. ``counts`` holds ``decoded``, ``undecodable``, ``handler_errors``, ``redelivered``,
    ``dead_lettered``, ``dlq_failed``, ``alerts``, ``alert_failed`` and ``suppressed`` (ingest exports
    its control guard's as the ``consumer_guard`` stage of its metrics).
    """

    def __init__(self, component: str, producer: Any | None, *, dlq_topic: str = "dlq",
                 alerts_topic: str = "alerts", alert_every_s: float = 60.0, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.component, self.producer, self.max_bytes = component, producer, max_bytes
        self.dlq_topic, self.alerts_topic = dlq_topic, alerts_topic
        self.alert_every_s, self.clock = alert_every_s, clock
        self.counts: Counter[str] = Counter()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._transient_streak = 0  # consecutive transient failures (the redelivery backoff)

    @property
    def stage(self) -> str:
        return f"consume:{self.component}"

    def decode(self, record: Any) -> Event | None:
        """The record's event, or ``None`` after dead-lettering an undecodable record."""
        try:
            size = len(record.value) if isinstance(record.value, (bytes, bytearray, str)) else 0
            if self.max_bytes is not None and size > self.max_bytes:
                raise EventError("Event", "<root>", f"{size} bytes > this consumer's limit {self.max_bytes}")
            event = decode_event(record.value)
        except EventError as e:
            self.counts["undecodable"] += 1
            self._fail(record, reason="undecodable_event", rule=ALERT_UNDECODABLE, severity="warning", error=str(e))
            return None
        self.counts["decoded"] += 1
        return event

    def handle(self, record: Any, fn: Callable[[Event], T]) -> T | None | Literal[_Redeliver.REDELIVER]:
        """``fn(event)`` for a decodable record; ``None`` if it is undecodable or ``fn`` raised;
        :data:`REDELIVER` if ``fn`` raised a transient error (nothing dead-lettered)."""
        event = self.decode(record)
        if event is None:
            return None
        try:
            result = fn(event)
        except BaseException as e:  # a handler bug on one record must not stop the loop
            if isinstance(e, _PROPAGATE):
                raise
            if is_transient(e):
                self.counts["redelivered"] += 1
                self._transient_streak += 1
                log.warning("%s: transient %s on %s %s, redelivering (attempt %d): %s", self.component,
                            type(e).__name__, event.KIND, _where(record), self._transient_streak, e)
                return REDELIVER
            self._transient_streak = 0
            self.counts["handler_errors"] += 1
            log.exception("%s: handler failed on %s %s", self.component, event.KIND, _where(record))
            self._fail(record, reason="consumer_error", rule=ALERT_HANDLER_ERROR, severity="critical",
                       error=f"{type(e).__name__}: {e}")
            return None
        self._transient_streak = 0
        return result

    def retry_delay_s(self) -> float:
        """How long a loop waits before redelivering (exponential in consecutive transient
        failures, 0.2 s to 30 s)."""
        return min(0.2 * 2 ** max(self._transient_streak - 1, 0), 30.0)

    def flush(self, *, force: bool = False) -> int:
        """Report failures a flood suppressed: one summary alert per (rule, topic) whose window has
        passed (every one with ``force``, e.g. at close). Returns how many were sent."""
        now, sent = self.clock(), 0
        for key, n in list(self._suppressed.items()):
            if not n or (not force and now - self._last_alert.get(key, now) < self.alert_every_s):
                continue
            rule, topic = key
            del self._suppressed[key]
            self._last_alert[key] = now
            log.warning("%s: %d more %s on %s since the last alert", self.component, n, rule, topic)
            alert = Alert(rule=rule, severity="critical" if rule == ALERT_HANDLER_ERROR else "warning",
                          source=self.component,
                          message=f"{self.component}: {n} more {rule} failure(s) on {topic} dead-lettered since "
                                  "the last alert",
                          dedup_key=f"{rule}:{self.component}:{topic}",
                          evidence={"component": self.component, "topic": topic,
                                    "suppressed_since_last_alert": n, "dlq_topic": self.dlq_topic})
            if self._send(self.alerts_topic, alert, key=rule, failed="alert_failed"):
                self.counts["alerts"] += 1
                sent += 1
        return sent

    # -- failures ----------------------------------------------------------------------------
    def _fail(self, record: Any, *, reason: str, rule: str, severity: str, error: str) -> None:
        value = record.value if isinstance(record.value, (bytes, bytearray)) else b""
        letter = DeadLetter.of(bytes(value), reason=reason, stage=self.stage, topic=record.topic,
                               partition=record.partition, offset=record.offset, detail=error[:500])
        if self._send(self.dlq_topic, letter, key=reason, failed="dlq_failed"):
            self.counts["dead_lettered"] += 1
        key = (rule, record.topic)
        now = self.clock()
        last = self._last_alert.get(key)
        if last is not None and now - last < self.alert_every_s:  # a flood: one log line + alert per window
            self._suppressed[key] += 1
            self.counts["suppressed"] += 1
            log.debug("%s: %s %s dead-lettered: %s", self.component, reason, _where(record), error)
            return
        self._last_alert[key] = now
        suppressed = self._suppressed.pop(key, 0)
        log.warning("%s: %s %s dead-lettered: %s (%d more since the last alert)", self.component, reason,
                    _where(record), error, suppressed)
        alert = Alert(rule=rule, severity=severity, source=self.component,
                      message=f"{self.component}: {reason} on {_where(record)} dead-lettered: {error[:200]}",
                      dedup_key=f"{rule}:{self.component}:{record.topic}",
                      evidence={"component": self.component, "topic": record.topic,
                                "partition": record.partition, "offset": record.offset, "reason": reason,
                                "suppressed_since_last_alert": suppressed, "dlq_topic": self.dlq_topic})
        if self._send(self.alerts_topic, alert, key=rule, failed="alert_failed"):
            self.counts["alerts"] += 1

    def _send(self, topic: str, event: Event, *, key: str, failed: str) -> bool:
        if self.producer is None:
            self.counts[failed] += 1
            return False
        try:
            publish(self.producer, topic, event, key=key)  # acknowledged before the caller moves on
            return True
        except Exception as e:  # noqa: BLE001 - a broken DLQ/alert path is reported, never fatal
            self.counts[failed] += 1
            log.error("%s: could not send %s to %s: %s: %s", self.component, event.KIND, topic, type(e).__name__, e)
            return False


def _where(record: Any) -> str:
    return f"{record.topic}@{record.partition}:{record.offset}"
