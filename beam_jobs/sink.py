"""Sink: settle every offset exactly once by writing sealed MDS shards that carry their offset ranges.

Outcomes are grouped per key and pane: per (topic, partition, offset block) in bounded mode, per
(topic, partition) in streaming mode. For each group, in this order: dead letters are written (DLQ
folder file named by the group's whole offset range, or the ``dlq`` topic), then the drop log,
then one shard per domain whose settled ranges are exactly its samples' offsets, then one
"settled only" entry for the remaining (filtered, deduplicated, dead-lettered) offsets. A crash
between steps leaves only unsettled offsets, which a replay writes; offsets the root has settled
are left out, so no sample is written twice.

A real runner delivers panes the local loop never does, and each is safe here:
an *empty* pane writes nothing; a *late* pane is an ordinary one (the sink's window is global and
it settles by offset, not event time); *duplicate* outcomes of one offset are kept once, the same
copy whatever their order (one with a sample first); and a *replay* (a retried sink bundle, a
Flink restore with other pane boundaries) leaves out the offsets already settled.

Streaming mode commits each (topic, partition) under its own deterministic writer id
(:func:`partition_writer_id`). On an object-store root a process that starts writing a partition
claims that id, which fences any older (zombie) process still holding it: the zombie's next commit
raises ``WriterFenced``, its cached writer is evicted and the bundle fails, so the runner's retry
re-claims and writes only what is still unsettled. Streaming mode also caches each partition's
settled ranges in the process (read once, then grown from this process's own commits), since
this process is the only committer of that writer id while it owns it; ``OverlapError`` or
``WriterFenced`` drops the cache and the retry reads the root again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.settlement import ResumePlan
from beam_jobs.validate import SAFE_NAME
from streams import faultpoints, storage
from streams.events import DeadLetter, OffsetRange, TokenizedSample

__all__ = ["SETTLE_DOMAIN", "DeadLetterLost", "SealShardsFn", "SinkConfig", "Unsettled", "WriteShards",
           "offsets_to_ranges", "partition_writer_id", "send_checked", "unsettled"]

log = logging.getLogger(__name__)

SETTLE_DOMAIN = "settled"
_WRITERS: dict[tuple, object] = {}  # (root, writer id, shards topic, bootstrap) -> writer
_SETTLED: dict[tuple, list[OffsetRange]] = {}  # (writer key, topic, partition) -> settled ranges
_CACHE_LOCK = threading.Lock()  # DoFn threads share both caches (two claims would fence each other)
_PRODUCERS: dict[str, object] = {}


@dataclass(kw_only=True, slots=True)
class SinkConfig:
    """Where and how outcomes are written."""

    stream_root: str
    writer_id: str = "ingest-text"  # streaming: the base of the per-partition writer ids
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


def partition_writer_id(base: str, topic: str, partition: int) -> str:
    """The writer id of ``(topic, partition)`` in streaming mode: deterministic, so every group of
    a partition is committed under one id, whose ownership claim fences a zombie process."""
    digest = hashlib.sha256(f"{base}\0{topic}\0{partition}".encode()).hexdigest()[:8]
    wid = f"{base}-{_safe(topic)[-24:]}-{partition}-{digest}"
    return wid if len(wid) <= 64 else f"{base[:55]}-{digest}"


def _rank(o: Outcome) -> int:
    """Which copy of one offset wins: a sample, then a dead letter, then a drop (never lose a sample)."""
    return 0 if o.sample is not None else 1 if o.dead is not None else 2 if o.dropped is not None else 3


class Unsettled(NamedTuple):
    """What :func:`unsettled` leaves to write, and what it left out."""

    todo: list[Outcome]  # one outcome per unsettled (topic, partition, offset), in offset order
    duplicates: int  # extra copies of an offset left out
    replayed: int  # outcomes of offsets already settled
    conflicts: int  # extra copies of another kind than the kept one (e.g. a drop next to a sample)


def unsettled(outcomes: Iterable[Outcome], plan: ResumePlan) -> Unsettled:
    """The outcomes still to settle, one per (topic, partition, offset) in offset order. Copies of
    one offset are resolved whatever their order: the lowest :func:`_rank` wins (a sample over a
    dead letter over a drop), then the smallest ``repr`` (e.g. two samples that differ only in
    ``produced_at``, the usual case of a retried bundle)."""
    kept: dict[KafkaCoords, Outcome] = {}
    seen = replayed = conflicts = 0
    for o in outcomes:
        seen += 1
        if plan.is_settled(o.coords.topic, o.coords.partition, o.coords.offset):
            replayed += 1
            continue
        if (k := kept.get(o.coords)) is None:
            kept[o.coords] = o
            continue
        conflicts += _rank(o) != _rank(k)
        if (_rank(o), repr(o)) < (_rank(k), repr(k)):
            kept[o.coords] = o
    return Unsettled([kept[k] for k in sorted(kept)], seen - replayed - len(kept), replayed, conflicts)


def _drop_cached(key: tuple, writer: object | None = None) -> None:
    """Forget the settled ranges cached for the writer ``key`` and, given ``writer`` (fenced), that
    writer too, unless another thread has already replaced it."""
    with _CACHE_LOCK:
        for k in [k for k in _SETTLED if k[0] == key]:
            del _SETTLED[k]
        if writer is not None and _WRITERS.get(key) is writer:
            del _WRITERS[key]


class SealShardsFn(beam.DoFn):
    """Settles one group ``((topic, partition[, block]), outcomes)`` and yields its ShardPublished
    events (see the module docstring); ``streaming`` selects the per-partition writer ids and the
    in-process settled-range cache."""

    def __init__(self, config: SinkConfig, manifest: dict, *, streaming: bool = False):
        self.config, self.manifest, self.streaming = config, manifest, streaming
        self.n_samples = Metrics.counter("sink", "samples")
        self.n_shards = Metrics.counter("sink", "shards")
        self.n_settled = Metrics.counter("sink", "settled")
        self.n_dlq = Metrics.counter("sink", "dead_letters")
        self.n_empty = Metrics.counter("sink", "empty_panes")
        self.n_duplicates = Metrics.counter("sink", "duplicate_outcomes")  # same offset twice in a group
        self.n_conflicts = Metrics.counter("sink", "conflicting_duplicates")  # ...with other outcomes
        self.n_fenced = Metrics.counter("sink", "writer_fenced")  # a newer process owns the writer id
        self.n_replayed = Metrics.counter("sink", "replayed_settled")  # offsets the root had settled

    def _producer(self):
        c = self.config
        if c.bootstrap not in _PRODUCERS:
            from streams.kafka import KafkaSettings, make_producer

            _PRODUCERS[c.bootstrap] = make_producer(KafkaSettings.load(bootstrap=c.bootstrap))
        return _PRODUCERS[c.bootstrap]

    def _writer(self, writer_id: str) -> tuple[tuple, object]:
        """The process's cached writer of ``writer_id`` (built, and on an object store claimed, at
        first use) and its cache key."""
        c = self.config
        key = (c.stream_root, writer_id, c.shards_topic, c.bootstrap)
        with _CACHE_LOCK:
            if key in _WRITERS:
                return key, _WRITERS[key]
            from streams.mds import LiveStreamWriter
            from streams.vocab import Vocab

            publisher = None
            if c.shards_topic and c.bootstrap:
                from streams.kafka import publish

                def publisher(event, topic=c.shards_topic):
                    publish(self._producer(), topic, event, key=event.domain)

                if "://" not in c.stream_root:  # through the outbox: re-sent until acknowledged
                    from beam_jobs.outbox import Outbox

                    publisher = Outbox(c.stream_root, writer_id, publisher).publish

            _WRITERS[key] = LiveStreamWriter(
                c.stream_root, writer_id=writer_id, manifest=self.manifest,
                compression=c.compression, publisher=publisher, vocab_size=Vocab.default().size,
            )
            return key, _WRITERS[key]

    def _plan(self, key: tuple, writer, topic: str, partition: int) -> ResumePlan:
        """The settled ranges of ``(topic, partition)``: in streaming mode from the process cache
        (one root read per partition and writer; grown by :meth:`_settled`), else read per group."""
        if not self.streaming:
            return ResumePlan.from_ranges(writer.settled())
        with _CACHE_LOCK:
            ranges = _SETTLED.get((key, topic, partition))
        if ranges is None:
            ranges = [r for r in writer.settled() if (r.topic, r.partition) == (topic, partition)]
            with _CACHE_LOCK:
                _SETTLED[(key, topic, partition)] = ranges
        return ResumePlan.from_ranges(ranges)

    def _settled(self, key: tuple, topic: str, partition: int, event) -> None:
        """Add what ``event`` settled to the cached ranges of ``(topic, partition)``."""
        if self.streaming:
            from streams.manifest import merge_ranges

            with _CACHE_LOCK:
                cached = _SETTLED.get((key, topic, partition))
                if cached is not None:
                    _SETTLED[(key, topic, partition)] = merge_ranges(
                        [*cached, *(r for r in event.settled if (r.topic, r.partition) == (topic, partition))])

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
        faultpoints.reach("sink.after_dlq")

    def process(self, element):
        from streams.mds import OverlapError

        (topic, partition, *_), outcomes = element
        outcomes = list(outcomes)
        if not outcomes:  # an empty pane: a processing-time trigger fired with nothing new
            self.n_empty.inc()
            log.debug("%s[%d]: empty pane", topic, partition)
            self._fold_if_due()
            return
        c = self.config
        key, writer = self._writer(partition_writer_id(c.writer_id, topic, partition) if self.streaming
                                   else c.writer_id)
        try:
            yield from self._seal(key, writer, topic, partition, outcomes)
        except storage.WriterFenced:
            # A newer process claimed this writer id: this one is a zombie. Nothing of this attempt
            # was committed; drop the fenced writer so that the runner's retry re-claims the id.
            self.n_fenced.inc()
            _drop_cached(key, writer)
            raise
        except OverlapError:  # the cached settled ranges were stale: the retry reads the root
            _drop_cached(key)
            raise

    def _fold_if_due(self) -> None:
        """A quiet stream: fold a local root's journal into index.json when the policy says so."""
        from streams.manifest import fold_root

        try:
            fold_root(self.config.stream_root)
        except (OSError, ValueError, storage.PreconditionFailed) as e:  # e.g. disk full: the journal stays the truth; a later call folds
            log.warning("fold of %s failed: %s", self.config.stream_root, e)

    def _seal(self, key: tuple, writer, topic: str, partition: int, outcomes: list[Outcome]):
        from streams.mds import sample_from_event

        # Offsets another writer settles between this read and the write below make the writer
        # raise OverlapError: the runner retries the bundle, which reads again and writes the rest.
        todo = unsettled(outcomes, self._plan(key, writer, topic, partition))
        ordered = todo.todo
        self.n_duplicates.inc(todo.duplicates)
        self.n_conflicts.inc(todo.conflicts)
        self.n_replayed.inc(todo.replayed)
        if todo.duplicates or todo.replayed:
            log.debug("%s[%d]: left out %d duplicate and %d settled outcomes", topic, partition, todo.duplicates,
                      todo.replayed)
        if todo.conflicts:
            log.warning("%s[%d]: %d copies of an offset disagreed; kept one per offset (a sample first)",
                        topic, partition, todo.conflicts)
        if not ordered:  # a replay of offsets settled already: nothing to write
            return
        # Named by the group's whole range (settled offsets included), so a retry of the same pane
        # overwrites its files instead of adding copies.
        offsets = [o.coords.offset for o in outcomes]
        tag = f"{_safe(topic)}-{partition}-{min(offsets)}-{max(offsets)}"
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
            self._settled(key, topic, partition, event)
            self.n_samples.inc(len(group))
            self.n_shards.inc()
            yield event
        rest = [o.coords.offset for o in ordered if o.sample is None]
        if rest:
            event = writer.write_shard([], domain=SETTLE_DOMAIN, settled=offsets_to_ranges(topic, partition, rest))
            self._settled(key, topic, partition, event)
            yield event
        self.n_settled.inc(len(ordered))


def _key(outcome: Outcome, block: int | None):
    """Bounded: per (topic, partition, offset block). Streaming (``block`` None): per (topic,
    partition), so per-key window and trigger state does not grow with every block of offsets."""
    c: KafkaCoords = outcome.coords
    return ((c.topic, c.partition) if block is None else (c.topic, c.partition, c.offset // block)), outcome


class WriteShards(beam.PTransform):
    """Outcome -> ShardPublished: windowed, per-partition batches sealed into MDS shards."""

    def __init__(self, config: SinkConfig, manifest: dict, *, streaming: bool):
        super().__init__()
        self.config, self.manifest, self.streaming = config, manifest, streaming

    def expand(self, outcomes):
        if self.streaming:
            # Processing-time panes per key (the wall-time watermark of the Python source does not
            # advance event-time windows on the DirectRunner); the sink settles by offset, so panes
            # of any size are correct, late data included. The watermark trigger flushes what is
            # buffered when the input ends (a drain): without it the DirectRunner never fires the
            # last elements held by a pending processing-time trigger.
            early = trigger.Repeatedly(trigger.AfterAny(trigger.AfterCount(self.config.max_pane),
                                                        trigger.AfterProcessingTime(self.config.window_s)))
            outcomes = outcomes | "Window" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.AfterWatermark(early=early),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
        return (
            outcomes
            | "KeyByPartition" >> beam.Map(_key, None if self.streaming else self.config.block)
            | "GroupBatch" >> beam.GroupByKey()
            | "SealShards" >> beam.ParDo(SealShardsFn(self.config, self.manifest, streaming=self.streaming))
        )
