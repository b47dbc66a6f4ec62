"""The alert sentinel: rules over ``metrics.*``/``evals``, and hooks + rollback policy for ``alerts``.

Two consumers:

* a follower reading ``checkpoints``, ``evals``, ``control`` and ``shards`` from the beginning, which feeds
  the :class:`RollbackPolicy` its history (caught up before every alert is handled);
* a group consumer on ``metrics.ingest``, ``metrics.trainer``, ``evals`` and ``alerts`` with
  manual commits: metrics and reports go through the rule engine (a metric's producer is the
  topic it came from, whose only writer is that component's credential, never what the event
  says), whose alerts are published to ``alerts`` (id and content digest kept in
  ``<lineage>.raised.jsonl``); every alert on ``alerts`` is dispatched to the hooks of its
  route (evaluators/alerts/routing.py: the engine's own alerts, same id *and* same content, by
  their rule; any other alert by the ``[actions]`` grants, never by what the alert says), and
  the trainer's own ``trainer.rollback`` alerts tell the policy a rollback was applied. Alerts
  whose hooks all succeeded are kept in ``<lineage>.done.jsonl``. Both records are bounded
  (7 days, 100,000 entries: evaluators/alerts/journal.py) and survive restarts.

An alert's offset is committed only once its control hook succeeded: while it fails, the
consumer seeks back to it and retries with backoff (the page ``sentinel.hook_failed`` goes out
once); while it is pending (a rollback of the run is in flight, evaluators/rollback.py) the same,
without a page. A transient error while handling any record (the broker timing out a publish: the guard's
``REDELIVER``) is retried the same way. Handling is replay-safe: a redelivered metric or report is
not observed by the rule engine twice; the alerts it raised stay pending until published, under
ids derived from (rule, dedup key, window: the triggering record, or the cooldown period of an
``absent`` alert), so a retry after an unacknowledged publish does not act twice. Other hooks that still fail after the dispatcher's retries are given up with a critical
log and the same page.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from evaluators.alerts.control import ControlHook
from evaluators.alerts.dispatch import Dispatcher, build_hooks
from evaluators.alerts.journal import IdJournal
from evaluators.alerts.routing import Router, alert_digest
from evaluators.alerts.rules import AlertEngine, parse_rules
from evaluators.ledger import TopicFollower
from evaluators.lineage import LineageLog
from evaluators.rollback import RollbackPolicy
from streams.events import Alert, Control, EvalReport, Event, MetricsEvent
from streams.guard import REDELIVER, ConsumerGuard, is_transient
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.signing import ControlRejected, ControlVerifier, brief, load_signing_key
from streams.topics import metrics_component

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
        rules = parse_rules(doc)
        self.engine = AlertEngine(rules, source=config.instance)
        rollback = doc.get("rollback", {})
        self.policy = RollbackPolicy(issued_by=config.instance,
                                     confirm_checkpoints=int(rollback.get("confirm_checkpoints", 1)))
        self.lineage = LineageLog(config.lineage)
        self.producer = make_producer(self.settings)
        self.guard = ConsumerGuard(config.instance, self.producer)
        control = ControlHook(producer=self.producer, policy=self.policy, lineage=self.lineage,
                              key=load_signing_key("sentinel"))
        self.verifier = ControlVerifier.from_env()
        hooks = build_hooks(doc, control=control)
        self.control_hooks = {name for name, hook in hooks.items() if hook is control}
        self.router = Router(doc, rules, control_hooks=self.control_hooks, declared=set(hooks))
        dispatch = doc.get("dispatch", {})
        lineage = Path(config.lineage)
        self.dispatcher = Dispatcher(hooks, retries=int(dispatch.get("retries", 2)),
                                     backoff_s=float(dispatch.get("backoff_s", 0.5)),
                                     journal=IdJournal(lineage.with_suffix(".done.jsonl")))
        self.raised = IdJournal(lineage.with_suffix(".raised.jsonl"))
        self.history = TopicFollower(self.settings, ["checkpoints", "evals", "control", "shards"])
        self.handled: list[tuple[Alert, dict]] = []
        self._paged: set[str] = set()  # alert ids whose hook failure was paged
        self._failures = 0  # consecutive dispatches whose control hook failed (retry backoff)
        self._pending: list[Alert] = []  # raised by the engine, not yet acknowledged by the broker
        self._observed: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset observed

    def _catch_up_history(self) -> None:
        for record in self.history.catch_up():
            self.guard.handle(record, self._observe_history)

    def _observe_history(self, event: Event) -> None:
        """Feed the policy; a Control counts only if authentic (forged rollbacks must not
        make a real one look pending). Consumers of ``control`` alert on rejections."""
        if isinstance(event, Control):
            try:
                self.verifier.verify(event, catch_up=True)
            except ControlRejected as e:
                log.warning("history: control %s ignored: %s", brief(event.control_id), e)
                return
        self.policy.observe(event)

    def _raise(self, alerts: list[Alert], *, window: str | None = None) -> None:
        """Queue the engine's alerts under stable ids, then publish every pending one (ids and
        digests recorded first: only alerts with both get their rule's route). A failed publish
        raises with that alert and the rest still pending."""
        self._pending += [replace(a, alert_id=self._alert_id(a, window)) for a in alerts]
        while self._pending:
            alert = self._pending[0]
            self.raised.add(alert.alert_id, rule=alert.rule, digest=alert_digest(alert))
            publish(self.producer, "alerts", alert, key=alert.rule)
            self._pending.pop(0)

    def _alert_id(self, alert: Alert, window: str | None) -> str:
        """A deterministic id per (rule, dedup key, window); without a triggering record the
        window is the rule's cooldown period the alert fell in."""
        if window is None:
            rule = next((r for r in self.engine.rules if r.name == alert.rule), None)
            period = max(rule.cooldown_s if rule else 0.0, 1.0)
            window = f"period:{int(alert.created_at // period)}"
        return hashlib.sha256(f"{alert.rule}|{alert.dedup_key}|{window}".encode()).hexdigest()[:32]

    def process(self, record) -> bool:
        """Handle one record of the work topics (the guard dead-letters what cannot be handled);
        False if it must be redelivered: an alert's control hook failed or a transient error."""
        where = (record.topic, record.partition, record.offset)
        result = self.guard.handle(record, lambda event: self.on_event(event, topic=record.topic, where=where))
        return result is not False and result is not REDELIVER

    def on_event(self, event: Event, *, topic: str, where: tuple[str, int, int] | None = None) -> bool:
        """Handle one decoded event read from ``topic`` (at ``where``: topic, partition, offset);
        False while an alert's control hook fails."""
        if isinstance(event, MetricsEvent):
            producer = metrics_component(topic)
            if producer is None:
                log.warning("MetricsEvent on %s ignored: metrics are read only from metrics.<component>", brief(topic))
                return True
            self._observe_once(where, lambda: self.engine.observe_metrics(event, producer=producer))
        elif isinstance(event, EvalReport):
            self._observe_once(where, lambda: self.engine.observe_eval(event))
        elif isinstance(event, Alert):
            return self._handle_alert(event)
        return True

    def _observe_once(self, where: tuple[str, int, int] | None, observe) -> None:
        """Run the engine on a record unless it already did (a redelivery), then publish pending alerts."""
        if where is None or where[2] > self._observed.get(where[:2], -1):
            if where is not None:
                self._observed[where[:2]] = where[2]
            alerts = observe()
        else:
            alerts = []
        self._raise(alerts, window=None if where is None else "record:{}:{}:{}".format(*where))

    def _handle_alert(self, alert: Alert) -> bool:
        self._catch_up_history()
        self.policy.observe(alert)
        route = self.router.route(alert, self.raised.get(alert.alert_id))
        results = self.dispatcher.dispatch(alert, route)
        if results:
            log.info("alert %s (%s) action=%s: %s", alert.rule, alert.alert_id, route.action, results)
            self.handled.append((alert, results))
        pending = sorted(name for name, r in results.items() if r.get("pending"))
        failed = sorted(name for name, r in results.items() if not r["ok"] and name not in pending)
        if failed:
            self._page_failure(alert, failed, results)
        if any(name in self.control_hooks for name in failed + pending):
            self._failures += 1
            return False
        if failed:
            self.dispatcher.give_up(alert.alert_id)
        self._failures = 0
        return True

    def _page_failure(self, alert: Alert, failed: list[str], results: dict[str, dict]) -> None:
        """Critical page (once per alert) that hooks of ``alert`` still fail after their retries."""
        if alert.rule == "sentinel.hook_failed" or alert.alert_id in self._paged:
            return
        self._paged.add(alert.alert_id)
        blocking = [n for n in failed if n in self.control_hooks]
        message = (f"hook(s) {failed} failed for alert {alert.rule} ({alert.alert_id})"
                   + (": its control action is retried until it succeeds" if blocking else ": given up"))
        log.critical(message)
        try:
            publish(self.producer, "alerts", Alert(
                rule="sentinel.hook_failed", severity="critical", source=self.config.instance, message=message,
                dedup_key=f"sentinel.hook_failed|{alert.alert_id}",
                evidence={"alert_id": alert.alert_id, "rule": alert.rule,
                          "errors": {n: results[n].get("error", "") for n in failed}}))
        except Exception as e:  # noqa: BLE001 - the broker may be what fails; the log line stays
            log.critical("could not publish sentinel.hook_failed: %s", e)

    def retry_delay_s(self) -> float:
        """Wait before redelivering a record: an alert whose control hook failed or a transient
        error (exponential, capped at 30 s)."""
        return max(min(0.5 * 2 ** max(self._failures - 1, 0), 30.0), self.guard.retry_delay_s())

    def _tick(self) -> None:
        """``absent`` alerts and pending ones; a transient publish failure leaves them pending."""
        try:
            self._raise(self.engine.tick())
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("%d alert(s) pending, publish failed: %s: %s", len(self._pending), type(e).__name__, e)
        self.guard.flush()

    def run(self, *, stop: threading.Event | None = None, max_idle_s: float | None = None) -> None:
        """Process until ``stop`` is set or ``max_idle_s`` passes without records."""
        stop = stop or threading.Event()
        consumer = make_consumer(self.settings, topics=["metrics.ingest", "metrics.trainer", "evals", "alerts"],
                                 group_id=self.config.group)
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                batches = consumer.poll(timeout_ms=200)
                self._tick()
                if not batches:
                    if not consumer.assignment():  # still joining the group: not idle yet
                        idle_since = time.monotonic()
                    elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                        return
                    continue
                for tp, records in batches.items():
                    for record in records:
                        if not self.process(record):  # not done: redeliver it, offset not committed
                            consumer.seek(tp, record.offset)
                            stop.wait(self.retry_delay_s())
                            break
                        consumer.commit({TopicPartition(tp.topic, tp.partition):
                                         OffsetAndMetadata(record.offset + 1, "", -1)})
                idle_since = time.monotonic()
        finally:
            consumer.close()

    def close(self) -> None:
        self.guard.flush(force=True)
        self.history.close()
        self.producer.close()
