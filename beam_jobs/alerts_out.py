"""Alerts raised by the ingest job itself (disk full, broker outages) to the ``alerts`` topic."""

from __future__ import annotations

from streams.events import Alert

__all__ = ["publish_alert"]


def publish_alert(bootstrap: str, alert: Alert) -> None:
    """Publish one Alert and wait for the broker's acknowledgement (short timeouts: callers log
    the alert first and treat a failure here as a lost notification, not a job failure)."""
    from streams.kafka import KafkaSettings, make_producer, publish

    producer = make_producer(KafkaSettings.load(bootstrap=bootstrap), max_block_ms=10_000)
    try:
        publish(producer, "alerts", alert, key=alert.dedup_key)
    finally:
        producer.close(timeout=5)
