"""A real Kafka producer with broker hiccups injected on chosen sends (the fault suite's transient errors)."""

from __future__ import annotations

from typing import Any

from kafka.errors import KafkaTimeoutError

__all__ = ["FlakyProducer"]


class FlakyProducer:
    """Wraps a real producer; the n-th ``send`` (1-based) in ``lost`` raises ``KafkaTimeoutError``
    without reaching the broker, one in ``unacked`` raises it after the record was delivered (the
    ack was lost). Every other call goes to the real producer."""

    def __init__(self, producer: Any, *, lost: set[int] = frozenset(), unacked: set[int] = frozenset()):
        self.producer, self.lost, self.unacked = producer, set(lost), set(unacked)
        self.sends = 0

    def send(self, *args: Any, **kwargs: Any) -> Any:
        self.sends += 1
        if self.sends in self.lost:
            raise KafkaTimeoutError(f"injected: send {self.sends} not acknowledged in time")
        future = self.producer.send(*args, **kwargs)
        if self.sends in self.unacked:
            self.producer.flush()
            raise KafkaTimeoutError(f"injected: send {self.sends} delivered, but its ack was lost")
        return future

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)
