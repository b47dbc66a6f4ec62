"""The ``evals`` topic as the evaluators' ledger: which (checkpoint, suite) pairs are done.

Evaluators read it from the beginning at start and catch up again right before publishing,
so a checkpoint already reported (by this or another instance, before or after a restart)
is never evaluated or published twice; the first report on the topic wins.
Checkpoints are identified by path and save time (evaluators/identity.py).
"""

from __future__ import annotations

from kafka import TopicPartition

from evaluators.identity import CheckpointKey, report_key
from streams.events import EvalReport, Event
from streams.guard import ConsumerGuard
from streams.kafka import KafkaSettings, make_consumer

__all__ = ["EvalLedger", "TopicFollower"]


class TopicFollower:
    """Reads topics from the beginning with assigned partitions; :meth:`catch_up` reads to the current end."""

    def __init__(self, settings: KafkaSettings, topics: list[str]):
        probe = make_consumer(settings, assign=[TopicPartition(topics[0], 0)])
        parts = [TopicPartition(t, p) for t in topics for p in sorted(probe.partitions_for_topic(t) or {0})]
        probe.close()
        self.consumer = make_consumer(settings, assign=parts)
        self.consumer.seek_to_beginning(*parts)
        self.parts = parts

    def catch_up(self, *, timeout_ms: int = 200) -> list:
        """Records from the current position to the end offsets as of now."""
        ends = self.consumer.end_offsets(self.parts)
        out = []
        while any(self.consumer.position(tp) < end for tp, end in ends.items()):
            for batch in self.consumer.poll(timeout_ms=timeout_ms).values():
                out.extend(batch)
        return out

    def close(self) -> None:
        self.consumer.close()


class EvalLedger:
    """Reports seen on ``evals`` and the (checkpoint key, suite) pairs they settle.

    Undecodable records go to ``guard`` (dead-lettered with an alert) and are skipped.
    """

    def __init__(self, settings: KafkaSettings, guard: ConsumerGuard, topic: str = "evals"):
        self.follower = TopicFollower(settings, [topic])
        self.guard = guard
        self.reports: list[EvalReport] = []
        self.done: set[tuple[CheckpointKey, str]] = set()

    def refresh(self) -> None:
        for record in self.follower.catch_up():
            self.guard.handle(record, self._observe)

    def _observe(self, event: Event) -> None:
        if isinstance(event, EvalReport):
            self.add(event)

    def add(self, report: EvalReport) -> None:
        key = (report_key(report), report.suite)
        if key not in self.done:
            self.done.add(key)
            self.reports.append(report)

    def close(self) -> None:
        self.follower.close()
