"""Routes non-text records to ``beam_jobs.media.TokenizeMedia``, or dead-letters them when absent.

Contract (docs/TEAM_CONTRACTS.md, "beam_jobs media hook"): input ``(KafkaCoords, RawRecord)``;
outputs main ``(coords, sample dict with the MDS columns incl. domain)``, ``dlq`` DeadLetter
(coordinates set), ``dropped`` ``(coords, "stage:reason")``. Every input yields exactly one output.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.validate import dead_letter

__all__ = ["RouteMedia", "media_available"]


def media_available() -> bool:
    try:
        from beam_jobs.media import TokenizeMedia  # noqa: F401
    except ImportError:
        return False
    return True


def _not_enabled(element) -> Outcome:
    coords, record = element
    Metrics.counter("media", "dlq_modality_not_enabled").inc()
    dead = dead_letter(coords, record.to_bytes(), "modality_not_enabled", stage="media", record_id=record.id,
                       detail=f"modality {record.modality!r}: media tokenizers are not enabled in this job")
    return Outcome(coords, dead=dead)


def _coords_of(dead) -> KafkaCoords:
    return KafkaCoords(dead.topic, dead.partition, dead.offset)


class RouteMedia(beam.PTransform):
    """(coords, RawRecord) -> Outcome via TokenizeMedia; ``enabled=False`` dead-letters them all."""

    def __init__(self, *, enabled: bool = True, media_config=None):
        super().__init__()
        self.enabled = enabled and media_available()
        self.media_config = media_config

    def expand(self, media):
        if not self.enabled:
            return media | "NotEnabled" >> beam.Map(_not_enabled)
        from beam_jobs.media import TokenizeMedia
        from beam_jobs.media.process import MediaConfig

        out = media | "TokenizeMedia" >> TokenizeMedia(self.media_config or MediaConfig())
        samples = out.samples | "Samples" >> beam.MapTuple(lambda coords, row: Outcome(KafkaCoords(*coords), sample=row))
        dead = out.dlq | "DeadLetters" >> beam.Map(lambda d: Outcome(_coords_of(d), dead=d))
        dropped = out.dropped | "Dropped" >> beam.MapTuple(lambda coords, why: Outcome(KafkaCoords(*coords), dropped=why))
        return (samples, dead, dropped) | "MediaOutcomes" >> beam.Flatten()
