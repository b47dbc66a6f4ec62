"""Where the trainer's events go: Kafka topics (when a bootstrap is given) and RUN/*.jsonl files."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from streams.events import Alert, CheckpointSaved, Event, MetricsEvent

__all__ = ["EventSink"]

log = logging.getLogger(__name__)


class EventSink:
    """Rank-0 publisher of CheckpointSaved, Alert and MetricsEvent (acks=all, idempotent producer)."""

    def __init__(self, run_dir: str, *, bootstrap: str = ""):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.producer = None
        if bootstrap:
            from streams.kafka import KafkaSettings, make_producer

            settings = KafkaSettings.load(bootstrap=bootstrap, client_id="headwater-trainer")  # + HEADWATER_KAFKA_*
            self.producer = make_producer(settings)

    def _send(self, topic: str, event: Event, *, flush: bool) -> None:
        if self.producer is None:
            return
        from streams.kafka import publish

        publish(self.producer, topic, event, flush=flush)

    def checkpoint(self, event: CheckpointSaved) -> None:
        self._append("checkpoints.jsonl", event.to_dict())
        self._send("checkpoints", event, flush=True)

    def alert(self, rule: str, message: str, *, severity: str = "warning", evidence: dict[str, Any] | None = None) -> Alert:
        event = Alert(rule=rule, severity=severity, message=message, source="trainer",
                      dedup_key=f"trainer:{rule}", evidence=evidence or {})
        log.warning("[alert] %s: %s", rule, message)
        self._append("alerts.jsonl", event.to_dict())
        self._send("alerts", event, flush=True)
        return event

    def metrics(self, step: int, values: dict[str, float], *, labels: dict[str, str] | None = None) -> None:
        event = MetricsEvent(component="trainer", values=values, step=step, labels=labels or {})
        self._send("metrics.trainer", event, flush=False)

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        with open(os.path.join(self.run_dir, name), "a") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush()
            self.producer.close()
            self.producer = None
