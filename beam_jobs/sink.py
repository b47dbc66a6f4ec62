"""Sink: settle every offset exactly once by writing sealed MDS shards that carry their offset ranges.

Outcomes are grouped per (topic, partition, offset block) and window. For each group,
in this order: dead letters are written (DLQ folder file named by the group's range, or
the ``dlq`` topic), then the drop log, then one shard per domain whose settled ranges
are exactly its samples' offsets, then one "settled only" entry for the remaining
(filtered, deduplicated, dead-lettered) offsets. A crash between steps leaves only
unsettled offsets, which a restart replays; nothing settled is ever replayed (the
source skips settled offsets), so no sample is written twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.validate import SAFE_NAME
from streams.events import DeadLetter, OffsetRange, TokenizedSample

__all__ = ["SETTLE_DOMAIN", "DeadLetterLost", "SinkConfig", "WriteShards", "offsets_to_ranges", "send_checked"]

log = logging.getLogger(__name__)

SETTLE_DOMAIN = "settled"
_WRITERS: dict[tuple, object] = {}
_PRODUCERS: dict[str, object] = {}


@dataclass(kw_only=True, slots=True)
class SinkConfig:
    """Where and how outcomes are written."""

    stream_root: str
    writer_id: str = "ingest-text"
    dlq_dir: str | None = None
    dlq_topic: str | None = None  # with bootstrap: dead letters to Kafka
    shards_topic: str | None = None  # with bootstrap: ShardPublished events to Kafka
    bootstrap: str | None = None
    drops_dir: str | None = None  # lineage of dropped records (reason, dup_of)
    window_s: int = 2  # streaming: a pane fires this long after its first element...
    max_pane: int = 5_000  # ...or at this many elements
    block: int = 100_000  # offsets per group in bounded mode (one shard per domain per block)
    compression: str | None = "zstd"
    dlq_attempts: int = 5  # DLQ sends are retried this often (exponential backoff) before the job stops
    dlq_backoff_s: float = 0.5


def offsets_to_ranges(topic: str, partition: int, offsets: Iterable[int]) -> list[OffsetRange]:
    """Contiguous half-open ranges covering ``offsets``."""
    out: list[OffsetRange] = []
    for off in sorted(set(offsets)):
        if out and out[-1].end == off:
            out[-1].end = off + 1
        else:
            out.append(OffsetRange(topic=topic, partition=partition, start=off, end=off + 1))
    return out


class DeadLetterLost(RuntimeError):
    """Dead letters could not be delivered: the job must stop before their offsets settle."""


def send_checked(producer, topic: str, messages: list[tuple[bytes, bytes | None]], *, attempts: int = 5,
                 backoff_s: float = 0.5, timeout_s: float = 30.0) -> None:
    """Send ``(value, key)`` messages and wait for every acknowledgement; retry the failed ones with
    exponential backoff; raise :class:`DeadLetterLost` when some still fail after ``attempts``."""
    pending = list(messages)
    error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        futures = []
        for value, key in pending:
            try:
                futures.append(((value, key), producer.send(topic, value=value, key=key)))
            except Exception as e:  # noqa: BLE001 - e.g. MessageSizeTooLargeError, buffer full: retried
                futures.append(((value, key), e))
        try:
            producer.flush(timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - a flush timeout leaves futures undone: retried below
            error = e
        failed = []
        for message, future in futures:
            if isinstance(future, Exception):
                failed.append(message)
                error = future
                continue
            try:
                future.get(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - any delivery failure is retried
                failed.append(message)
                error = e
        if not failed:
            return
        Metrics.counter("sink", "dlq_send_retries").inc(len(failed))
        log.warning("%d of %d dead letters to %r not acknowledged (attempt %d/%d): %s",
                    len(failed), len(messages), topic, attempt + 1, attempts, error)
        pending = failed
    raise DeadLetterLost(f"{len(pending)} dead letters could not be sent to {topic!r} after {attempts} attempts: "
                         f"{type(error).__name__}: {error}")


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: no half-written temp file left taking space
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unwritable(row: dict, vocab_size: int | None) -> str | None:
    """Why the stream writer would reject ``row`` (None: it is writable): the safety net that keeps
    one bad sample from failing its whole group."""
    for col in ("id", "domain", "modality", "source", "license", "pipeline_version", "language"):
        value = row.get(col, "")
        if not isinstance(value, str):
            return f"{col}: expected str, got {type(value).__name__}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{col}: lone surrogate at {e.start}"
    if not SAFE_NAME.match(row.get("domain", "")):
        return f"domain {row.get('domain', '')[:80]!r} is not a safe shard name"
    tokens = np.asarray(row.get("tokens", ()))
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        return f"tokens: expected a 1-d integer array, got {tokens.dtype} with shape {tokens.shape}"
    if tokens.size and (tokens.min() < 0 or (vocab_size is not None and tokens.max() >= vocab_size)):
        return f"tokens: id outside [0, {vocab_size})"
    lineage = row.get("lineage", {})
    try:
        json.dumps(json.loads(lineage) if isinstance(lineage, str) else lineage).encode("utf-8")
    except (TypeError, ValueError) as e:
        return f"lineage: {type(e).__name__}: {e}"
    return None


def _describe(row: dict) -> bytes:
    """What is left of a tokenized sample for its dead letter: its string columns (tokens omitted)."""
    return json.dumps({k: v for k, v in row.items() if isinstance(v, str)}, default=str).encode()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[-80:]


class _WriteBatchFn(beam.DoFn):
    def __init__(self, config: SinkConfig, manifest: dict):
        self.config, self.manifest = config, manifest
        self.n_samples = Metrics.counter("sink", "samples")
        self.n_shards = Metrics.counter("sink", "shards")
        self.n_settled = Metrics.counter("sink", "settled")
        self.n_dlq = Metrics.counter("sink", "dead_letters")

    def _producer(self):
        c = self.config
        if c.bootstrap not in _PRODUCERS:
            from streams.kafka import KafkaSettings, make_producer

            _PRODUCERS[c.bootstrap] = make_producer(KafkaSettings.load(bootstrap=c.bootstrap))
        return _PRODUCERS[c.bootstrap]

    def _writer(self):
        c = self.config
        key = (c.stream_root, c.writer_id, c.shards_topic, c.bootstrap)
        if key not in _WRITERS:
            from streams.mds import LiveStreamWriter
            from streams.vocab import Vocab

            publisher = None
            if c.shards_topic and c.bootstrap:
                from streams.kafka import publish

                def publisher(event, topic=c.shards_topic):
                    publish(self._producer(), topic, event, key=event.domain)

            _WRITERS[key] = LiveStreamWriter(
                c.stream_root, writer_id=c.writer_id, manifest=self.manifest,
                compression=c.compression, publisher=publisher, vocab_size=Vocab.default().size,
            )
        return _WRITERS[key]

    def _write_dead(self, topic: str, partition: int, dead: list[DeadLetter], tag: str) -> None:
        """Write the group's dead letters; raises :class:`DeadLetterLost` if any could not be delivered,
        before the group's offsets are settled (so a restart replays them)."""
        c = self.config
        if c.dlq_dir:
            body = "".join(d.to_json() + "\n" for d in dead).encode()
            _atomic_write(os.path.join(c.dlq_dir, f"{tag}.jsonl"), body)
        if c.dlq_topic and c.bootstrap:
            messages = [(d.to_bytes(), f"{topic}:{partition}:{d.offset}".encode()) for d in dead]
            send_checked(self._producer(), c.dlq_topic, messages, attempts=c.dlq_attempts, backoff_s=c.dlq_backoff_s)

    def process(self, element):
        from streams.mds import sample_from_event

        (topic, partition, _block), outcomes = element
        by_offset: dict[int, Outcome] = {}
        for o in outcomes:
            by_offset.setdefault(o.coords.offset, o)
        ordered = [by_offset[k] for k in sorted(by_offset)]
        tag = f"{_safe(topic)}-{partition}-{ordered[0].coords.offset}-{ordered[-1].coords.offset}"
        writer = self._writer()
        rows: dict[int, dict] = {}
        for i, o in enumerate(ordered):
            if o.sample is None:
                continue
            try:
                row = sample_from_event(o.sample) if isinstance(o.sample, TokenizedSample) else dict(o.sample)
                problem = unwritable(row, writer.vocab_size)
            except Exception as e:  # noqa: BLE001 - a sample the writer would choke on is this record's problem
                row, problem = {}, f"{type(e).__name__}: {e}"
            if problem is None:
                rows[o.coords.offset] = row
                continue
            Metrics.counter("sink", "dlq_unwritable_sample").inc()
            ordered[i] = o._replace(sample=None, dead=DeadLetter.of(
                _describe(row), reason="unwritable_sample", stage="sink", detail=problem, record_id=o.record_id
                or str(row.get("id", "")), topic=topic, partition=partition, offset=o.coords.offset))
        dead = [o.dead for o in ordered if o.dead is not None]
        if dead:
            self._write_dead(topic, partition, dead, tag)
            self.n_dlq.inc(len(dead))
        drops = [o for o in ordered if o.dropped is not None]
        if drops and self.config.drops_dir:
            body = "".join(
                json.dumps({"id": o.record_id, "coords": list(o.coords), "reason": o.dropped, "dup_of": o.dup_of,
                            "source": o.source}) + "\n"
                for o in drops
            ).encode()
            _atomic_write(os.path.join(self.config.drops_dir, f"{tag}.jsonl"), body)
        by_domain: dict[str, list[Outcome]] = defaultdict(list)
        for o in ordered:
            if o.sample is not None:
                by_domain[rows[o.coords.offset]["domain"]].append(o)
        for domain in sorted(by_domain):
            group = by_domain[domain]
            event = writer.write_shard(
                [rows[o.coords.offset] for o in group],
                domain=domain,
                settled=offsets_to_ranges(topic, partition, (o.coords.offset for o in group)),
            )
            self.n_samples.inc(len(group))
            self.n_shards.inc()
            yield event
        rest = [o.coords.offset for o in ordered if o.sample is None]
        if rest:
            yield writer.write_shard([], domain=SETTLE_DOMAIN, settled=offsets_to_ranges(topic, partition, rest))
        self.n_settled.inc(len(ordered))


def _key(outcome: Outcome, block: int):
    c: KafkaCoords = outcome.coords
    return (c.topic, c.partition, c.offset // block), outcome


class WriteShards(beam.PTransform):
    """Outcome -> ShardPublished: windowed, per-partition batches sealed into MDS shards."""

    def __init__(self, config: SinkConfig, manifest: dict, *, streaming: bool):
        super().__init__()
        self.config, self.manifest, self.streaming = config, manifest, streaming

    def expand(self, outcomes):
        if self.streaming:
            # Processing-time panes per key (the wall-time watermark of the Python source does not
            # advance event-time windows on the DirectRunner); the sink settles by offset, so panes
            # of any size are correct.
            outcomes = outcomes | "Window" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(
                    trigger.AfterAny(trigger.AfterCount(self.config.max_pane), trigger.AfterProcessingTime(self.config.window_s))
                ),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
        return (
            outcomes
            | "KeyByPartition" >> beam.Map(_key, self.config.block)
            | "GroupBatch" >> beam.GroupByKey()
            | "SealShards" >> beam.ParDo(_WriteBatchFn(self.config, self.manifest))
        )
