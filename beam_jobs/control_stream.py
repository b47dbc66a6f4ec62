"""Source control inside the streaming graph: the ``control`` topic is a stream of the job.

The local micro-batch loop applies ``quarantine_source`` / ``pause_source`` / ``resume_source``
between batches (:mod:`beam_jobs.control`). An unbounded graph (Dataflow, Flink) has no "between",
so there the controls flow through the graph itself and meet the records in keyed state:

- :class:`ReadControlsXlang` reads the ``control`` topic with Beam's cross-language
  ``ReadFromKafka`` (the same SASL/TLS consumer properties as the data topics, never committing
  offsets, so every job start replays the topic: it is the log of every source's state).
- :class:`VerifyControls` decodes and authenticates each record (:class:`ControlVerifier`, as the
  local follower does); unsigned, forged or not-permitted controls are counted, logged at warning
  with their reason, and dropped (the ``control.rejected`` Alerts come from the launch-time
  follower and the trainer/ingest loops).
- :class:`FoldControls` applies them (a partition arrives in offset order) to a
  :class:`SourceControl` seeded with the state read at launch (controls below its offsets are
  already in it), on one key with bounded state (redelivered offsets and replayed ids are rejected
  before anything is stored), and emits the new state of every source whose state changed,
  numbered, to each of its gate shards.
- :class:`GateLive` is keyed by (canonical source, offset % shards): it keeps the latest state of
  its source and gates the text, media and dead-letter records of that source with it.

Quarantined, paused and taken-down records are dropped (``control:<reason>``) and settled, as in
the local loop: a pause drops what arrives while it holds, and a resume lets later records through.
Nothing is left unsettled, so no hole in the settled ranges waits on the data topics' retention.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from beam_jobs.control import REASONS, STAGE, SourceControl
from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.sources.kafka import KafkaSourceConfig, xlang_consumer_config
from streams.events import Control, EventError, decode_event
from streams.governance import dead_letter_source
from streams.signing import ControlRejected, ControlVerifier, brief
from streams.source_names import canonical_source

__all__ = ["FoldControls", "GateLive", "LiveControls", "ReadControlsXlang", "VerifyControls"]

log = logging.getLogger("headwater.ingest.control")
CONTROL_REASONS = frozenset(REASONS.values())
_FOLD_KEY = "control"
FOLD_OFFSETS = 1024  # per partition: folded offsets kept below the next one (redeliveries)
FOLD_IDS = 1024  # applied control ids kept to reject exact replays (see _FoldFn)
REJECT_LOG_EVERY_S = 60.0  # one warning per rejection reason per minute and worker; all are counted


@dataclass(kw_only=True, slots=True)
class LiveControls:
    """What :class:`beam_jobs.pipeline.IngestText` needs to follow controls while it runs.

    ``records``: the control topic as (KafkaCoords, bytes), from this pipeline; ``baseline``: the state read at launch
    (the local follower's, so quarantines older than the job hold from its first record);
    ``shards``: gate keys per source (a hot source spreads over this many keys)."""

    records: beam.PCollection
    baseline: SourceControl
    verifier: ControlVerifier
    shards: int = 8


class ReadControlsXlang(beam.PTransform):
    """The ``control`` topic via cross-language ``ReadFromKafka`` -> (KafkaCoords, bytes)."""

    def __init__(self, source: KafkaSourceConfig, topic: str = "control"):
        super().__init__()
        self.source, self.topic = source, topic

    def consumer_config(self) -> dict[str, str]:
        """Java consumer properties, built at launch (SASL/TLS from ``HEADWATER_KAFKA_*``): the ingest
        group, whose ACL ingest has; nothing commits control offsets in it, so each start reads the
        topic from the beginning."""
        from streams.kafka import KafkaSettings

        settings = KafkaSettings.load(bootstrap=self.source.bootstrap, client_id="headwater-ingest-control")
        return xlang_consumer_config(replace(self.source, topics=[self.topic]), settings)

    def expand(self, pbegin):
        from apache_beam.io.kafka import ReadFromKafka

        # processing-time timestamps: an idle control topic never holds the data watermark back
        return (
            pbegin
            | "ReadControlTopic" >> ReadFromKafka(consumer_config=self.consumer_config(), topics=[self.topic], with_metadata=True,
                                                  commit_offset_in_finalize=False, timestamp_policy="ProcessingTime")
            | "ToCoords" >> beam.Map(lambda r: (KafkaCoords(r.topic, r.partition, r.offset), r.value))
        )


class _VerifyFn(beam.DoFn):
    def __init__(self, verifier: ControlVerifier):
        self.verifier = verifier

    def setup(self):
        self.rejected = _Rejections()

    def process(self, element):
        coords, value = element
        try:
            event = decode_event(value)
        except EventError as e:
            Metrics.counter(STAGE, "controls_undecodable").inc()
            log.error("control record %s:%d:%d undecodable: %s", *coords, brief(str(e)))
            return
        if not (isinstance(event, Control) and event.command in (*REASONS, "resume_source")):
            return
        try:
            self.verifier.verify(event, catch_up=True)
        except ControlRejected as e:
            self.rejected(event, e)
            return
        Metrics.counter(STAGE, "controls_verified").inc()
        yield coords, event


class VerifyControls(beam.PTransform):
    """(KafkaCoords, bytes) -> (KafkaCoords, Control): authentic ingest commands only."""

    def __init__(self, verifier: ControlVerifier):
        super().__init__()
        self.verifier = verifier

    def expand(self, records):
        return records | beam.ParDo(_VerifyFn(self.verifier))


class _FoldFn(beam.DoFn):
    """One key, bounded state: the folded :class:`SourceControl` (no history, no seen ids), per
    partition the next offset and the offsets folded among the last ``FOLD_OFFSETS`` below it, and
    the ids of applied controls that could still change their source (issued at most ``max_skew_s``
    before its latest control; older ones are ``superseded`` anyway), at most ``FOLD_IDS``.

    A redelivered offset or a replayed control id (a copy at a new offset) is rejected before
    anything is stored, so a replay flood costs one state read per copy and writes nothing.
    Controls apply in arrival order: the reader delivers a partition in offset order."""

    STATE = ReadModifyWriteStateSpec("fold", PickleCoder())

    def __init__(self, baseline: SourceControl, shards: int):
        self.baseline, self.shards = baseline, shards

    def setup(self):
        self.rejected = _Rejections()

    def _initial(self) -> dict:
        state = self.baseline.in_memory()
        state.seen = {}  # the launch ids stay in self.baseline.seen (the job's, not the state's)
        return {"state": state, "next": {}, "folded": {}, "ids": {}, "seq": 0}

    def process(self, element, fold=beam.DoFn.StateParam(STATE)):  # noqa: B008
        coords, control = element[1]
        part, offset = str(coords.partition), coords.offset
        if offset < self.baseline.offsets.get(part, 0):
            Metrics.counter(STAGE, "controls_in_baseline").inc()
            return
        st = fold.read() or self._initial()
        nxt = st["next"].get(part, 0)
        if offset < nxt - FOLD_OFFSETS or offset in st["folded"].get(part, ()):
            Metrics.counter(STAGE, "controls_redelivered").inc()
            return
        cid = control.control_id
        if cid in st["ids"] or cid in self.baseline.seen:
            self.rejected(control, ControlRejected("replayed", f"control_id {brief(cid)} was already applied"))
            return
        state = st["state"]
        before = dict(state.blocked)
        state.apply(control)  # never `replayed`: the ids are the fold's, checked above
        state.history.clear()
        if state.seen.pop(cid, None) is not None:  # applied or superseded: its source is in `since`
            st["ids"][cid] = (control.issued_at, canonical_source(control.args["source"]))
            st["ids"] = _recent_ids(st["ids"], state)
        folded = [o for o in (*st["folded"].get(part, ()), offset) if o >= max(nxt, offset + 1) - FOLD_OFFSETS]
        st["folded"][part], st["next"][part] = folded, max(nxt, offset + 1)
        after = state.blocked
        changed = sorted(s for s in before.keys() | after.keys() if before.get(s) != after.get(s))
        if changed:
            st["seq"] += 1
        fold.write(st)
        for source in changed:
            for shard in range(self.shards):
                yield (source, shard), ("update", (after.get(source), st["seq"]))


def _recent_ids(ids: dict[str, tuple[float, str]], state: SourceControl) -> dict[str, tuple[float, str]]:
    """The ids a replay could still act with: issued at most ``max_skew_s`` before their source's
    latest control (an older copy is ``superseded``), the newest ``FOLD_IDS``."""
    kept = {cid: (t, s) for cid, (t, s) in ids.items() if t >= state.since.get(s, [math.inf])[0] - state.max_skew_s}
    if len(kept) > FOLD_IDS:
        kept = dict(sorted(kept.items(), key=lambda kv: kv[1][0])[-FOLD_IDS:])
    return kept


class _Rejections:
    """Counts every rejected control; logs a warning per reason at most every ``every_s`` (a
    replay flood must not flood the log), with how many were rejected since the last one."""

    def __init__(self, every_s: float = REJECT_LOG_EVERY_S):
        self.every_s = every_s
        self.last: dict[str, tuple[float, int]] = {}  # reason -> (monotonic time logged, rejected since)

    def __call__(self, control: Control, e: ControlRejected) -> None:
        Metrics.counter(STAGE, f"controls_rejected_{e.reason}").inc()
        now, (logged, since) = time.monotonic(), self.last.get(e.reason, (-math.inf, 0))
        if now - logged < self.every_s:
            self.last[e.reason] = (logged, since + 1)
            return
        self.last[e.reason] = (now, 0)
        log.warning("control %s %s rejected in the graph (%s): %s; %d more %s since the last warning",
                    control.command, brief(control.control_id), e.reason, brief(e.detail), since, e.reason)


class FoldControls(beam.PTransform):
    """(KafkaCoords, Control) -> ((source, shard), ("update", (reason | None, seq))) per changed source."""

    def __init__(self, baseline: SourceControl, shards: int):
        super().__init__()
        self.baseline, self.shards = baseline, shards

    def expand(self, controls):
        return (controls
                | "OneKey" >> beam.Map(lambda e: (_FOLD_KEY, e))
                | "Fold" >> beam.ParDo(_FoldFn(self.baseline, self.shards)))


def _key(kind: str, shards: int):
    def key(item):
        if kind == "text":
            source, offset = item.source, item.coords.offset
        elif kind == "media":
            source, offset = item[1].source, item[0].offset
        else:
            source, offset = dead_letter_source(item), item.offset
        if source is None:  # a dead letter with no readable source: no source to gate
            return [beam.pvalue.TaggedOutput("unattributed", Outcome(
                KafkaCoords(item.topic, item.partition, item.offset), dead=item, record_id=item.record_id))]
        return [((canonical_source(source), offset % shards), (kind, item))]
    return key


class _GateFn(beam.DoFn):
    """Keyed by (source, shard): the source's latest live state gates each record."""

    LIVE = ReadModifyWriteStateSpec("live", PickleCoder())

    def __init__(self, blocked: dict[str, str]):
        self.blocked = blocked  # at launch: controls and takedowns (a takedown wins over any control)

    def process(self, element, live=beam.DoFn.StateParam(LIVE)):  # noqa: B008
        (source, _), (kind, item) = element
        if kind == "update":
            current = live.read()
            if current is None or item[1] > current[1]:
                live.write(item)
            return
        fixed = self.blocked.get(source)
        current = live.read()
        reason = fixed if fixed is not None and fixed not in CONTROL_REASONS else (current[0] if current else fixed)
        counted = kind != "dlq"  # in/out/drop count records, as the fixed gates do
        Metrics.counter(STAGE, "in").inc(int(counted))
        Metrics.counter(STAGE, "out" if reason is None else f"drop_{reason}").inc(int(counted))
        yield from _gated(kind, item, reason)


def _gated(kind: str, item: Any, reason: str | None):
    if kind == "text":
        if reason is not None and item.dropped is None:
            item = replace(item).drop(STAGE, reason)  # a copy: the input is not the gate's
        yield item
    elif kind == "media":
        coords, record = item
        if reason is None:
            yield beam.pvalue.TaggedOutput("media", item)
        else:
            yield beam.pvalue.TaggedOutput("outcomes", Outcome(coords, dropped=f"{STAGE}:{reason}",
                                                               record_id=record.id, source=record.source))
    else:
        coords = KafkaCoords(item.topic, item.partition, item.offset)
        yield beam.pvalue.TaggedOutput("outcomes", Outcome(coords, dead=item, record_id=item.record_id) if reason is None
                                       else Outcome(coords, dropped=f"{STAGE}:{reason}", record_id=item.record_id,
                                                    source=dead_letter_source(item)))


class GateLive(beam.PTransform):
    """{"controls": the control topic's (KafkaCoords, bytes), "text": Docs, "dlq": DeadLetters[,
    "media": (coords, RawRecord)]}, gated by the live control state -> {"text": Docs (blocked ones marked dropped), "media": active media, "outcomes": the
    dead letters' and blocked media's Outcomes}. Quarantined and paused records alike are dropped
    (``control:<reason>``) and settled, as in the micro-batch loop."""

    def __init__(self, live: LiveControls, blocked: dict[str, str]):
        super().__init__()
        self.live = live
        self.blocked = {canonical_source(k): v for k, v in blocked.items()}

    def expand(self, decoded: dict):
        live = self.live
        updates = (decoded["controls"]
                   | "VerifyControls" >> VerifyControls(live.verifier)
                   | "FoldControls" >> FoldControls(live.baseline, live.shards))
        keyed, unattributed = [updates], []
        for kind in ("text", "dlq", "media"):
            if kind not in decoded:
                continue
            tagged = decoded[kind] | f"Key_{kind}" >> beam.FlatMap(_key(kind, live.shards)).with_outputs(
                "unattributed", main="keyed")
            keyed.append(tagged.keyed)
            unattributed.append(tagged.unattributed)
        gated = (tuple(keyed) | "Meet" >> beam.Flatten()
                 | "Gate" >> beam.ParDo(_GateFn(self.blocked)).with_outputs("media", "outcomes", main="text"))
        outcomes = (gated.outcomes, *unattributed) | "Outcomes" >> beam.Flatten()
        return {"text": gated.text, "media": gated.media, "outcomes": outcomes}
