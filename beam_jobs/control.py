"""Source control for ingest: ``quarantine_source`` / ``pause_source`` / ``resume_source`` Controls.

Streaming ingest follows the ``control`` topic with its own consumer (assigned, not a group),
polled between micro-batches; the state (blocked sources and the next control offset per
partition) lives in ``<stream-root>/_ingest/control.json`` so a restart keeps it and never
re-applies an old command over a newer one. Records of a blocked source are settled but not
written: ``GateSources`` marks them dropped with reason ``source_quarantined`` / ``source_paused``
(stage ``control``). ``resume_source`` lifts a pause; a quarantine is lifted by ``resume_source``
too (an operator's explicit decision), and every applied or ignored command is logged. The
unbounded streaming graph follows the topic inside the job instead (:mod:`beam_jobs.control_stream`,
with the same drop-and-settle semantics). An object-store root keeps no state
file: the state lives in memory and the follower replays the topic on every start.

Controls are signed (``streams.signing``). The follower authenticates each one (signature, key
permitted the command, finite time, at most ``max_skew_s`` in the future) and raises a
``control.rejected`` Alert for any it refuses. It applies no freshness window: the topic is the
log of every source's state (kept forever: ``retention.ms = -1``), and a fresh ingest must learn
a quarantine issued long ago. Commands are applied in topic offset order, the order the broker
received them, not by the signers' clocks: an operator's ``resume_source`` sent after the
sentinel's quarantine wins even if the sentinel's clock runs ahead. Replays are neutralised by
the state: a command issued more than ``max_skew_s`` (the clock skew allowed between signers,
the verifier's) before the latest command applied for its source is ``superseded`` and ignored,
so an old signed ``resume_source`` replayed later never undoes a newer quarantine; and the ids
of applied controls are kept (the last ``SEEN_MAX``) so an exact replay is rejected as
``replayed``. Rejections are alerted once per reason per cooldown (``RejectionAlerts``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.records import Doc, Outcome
from streams import faultpoints
from streams.events import Alert, Control
from streams.guard import CONTROL_MAX_POLL_RECORDS, REDELIVER, ConsumerGuard
from streams.signing import ControlRejected, ControlVerifier, RejectionAlerts, brief
from streams.source_names import canonical_source
from streams.storage import is_remote

__all__ = ["ControlCatchUpError", "ControlFollower", "GateMedia", "GateText", "SourceControl"]

log = logging.getLogger("headwater.ingest.control")
STAGE = "control"
REASONS = {"quarantine_source": "source_quarantined", "pause_source": "source_paused"}
INGEST_COMMANDS = (*REASONS, "resume_source")
SEEN_MAX = 10_000


@dataclass(slots=True)
class SourceControl:
    """Blocked sources (source -> drop reason), the control topic's next offsets, and per source
    the ``[issued_at, control_id]`` of the latest-issued control applied; commands apply in offset
    order unless issued more than ``max_skew_s`` before that one (``superseded``)."""

    path: str
    blocked: dict[str, str] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # "partition" -> next offset
    history: list[dict] = field(default_factory=list)
    since: dict[str, list] = field(default_factory=dict)  # source -> [issued_at, control_id]
    seen: dict[str, float] = field(default_factory=dict)  # control_id -> issued_at (last SEEN_MAX)
    max_skew_s: float = 30.0  # not persisted: the verifier's clock skew allowance

    @classmethod
    def load(cls, stream_root: str) -> SourceControl:
        """The state kept under a local stream root; in memory only (``path`` "") for an object-store
        root, whose follower replays the topic from its start on every launch."""
        if is_remote(stream_root):
            return cls("")
        path = os.path.join(stream_root, "_ingest", "control.json")
        if not os.path.isfile(path):
            return cls(path)
        with open(path) as f:
            obj = json.load(f)
        return cls(path, dict(obj.get("blocked", {})), dict(obj.get("offsets", {})), list(obj.get("history", [])),
                   dict(obj.get("since", {})), dict(obj.get("seen", {})))

    def in_memory(self) -> SourceControl:
        """A copy that is never saved (``path`` "", no history): the streaming graph folds controls into it."""
        return SourceControl("", dict(self.blocked), dict(self.offsets), [], dict(self.since), dict(self.seen),
                             self.max_skew_s)

    def save(self) -> None:
        if not self.path:  # in memory
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"blocked": self.blocked, "offsets": self.offsets, "history": self.history[-1000:],
                       "since": self.since, "seen": self.seen}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def apply(self, control: Control) -> bool:
        """Apply one (authenticated) command, in offset order; True when it changed the state. Other
        commands are ignored, and so is one issued more than ``max_skew_s`` before the latest-issued
        control applied for its source (``superseded``).

        Raises :class:`ControlRejected` (``replayed``) for a control id applied before."""
        source = control.args.get("source") if isinstance(control.args, dict) else None
        if control.command not in INGEST_COMMANDS:
            return False
        if not isinstance(source, str) or not source:
            log.warning("control %s (%s) ignored: args.source missing", control.command, brief(control.control_id))
            return False
        source = canonical_source(source)  # look-alike / zero-width variants block the same source
        if control.control_id in self.seen:
            raise ControlRejected("replayed", f"control_id {brief(control.control_id)} was already applied")
        self._remember(control)
        last = self.since.get(source)
        if last is not None and control.issued_at < last[0] - self.max_skew_s:
            self.history.append({"at": time.time(), "command": control.command, "source": source,
                                 "issued_by": control.issued_by, "control_id": control.control_id,
                                 "changed": False, "superseded_by": last[1], "state": self.blocked.get(source, "active")})
            log.warning("control %s source=%s (%s, issued %.3f) ignored: superseded by %s issued %.3f "
                        "(more than %.0fs later)", control.command, brief(source), brief(control.control_id),
                        control.issued_at, last[1], last[0], self.max_skew_s)
            return False
        if last is None or control.issued_at >= last[0]:
            self.since[source] = [control.issued_at, control.control_id]
        before = self.blocked.get(source)
        if control.command == "resume_source":
            self.blocked.pop(source, None)
        elif not (before == "source_quarantined" and control.command == "pause_source"):
            self.blocked[source] = REASONS[control.command]  # a pause never weakens a quarantine
        changed = self.blocked.get(source) != before
        entry = {"at": time.time(), "command": control.command, "source": source, "reason": control.reason,
                 "issued_by": control.issued_by, "control_id": control.control_id, "changed": changed,
                 "state": self.blocked.get(source, "active")}
        self.history.append(entry)
        log.info("control %s source=%s by %s (%s): %s -> %s", control.command, brief(source),
                 brief(control.issued_by or "?"), brief(control.reason or "no reason"), before or "active", entry["state"])
        return changed

    def _remember(self, control: Control) -> None:
        self.seen[control.control_id] = control.issued_at
        if len(self.seen) > SEEN_MAX * 1.1:
            self.seen = dict(sorted(self.seen.items(), key=lambda kv: kv[1])[-SEEN_MAX:])


class ControlCatchUpError(RuntimeError):
    """The control topic could not be read to its end offsets."""


class ControlFollower:
    """Reads new Controls from the ``control`` topic (all partitions) into a :class:`SourceControl`.

    Undecodable records are dead-lettered with an alert by a :class:`ConsumerGuard` and skipped;
    each decoded control is authenticated by ``verifier`` and a refused one raises a
    ``control.rejected`` Alert (at most one per reason per cooldown: ``alerts``).
    """

    def __init__(self, bootstrap: str, state: SourceControl, verifier: ControlVerifier, *,
                 topic: str = "control"):
        from kafka import TopicPartition

        from streams.kafka import KafkaSettings, make_consumer, make_producer

        self.state, self.topic, self.verifier = state, topic, verifier
        state.max_skew_s = verifier.max_skew_s
        self.alerts = RejectionAlerts("ingest")
        settings = KafkaSettings.load(bootstrap=bootstrap)
        self.consumer = make_consumer(settings, assign=[], group_id=None)
        self.producer = make_producer(settings)
        self.guard = ConsumerGuard("ingest-control", self.producer, max_bytes=Control.MAX_BYTES)
        self._pending: list[Alert] = []  # rejection alerts not yet acknowledged by the broker
        parts = self.consumer.partitions_for_topic(topic) or set()
        self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        begins = self.consumer.beginning_offsets(self.tps) if self.tps else {}
        for tp in self.tps:
            self.consumer.seek(tp, max(begins[tp], state.offsets.get(str(tp.partition), 0)))

    def poll(self, timeout_s: float = 0.5) -> int:
        """Apply every Control available now (until ``timeout_s``, checked per record); persists the
        state; returns how many were read. A record's offset is stored only once it was handled:
        after a transient error (the guard's ``REDELIVER``) the consumer seeks back to it and the
        next poll retries it."""
        n, deadline = 0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = self.consumer.poll(timeout_ms=100, max_records=CONTROL_MAX_POLL_RECORDS)
            if not batches:
                if n:
                    break
                continue
            for tp, records in batches.items():
                for record in records:
                    if n and time.monotonic() >= deadline:  # a flood must not hold the pipeline up
                        self.consumer.seek(tp, record.offset)
                        break
                    n += 1
                    if self.guard.handle(record, self._apply) is REDELIVER:
                        self.consumer.seek(tp, record.offset)
                        deadline = 0.0  # retried by the next poll
                        break
                    self.state.offsets[str(tp.partition)] = record.offset + 1
        faultpoints.reach("control.poll")
        self.guard.flush()
        if n:
            self.state.save()
        return n

    def read_to_end(self, timeout_s: float) -> int:
        """Poll until every partition's position reaches the end offsets taken now; returns how
        many records were read. Raises :class:`ControlCatchUpError` when the topic has no
        partitions (missing, or the broker unreachable) or the ends are not reached within
        ``timeout_s`` (a slow or unreachable broker, a flood): a start must not proceed on a part
        of the topic, since a quarantine it missed would not hold."""
        from kafka.errors import KafkaError

        if not self.tps:
            raise ControlCatchUpError(f"topic {self.topic!r} has no partitions (missing, or the broker is unreachable)")
        try:
            ends = self.consumer.end_offsets(self.tps)
        except KafkaError as e:
            raise ControlCatchUpError(f"cannot read the end offsets of {self.topic!r}: {e}") from e
        n, deadline = 0, time.monotonic() + timeout_s
        while behind := {tp.partition: (pos, end) for tp, end in ends.items()
                         if (pos := self.consumer.position(tp)) < end}:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlCatchUpError(f"{self.topic!r} not read to its end within {timeout_s:.0f}s: "
                                          f"partition -> (position, end) {behind}")
            n += self.poll(timeout_s=min(left, 5.0))
        return n

    def _apply(self, event) -> None:
        if not (isinstance(event, Control) and event.command in INGEST_COMMANDS):
            return
        from streams.kafka import publish

        try:
            self.verifier.verify(event, catch_up=True)
            self.state.apply(event)
        except ControlRejected as e:
            log.error("control %s %s rejected: %s", event.command, brief(event.control_id), e)
            alert = self.alerts(event, e)
            if alert is not None:  # pending until acknowledged: a redelivery's rejection is rate-limited
                self._pending.append(alert)
        while self._pending:
            publish(self.producer, "alerts", self._pending[0], key=self._pending[0].rule)
            self._pending.pop(0)

    def close(self) -> None:
        self.guard.flush(force=True)
        self.consumer.close()
        self.producer.close()


class _GateTextFn(beam.DoFn):
    def __init__(self, blocked: dict[str, str]):
        self.blocked = blocked
        self.n_in = Metrics.counter(STAGE, "in")
        self.n_out = Metrics.counter(STAGE, "out")

    def process(self, doc: Doc):
        self.n_in.inc()
        reason = self.blocked.get(canonical_source(doc.source))
        if reason and doc.dropped is None:
            Metrics.counter(STAGE, f"drop_{reason}").inc()
            doc.drop(STAGE, reason)
        else:
            self.n_out.inc()
        yield doc


class GateText(beam.PTransform):
    """Docs of blocked sources are marked dropped (``control:<reason>``) so their offsets settle."""

    def __init__(self, blocked: dict[str, str]):
        super().__init__()
        self.blocked = {canonical_source(k): v for k, v in blocked.items()}

    def expand(self, docs):
        return docs | beam.ParDo(_GateTextFn(self.blocked))


class _GateMediaFn(beam.DoFn):
    def __init__(self, blocked: dict[str, str]):
        self.blocked = blocked

    def process(self, element):
        coords, record = element
        Metrics.counter(STAGE, "in").inc()
        reason = self.blocked.get(canonical_source(record.source))
        if reason:
            Metrics.counter(STAGE, f"drop_{reason}").inc()
            yield beam.pvalue.TaggedOutput("blocked", Outcome(coords, dropped=f"{STAGE}:{reason}", record_id=record.id,
                                                                  source=record.source))
        else:
            Metrics.counter(STAGE, "out").inc()
            yield element


class GateMedia(beam.PTransform):
    """(coords, RawRecord) -> main: records of active sources; ``blocked``: dropped Outcomes."""

    def __init__(self, blocked: dict[str, str]):
        super().__init__()
        self.blocked = {canonical_source(k): v for k, v in blocked.items()}

    def expand(self, media):
        return media | beam.ParDo(_GateMediaFn(self.blocked)).with_outputs("blocked", main="active")
