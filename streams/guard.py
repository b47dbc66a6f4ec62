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
the next alert carries the number suppressed meanwhile. A failed DLQ or alert send is logged and
counted (``dlq_failed`` / ``alert_failed``), never raised: the loop keeps obeying valid records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from streams.events import Alert, DeadLetter, Event, EventError, decode_event
from streams.kafka import publish

__all__ = ["ALERT_HANDLER_ERROR", "ALERT_UNDECODABLE", "ConsumerGuard"]

log = logging.getLogger(__name__)
T = TypeVar("T")

ALERT_UNDECODABLE = "consumer.undecodable"
ALERT_HANDLER_ERROR = "consumer.handler_error"
_PROPAGATE = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""What a handler may raise through the guard. Everything else is the record's failure, including
non-``Exception`` errors libraries raise on bad data (torch DCP's ``CheckpointException`` is a
``BaseException``: a checkpoint that fails to load must not crash-loop the evaluator)."""


class ConsumerGuard:
    """Decode records and run their handlers for one component; failures go to the DLQ + an alert.

    ``producer`` may be ``None`` (no broker to write to): failures are then only logged and
    counted. ``counts`` holds ``decoded``, ``undecodable``, ``handler_errors``, ``dead_lettered``,
    ``dlq_failed``, ``alerts`` and ``alert_failed``.
    """

    def __init__(self, component: str, producer: Any | None, *, dlq_topic: str = "dlq",
                 alerts_topic: str = "alerts", alert_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.component, self.producer = component, producer
        self.dlq_topic, self.alerts_topic = dlq_topic, alerts_topic
        self.alert_every_s, self.clock = alert_every_s, clock
        self.counts: Counter[str] = Counter()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()

    @property
    def stage(self) -> str:
        return f"consume:{self.component}"

    def decode(self, record: Any) -> Event | None:
        """The record's event, or ``None`` after dead-lettering an undecodable record."""
        try:
            event = decode_event(record.value)
        except EventError as e:
            self.counts["undecodable"] += 1
            self._fail(record, reason="undecodable_event", rule=ALERT_UNDECODABLE, severity="warning", error=str(e))
            return None
        self.counts["decoded"] += 1
        return event

    def handle(self, record: Any, fn: Callable[[Event], T]) -> T | None:
        """``fn(event)`` for a decodable record; ``None`` if it is undecodable or ``fn`` raised."""
        event = self.decode(record)
        if event is None:
            return None
        try:
            return fn(event)
        except BaseException as e:  # a handler bug on one record must not stop the loop
            if isinstance(e, _PROPAGATE):
                raise
            self.counts["handler_errors"] += 1
            log.exception("%s: handler failed on %s %s", self.component, event.KIND, _where(record))
            self._fail(record, reason="consumer_error", rule=ALERT_HANDLER_ERROR, severity="critical",
                       error=f"{type(e).__name__}: {e}")
            return None

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
