"""The alert sentinel: rules over ``metrics``/``evals``, and hooks + rollback policy for ``alerts``.

Two consumers:

* a follower reading ``checkpoints``, ``evals``, ``control`` and ``shards`` from the beginning, which feeds
  the :class:`RollbackPolicy` its history (caught up before every alert is handled);
* a group consumer on ``metrics``, ``evals`` and ``alerts`` with manual commits: metrics and
  reports go through the rule engine, whose alerts are published to ``alerts``; every alert
  on ``alerts`` (from rules, evaluators or the trainer) is dispatched to its hooks once, and the
  trainer's own ``trainer.rollback`` alerts tell the policy a rollback was applied.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from dataclasses import dataclass

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from evaluators.alerts.control import ControlHook
from evaluators.alerts.dispatch import Dispatcher, build_hooks
from evaluators.alerts.rules import AlertEngine, parse_rules
from evaluators.ledger import TopicFollower
from evaluators.lineage import LineageLog
from evaluators.rollback import RollbackPolicy
from streams.events import Alert, EvalReport, EventError, MetricsEvent, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish

__all__ = ["Sentinel"]

log = logging.getLogger(__name__)


class Sentinel:
    """Turns metrics and reports into alerts, and alerts into hook calls and Controls."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        bootstrap: str
        rules: str
        lineage: str
        group: str = "headwater-sentinel"
        instance: str = "sentinel"

    def __init__(self, config: Config):
        self.config = config
        with open(config.rules, "rb") as f:
            doc = tomllib.load(f)
        self.settings = KafkaSettings.load(bootstrap=config.bootstrap, client_id=f"headwater-{config.instance}")
        self.engine = AlertEngine(parse_rules(doc), source=config.instance)
        self.policy = RollbackPolicy(issued_by=config.instance)
        self.lineage = LineageLog(config.lineage)
        self.producer = make_producer(self.settings)
        control = ControlHook(producer=self.producer, policy=self.policy, lineage=self.lineage)
        self.dispatcher = Dispatcher(build_hooks(doc, control=control),
                                     default_hooks=doc.get("dispatch", {}).get("default_hooks", []))
        self.history = TopicFollower(self.settings, ["checkpoints", "evals", "control", "shards"])
        self.handled: list[tuple[Alert, dict]] = []

    def _catch_up_history(self) -> None:
        for record in self.history.catch_up():
            try:
                self.policy.observe(decode_event(record.value))
            except EventError as e:
                log.warning("%s@%d: undecodable event skipped: %s", record.topic, record.offset, e)

    def _raise(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            publish(self.producer, "alerts", alert, key=alert.rule)

    def process(self, record) -> None:
        """Handle one record of the work topics."""
        try:
            event = decode_event(record.value)
        except EventError as e:
            log.warning("%s@%d: undecodable event skipped: %s", record.topic, record.offset, e)
            return
        if isinstance(event, MetricsEvent):
            self._raise(self.engine.observe_metrics(event))
        elif isinstance(event, EvalReport):
            self._raise(self.engine.observe_eval(event))
        elif isinstance(event, Alert):
            self._catch_up_history()
            self.policy.observe(event)
            results = self.dispatcher.dispatch(event)
            if results:
                log.info("alert %s (%s): %s", event.rule, event.alert_id, results)
                self.handled.append((event, results))

    def run(self, *, stop: threading.Event | None = None, max_idle_s: float | None = None) -> None:
        """Process until ``stop`` is set or ``max_idle_s`` passes without records."""
        stop = stop or threading.Event()
        consumer = make_consumer(self.settings, topics=["metrics", "evals", "alerts"], group_id=self.config.group)
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                batches = consumer.poll(timeout_ms=200)
                self._raise(self.engine.tick())
                if not batches:
                    if not consumer.assignment():  # still joining the group: not idle yet
                        idle_since = time.monotonic()
                    elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                        return
                    continue
                for tp, records in batches.items():
                    for record in records:
                        self.process(record)
                        consumer.commit({TopicPartition(tp.topic, tp.partition):
                                         OffsetAndMetadata(record.offset + 1, "", -1)})
                idle_since = time.monotonic()
        finally:
            consumer.close()

    def close(self) -> None:
        self.history.close()
        self.producer.close()
