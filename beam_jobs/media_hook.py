"""Routes non-text records to ``beam_jobs.media.TokenizeMedia`` (when importable) and reports
discretization health.

Contract (docs/TEAM_CONTRACTS.md, "beam_jobs media hook"): input ``(KafkaCoords, RawRecord)``;
outputs main ``(coords, sample dict with the MDS columns incl. domain)``, ``dlq`` DeadLetter
(coordinates set), ``dropped`` ``(coords, "stage:reason", record id)``; image and video near-dups
are dropped by ``MediaDedup`` first, with ``record_id`` and ``dup_of`` set on their Outcome. Every
input yields exactly one output.

Health: the tokenizers' ``CodebookHealth`` deltas are merged per run (bounded) or per pane
(streaming) and become Beam counters ``codebook/used:<modality>/<level>`` and
``codebook/size:<modality>/<level>`` (the driver's ``codebook_usage`` snapshot field) and, with a
broker, one ``codebook_usage`` MetricsEvent per (modality, level) on ``metrics.ingest`` plus a
``codebook_collapse`` Alert (action and labels as the rule in infra/alerts/rules.toml) on ``alerts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from beam_jobs.records import KafkaCoords, Outcome

__all__ = ["HealthConfig", "ReportHealthFn", "RouteMedia", "media_available"]

_PRODUCERS: dict[str, object] = {}


def media_available() -> bool:
    try:
        from beam_jobs.media import TokenizeMedia  # noqa: F401
    except ImportError:
        return False
    return True


def _coords_of(dead) -> KafkaCoords:
    return KafkaCoords(dead.topic, dead.partition, dead.offset)


@dataclass(kw_only=True, slots=True)
class HealthConfig:
    """Where media health goes: counters always; events when ``bootstrap`` is set."""

    stream: str = ""
    bootstrap: str | None = None
    min_codes_seen: int = 2048  # levels judged on fewer codes are not reported
    min_utilization: float = 0.05
    pane_s: int = 10  # streaming: merge health over this many seconds

    def thresholds(self):
        from beam_jobs.media.health import HealthThresholds

        return HealthThresholds(min_utilization=self.min_utilization, min_codes_seen=self.min_codes_seen)


class ReportHealthFn(beam.DoFn):
    """Merged CodebookHealth -> counters, and codebook_usage MetricsEvents + collapse Alerts."""

    def __init__(self, config: HealthConfig):
        self.config = config

    def _producer(self):
        if self.config.bootstrap not in _PRODUCERS:
            from streams.kafka import KafkaSettings, make_producer

            _PRODUCERS[self.config.bootstrap] = make_producer(KafkaSettings.load(bootstrap=self.config.bootstrap))
        return _PRODUCERS[self.config.bootstrap]

    def process(self, health):
        for key, hist in sorted(health.counts.items()):
            Metrics.counter("codebook", f"used:{key}").inc(int((hist > 0).sum()))
            Metrics.counter("codebook", f"size:{key}").inc(int(hist.size))
        if not self.config.bootstrap:
            return
        from streams.kafka import publish

        thresholds = self.config.thresholds()
        producer = self._producer()
        for event in health.usage_events(stream=self.config.stream, thresholds=thresholds):
            publish(producer, "metrics.ingest", event, key=f"{event.labels['modality']}/{event.labels['level']}")
        _, alerts = health.report(stream=self.config.stream, thresholds=thresholds)
        for alert in alerts:
            publish(producer, "alerts", alert, key=alert.rule)
        producer.flush()


class RouteMedia(beam.PTransform):
    """(coords, RawRecord) -> Outcome via MediaDedup (image and video near-dups, keyed state) and
    TokenizeMedia (when it is absent, Validate dead-letters media)."""

    def __init__(self, media_config=None, *, health: HealthConfig | None = None, streaming: bool = False,
                 settled=None):
        """``settled``: the pinned ``MediaSettledRef`` of the stream root (local runner), None on
        runners whose Beam state is the index."""
        super().__init__()
        self.media_config = media_config
        self.health = health or HealthConfig()
        self.streaming = streaming
        self.settled = settled

    def expand(self, media):
        from beam_jobs.media import TokenizeMedia
        from beam_jobs.media.dedup_transform import MediaDedup, MediaDedupConfig
        from beam_jobs.media.process import MediaConfig
        from beam_jobs.media.transform import MergeHealthFn

        config = self.media_config or MediaConfig()
        dedup = media | "MediaDedup" >> MediaDedup(
            MediaDedupConfig(near=config.dedup.near, video=config.video_dedup, uri=config.uri, image_qa=config.image_qa,
                             video_limits=config.video), settled=self.settled)
        dups = dedup["dropped"] | "DedupDropped" >> beam.Map(
            lambda d: Outcome(KafkaCoords(*d[0]), dropped=d[1], record_id=d[2], dup_of=d[3], source=d[5]))
        out = dedup["records"] | "TokenizeMedia" >> TokenizeMedia(config)
        samples = out.samples | "Samples" >> beam.MapTuple(lambda coords, row: Outcome(KafkaCoords(*coords), sample=row))
        dead = out.dlq | "DeadLetters" >> beam.Map(lambda d: Outcome(_coords_of(d), dead=d))
        dropped = out.dropped | "Dropped" >> beam.Map(
            lambda d: Outcome(KafkaCoords(*d[0]), dropped=d[1], record_id=d[2] if len(d) > 2 else None,
                              source=d[3] if len(d) > 3 else None))
        health = out.health
        if self.streaming:
            health = health | "HealthPanes" >> beam.WindowInto(
                window.GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterProcessingTime(self.health.pane_s)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
        _ = (
            health
            | "MergeHealth" >> beam.CombineGlobally(MergeHealthFn()).without_defaults()
            | "ReportHealth" >> beam.ParDo(ReportHealthFn(self.health))
        )
        return (samples, dead, dropped, dups) | "MediaOutcomes" >> beam.Flatten()
