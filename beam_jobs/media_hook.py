"""Routes non-text records to ``beam_jobs.media.TokenizeMedia`` (when importable).

Contract (docs/TEAM_CONTRACTS.md, "beam_jobs media hook"): input ``(KafkaCoords, RawRecord)``;
outputs main ``(coords, sample dict with the MDS columns incl. domain)``, ``dlq`` DeadLetter
(coordinates set), ``dropped`` ``(coords, "stage:reason")``. Every input yields exactly one output.
"""

from __future__ import annotations

import apache_beam as beam

from beam_jobs.records import KafkaCoords, Outcome

__all__ = ["RouteMedia", "media_available"]


def media_available() -> bool:
    try:
        from beam_jobs.media import TokenizeMedia  # noqa: F401
    except ImportError:
        return False
    return True


def _coords_of(dead) -> KafkaCoords:
    return KafkaCoords(dead.topic, dead.partition, dead.offset)


class RouteMedia(beam.PTransform):
    """(coords, RawRecord) -> Outcome via TokenizeMedia (when it is absent, Validate dead-letters media)."""

    def __init__(self, media_config=None):
        super().__init__()
        self.media_config = media_config

    def expand(self, media):
        from beam_jobs.media import TokenizeMedia
        from beam_jobs.media.process import MediaConfig

        out = media | "TokenizeMedia" >> TokenizeMedia(self.media_config or MediaConfig())
        samples = out.samples | "Samples" >> beam.MapTuple(lambda coords, row: Outcome(KafkaCoords(*coords), sample=row))
        dead = out.dlq | "DeadLetters" >> beam.Map(lambda d: Outcome(_coords_of(d), dead=d))
        dropped = out.dropped | "Dropped" >> beam.MapTuple(lambda coords, why: Outcome(KafkaCoords(*coords), dropped=why))
        return (samples, dead, dropped) | "MediaOutcomes" >> beam.Flatten()
