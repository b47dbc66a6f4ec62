"""Streaming source: raw.* Kafka partitions as (KafkaCoords, bytes).

``python`` (default, runs anywhere): a splittable DoFn per partition on kafka-python
(assign + seek + ``poll()`` loops, wall-time watermark), started at the end of each
partition's contiguous settled range and skipping offsets settled beyond it.
``xlang``: Beam's cross-language ``ReadFromKafka`` (Dataflow/Flink; needs the Java
expansion service), resuming from the group's committed offsets, which the ingest
job commits only up to what is settled; settled offsets are filtered the same way.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import WalltimeWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from beam_jobs.records import KafkaCoords
from beam_jobs.settlement import ResumePlan

__all__ = ["KafkaSourceConfig", "PartitionStart", "ReadKafkaPartitions", "ReadKafkaXlang", "partition_starts"]

_END = sys.maxsize
_CONSUMERS: dict[tuple, object] = {}


@dataclass(kw_only=True, slots=True)
class KafkaSourceConfig:
    """How the source reads and when it stops."""

    bootstrap: str
    topics: list[str]
    group: str = "headwater-ingest"
    poll_ms: int = 200
    max_poll_records: int = 500
    read_budget_s: float = 1.0  # per process() call before checkpointing
    stop_file: str | None = None  # its existence stops the source (graceful drain)
    deadline: float | None = None  # wall-clock time.time() at which to stop


@dataclass(frozen=True, slots=True)
class PartitionStart:
    """One partition and the offset to start reading at."""

    topic: str
    partition: int
    start: int


def partition_starts(config: KafkaSourceConfig, plan: ResumePlan) -> list[PartitionStart]:
    """Every partition of the configured topics with its resume offset."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka import KafkaSettings

    consumer = KafkaConsumer(**KafkaSettings.load(bootstrap=config.bootstrap).client_kwargs(), enable_auto_commit=False)
    try:
        tps = []
        for topic in config.topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise ValueError(f"topic {topic!r} has no partitions on {config.bootstrap} (does it exist?)")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        earliest = consumer.beginning_offsets(tps)
        return [PartitionStart(tp.topic, tp.partition, plan.start(tp.topic, tp.partition, earliest[tp])) for tp in tps]
    finally:
        consumer.close()


class _Restrictions(RestrictionProvider):
    def initial_restriction(self, element: PartitionStart):
        return OffsetRange(element.start, _END)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return 1  # unbounded: size is not meaningful

    def split(self, element, restriction):
        yield restriction  # one reader per partition keeps offsets in order


class _ReadPartitionFn(beam.DoFn):
    def __init__(self, config: KafkaSourceConfig, plan: ResumePlan):
        self.config, self.plan = config, plan

    def _consumer(self, tp):
        key = (self.config.bootstrap, tp.topic, tp.partition, os.getpid())
        if key not in _CONSUMERS:
            from streams.kafka import KafkaSettings, make_consumer

            _CONSUMERS[key] = make_consumer(
                KafkaSettings.load(bootstrap=self.config.bootstrap),
                assign=[tp],
                group_id=None,
                max_poll_records=self.config.max_poll_records,
            )
        return _CONSUMERS[key]

    def _should_stop(self) -> bool:
        c = self.config
        return (c.deadline is not None and time.time() >= c.deadline) or (
            c.stop_file is not None and os.path.exists(c.stop_file)
        )

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: PartitionStart,
        tracker=beam.DoFn.RestrictionParam(_Restrictions()),
        _wm=beam.DoFn.WatermarkEstimatorParam(WalltimeWatermarkEstimator.default_provider()),
    ):
        from kafka import TopicPartition

        if self._should_stop():
            tracker.try_claim(_END - 1)  # finish this restriction: the source drains and ends
            return
        tp = TopicPartition(element.topic, element.partition)
        consumer = self._consumer(tp)
        position = tracker.current_restriction().start
        if consumer.position(tp) != position:
            consumer.seek(tp, position)
        budget_end = time.monotonic() + self.config.read_budget_s
        while time.monotonic() < budget_end:
            batch = consumer.poll(timeout_ms=self.config.poll_ms).get(tp, [])
            if not batch:
                break
            for record in batch:
                if not tracker.try_claim(record.offset):
                    return
                if not self.plan.is_settled(tp.topic, tp.partition, record.offset):
                    coords = KafkaCoords(tp.topic, tp.partition, record.offset)
                    yield beam.window.TimestampedValue((coords, record.value), Timestamp.now())
        tracker.defer_remainder(Duration(seconds=0.05))


class ReadKafkaPartitions(beam.PTransform):
    """Pure-Python Kafka source: one splittable-DoFn reader per partition."""

    def __init__(self, config: KafkaSourceConfig, starts: list[PartitionStart], plan: ResumePlan):
        super().__init__()
        self.config, self.starts, self.plan = config, starts, plan

    def expand(self, pbegin):
        return (
            pbegin
            | "Partitions" >> beam.Create(self.starts)
            | "Poll" >> beam.ParDo(_ReadPartitionFn(self.config, self.plan))
        )


class ReadKafkaXlang(beam.PTransform):
    """Beam's cross-language ReadFromKafka (Java expansion service), mapped to (KafkaCoords, bytes)."""

    def __init__(self, config: KafkaSourceConfig, plan: ResumePlan):
        super().__init__()
        self.config, self.plan = config, plan

    def expand(self, pbegin):
        from apache_beam.io.kafka import ReadFromKafka

        plan = self.plan
        consumer_config = {
            "bootstrap.servers": self.config.bootstrap,
            "group.id": self.config.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
        return (
            pbegin
            | "ReadFromKafka" >> ReadFromKafka(consumer_config=consumer_config, topics=self.config.topics, with_metadata=True)
            | "ToCoords" >> beam.Map(lambda r: (KafkaCoords(r.topic, r.partition, r.offset), r.value))
            | "SkipSettled" >> beam.Filter(lambda e: not plan.is_settled(*e[0]))
        )
