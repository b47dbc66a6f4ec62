"""Kafka sources: raw.* partitions as (KafkaCoords, bytes).

``python`` (default, runs anywhere): a splittable DoFn on kafka-python over *bounded*
offset ranges per partition (assign + seek + ``poll()`` loops). The ingest job runs it in
micro-batches: each batch reads the partitions the consumer group assigned to this worker
(:mod:`beam_jobs.sources.group`), each from the end of its contiguous settled range (moved past
offsets the broker does not have: :class:`AbsentOffsets`), skipping offsets settled beyond it.
(Beam 2.77's Python DirectRunner cannot checkpoint an unbounded splittable DoFn: its
residuals are lost or mis-typed; bounded ranges run correctly on every runner.)
``xlang``: Beam's cross-language ``ReadFromKafka`` (Dataflow/Flink; needs the Java
expansion service), an unbounded read resuming from the group's committed offsets, which
the job commits only up to what is settled; settled offsets are filtered the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider

from beam_jobs.records import KafkaCoords
from beam_jobs.settlement import ResumePlan

if TYPE_CHECKING:
    from streams.kafka import KafkaSettings

__all__ = ["AbsentOffsets", "KafkaSourceConfig", "PartitionRange", "ReadKafkaRanges", "ReadKafkaXlang", "RetentionGaps",
           "caught_up", "next_ranges", "topic_partitions", "xlang_consumer_config"]

log = logging.getLogger(__name__)

_CONSUMERS: dict[tuple, object] = {}


@dataclass(kw_only=True, slots=True)
class KafkaSourceConfig:
    """Which topics to read and how much per micro-batch."""

    bootstrap: str
    topics: list[str]
    group: str = "headwater-ingest"
    poll_ms: int = 200
    max_poll_records: int = 500
    max_batch_per_partition: int = 20_000
    idle_ms: int = 600  # a range ends when its partition yields nothing for this long
    headers: bool = False  # yield (coords, value, headers): signed producer headers for source binding


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets [start, end) of one partition to read in this batch; ``skipped``: offsets newly found
    deleted by retention before they were settled (counted as ``source/skipped_retention``)."""

    topic: str
    partition: int
    start: int
    end: int
    skipped: int = 0


class RetentionGaps:
    """Counts unsettled offsets below each partition's log start (deleted by retention, never read),
    each once per process: :meth:`new` returns only what was not reported before."""

    def __init__(self) -> None:
        self.reported: dict[tuple[str, int], int] = {}

    @staticmethod
    def lost(plan: ResumePlan, topic: str, partition: int, log_start: int) -> int:
        """Offsets in [0, log_start) that the stream root never settled."""
        settled = sum(max(0, min(e, log_start) - s) for s, e in plan.ranges.get((topic, partition), ()) if s < log_start)
        return max(0, log_start - settled)

    def new(self, plan: ResumePlan, topic: str, partition: int, log_start: int) -> int:
        total = self.lost(plan, topic, partition, log_start)
        before = self.reported.get((topic, partition), 0)
        self.reported[(topic, partition)] = max(before, total)
        return max(0, total - before)


class AbsentOffsets:
    """Offsets the broker does not have (compaction, transaction markers), found by asking it.

    A resume pinned at an unsettled offset with settled offsets beyond it may sit on such a gap:
    :meth:`resolve` seeks there and polls, and the first record returned is the next existing
    offset; everything before it is absent (offsets only grow, so the evidence is positive and
    final). Found spans are kept for this process and applied to every later plan; a restart
    finds each gap once more.
    """

    def __init__(self, consumer, *, timeout_ms: int = 1500):
        self.consumer, self.timeout_ms = consumer, timeout_ms
        self.spans: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def next_existing(self, tp, offset: int) -> int | None:
        """The offset of the first record at or after ``offset``; None if none arrived in time."""
        self.consumer.assign([tp])
        self.consumer.seek(tp, offset)
        deadline = time.monotonic() + self.timeout_ms / 1000
        while time.monotonic() < deadline:
            batch = self.consumer.poll(timeout_ms=200).get(tp, [])
            if batch:
                return min(r.offset for r in batch)
        return None

    def resolve(self, plan: ResumePlan, tp, earliest: int) -> int:
        """``tp``'s resume offset in ``plan``, moved past absent offsets (marked in ``plan``)."""
        key = (tp.topic, tp.partition)
        for start, end in self.spans.get(key, ()):
            plan.mark_absent(tp.topic, tp.partition, start, end)
        start = plan.start(tp.topic, tp.partition, earliest)
        while plan.settled_beyond(tp.topic, tp.partition, start):
            found = self.next_existing(tp, start)
            if found is None or found <= start:
                break
            log.info("%s[%d]: offsets [%d, %d) do not exist on the broker (compaction or transaction markers); "
                     "resuming past them", tp.topic, tp.partition, start, found)
            self.spans.setdefault(key, []).append((start, found))
            plan.mark_absent(tp.topic, tp.partition, start, found)
            start = plan.start(tp.topic, tp.partition, earliest)
        return start


def topic_partitions(config: KafkaSourceConfig, consumer) -> list:
    """Every partition of ``config.topics`` (raises if a topic has none: it does not exist)."""
    from kafka import TopicPartition

    tps = []
    for topic in config.topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"topic {topic!r} has no partitions on {config.bootstrap} (does it exist?)")
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    return tps


def next_ranges(config: KafkaSourceConfig, plan: ResumePlan, consumer, gaps: RetentionGaps | None = None, *,
                partitions: list | None = None, absent: AbsentOffsets | None = None) -> tuple[list[PartitionRange], dict]:
    """The next batch's ranges and resume offsets of ``partitions`` (default: every partition).

    Ranges are capped, not bounded by the partition's end offset: a range ends where the
    partition has no more records (end offsets are unreliable on some brokers: tansu reports
    the last batch's base offset + 1). Unread offsets stay unsettled for the next batch.
    Offsets below a partition's log start that were never settled are lost to retention: they
    are skipped, logged and (with ``gaps``) counted in the ranges' ``skipped``. With ``absent``,
    resume offsets move past offsets the broker does not have.
    """
    tps = topic_partitions(config, consumer) if partitions is None else sorted(partitions)
    begins = consumer.beginning_offsets(tps) if tps else {}
    ranges, positions = [], {}
    for tp in tps:
        if absent is not None:
            start = absent.resolve(plan, tp, begins[tp])
        else:
            start = plan.start(tp.topic, tp.partition, begins[tp])
        positions[tp] = start
        skipped = gaps.new(plan, tp.topic, tp.partition, begins[tp]) if gaps is not None else 0
        if skipped:
            log.warning("%s[%d]: %d offsets below the log start %d were deleted by retention before they were "
                        "settled; skipping them", tp.topic, tp.partition, skipped, begins[tp])
        ranges.append(PartitionRange(tp.topic, tp.partition, start, start + config.max_batch_per_partition, skipped))
    return ranges, positions


def caught_up(consumer, positions: dict, absent: AbsentOffsets | None = None) -> bool:
    """Whether every partition's resume offset reached the broker's end offset (a lower bound on
    tansu, so True here is necessary, not sufficient, for having read everything). With
    ``absent``, a partition short of its end offset is also caught up when the broker returns no
    record after its resume offset (only gaps remain, e.g. a final transaction marker)."""
    ends = consumer.end_offsets(list(positions)) if positions else {}
    return all(start >= ends.get(tp, 0) or (absent is not None and absent.next_existing(tp, start) is None)
               for tp, start in positions.items())


class _Restrictions(RestrictionProvider):
    def initial_restriction(self, element: PartitionRange):
        return OffsetRange(element.start, element.end)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return restriction.size()


class _ReadRangeFn(beam.DoFn):
    def __init__(self, config: KafkaSourceConfig, plan: ResumePlan):
        self.config, self.plan = config, plan

    def _consumer(self, tp):
        key = (self.config.bootstrap, tp.topic, tp.partition)
        if key not in _CONSUMERS:
            from streams.kafka import KafkaSettings, make_consumer

            _CONSUMERS[key] = make_consumer(
                KafkaSettings.load(bootstrap=self.config.bootstrap), assign=[tp], group_id=None,
                max_poll_records=self.config.max_poll_records,
            )
        return _CONSUMERS[key]

    def process(self, element: PartitionRange, tracker=beam.DoFn.RestrictionParam(_Restrictions())):  # noqa: B008
        import time

        from kafka import TopicPartition

        tp = TopicPartition(element.topic, element.partition)
        consumer = self._consumer(tp)
        restriction = tracker.current_restriction()
        if element.skipped and restriction.start == element.start:
            Metrics.counter("source", "skipped_retention").inc(element.skipped)
        consumer.seek(tp, restriction.start)
        last = restriction.start - 1
        idle_since = time.monotonic()
        while True:
            stop = tracker.current_restriction().stop
            if last >= stop - 1:
                return
            batch = consumer.poll(timeout_ms=self.config.poll_ms).get(tp, [])
            if not batch:
                if (time.monotonic() - idle_since) * 1000 >= self.config.idle_ms:
                    tracker.try_claim(stop - 1)  # caught up: the rest of the range stays unsettled
                    return
                continue
            idle_since = time.monotonic()
            for record in batch:
                if record.offset <= last:
                    continue
                if not tracker.try_claim(record.offset):
                    return
                if record.offset > last + 1:  # compaction, transaction markers or retention racing the read
                    Metrics.counter("source", "offset_gaps").inc(record.offset - last - 1)
                last = record.offset
                if not self.plan.is_settled(tp.topic, tp.partition, record.offset):
                    coords = KafkaCoords(tp.topic, tp.partition, record.offset)
                    if self.config.headers:
                        yield coords, record.value, tuple((k, bytes(v or b"")) for k, v in record.headers or ())
                    else:
                        yield coords, record.value


class ReadKafkaRanges(beam.PTransform):
    """Pure-Python Kafka source over bounded per-partition offset ranges (a splittable DoFn)."""

    def __init__(self, config: KafkaSourceConfig, ranges: list[PartitionRange], plan: ResumePlan):
        super().__init__()
        self.config, self.ranges, self.plan = config, ranges, plan

    def expand(self, pbegin):
        return (
            pbegin
            | "Partitions" >> beam.Create(self.ranges)
            | "Poll" >> beam.ParDo(_ReadRangeFn(self.config, self.plan))
        )


def xlang_consumer_config(config: KafkaSourceConfig, settings: KafkaSettings) -> dict[str, str]:
    """Java consumer properties for ReadFromKafka: the connection and credential of ``settings``
    (SASL/TLS, see ``KafkaSettings.java_client_config``) plus the group and offset policy."""
    return {**settings.java_client_config(), "group.id": config.group, "auto.offset.reset": "earliest",
            "enable.auto.commit": "false"}


class ReadKafkaXlang(beam.PTransform):
    """Beam's cross-language ReadFromKafka (Java expansion service), mapped to (KafkaCoords, bytes)."""

    def __init__(self, config: KafkaSourceConfig, plan: ResumePlan):
        super().__init__()
        self.config, self.plan = config, plan

    def expand(self, pbegin):
        from apache_beam.io.kafka import ReadFromKafka

        from streams.kafka import KafkaSettings

        plan = self.plan
        # built at launch, where HEADWATER_KAFKA_* and the mounted secret files are: workers get the properties
        settings = KafkaSettings.load(bootstrap=self.config.bootstrap, client_id="headwater-ingest")
        consumer_config = xlang_consumer_config(self.config, settings)
        return (
            pbegin
            | "ReadFromKafka" >> ReadFromKafka(consumer_config=consumer_config, topics=self.config.topics, with_metadata=True)
            | "ToCoords" >> beam.Map(lambda r: (KafkaCoords(r.topic, r.partition, r.offset), r.value))
            | "SkipSettled" >> beam.Filter(lambda e: not plan.is_settled(*e[0]))
        )
