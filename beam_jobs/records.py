"""Element types that flow between the ingest transforms.

Every record read keeps its :class:`KafkaCoords` to the sink, whatever happens
to it (kept, filtered, deduplicated, dead-lettered), because the sink settles
offsets, not documents: that is what makes the job effectively-once.
Bounded (file) input uses the file path as ``topic``, partition 0 and the line
or row number as ``offset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streams.events import DeadLetter, TokenizedSample

__all__ = ["Doc", "KafkaCoords", "Outcome", "SourceRecord"]


class KafkaCoords(NamedTuple):
    """Where a record came from: (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int


#: What a source emits: coordinates and the record's original bytes.
SourceRecord = tuple[KafkaCoords, bytes]


@dataclass(slots=True)
class Doc:
    """A decoded text document moving through filters and dedup.

    ``dropped`` is set (to a ``stage:reason`` string) instead of removing the
    document, so that its offset still reaches the sink and gets settled.
    """

    coords: KafkaCoords
    id: str
    source: str
    license: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    language: str = ""
    dropped: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    dead: DeadLetter | None = None

    def drop(self, stage: str, reason: str) -> Doc:
        """Mark as dropped and release the text (only the offset matters now)."""
        self.dropped = f"{stage}:{reason}"
        self.text = ""
        return self

    def fail(self, stage: str, reason: str, detail: str = "") -> Doc:
        """A step failed on this document: mark it dropped and carry its dead letter to the sink
        (the record is rebuilt from the document, as it was when the step failed)."""
        from beam_jobs.filters.pii import scrub_bytes  # imports this module: imported here
        from streams.events import RawRecord

        try:
            original = RawRecord(id=self.id, modality="text", source=self.source, license=self.license,
                                 text=self.text, meta=self.meta).to_bytes()
        except Exception:  # noqa: BLE001 - whatever made the step fail may make this fail too
            original = repr(self.text).encode("utf-8", "backslashreplace")
        self.dead = DeadLetter.of(original, reason=reason, stage=stage, detail=detail, record_id=self.id, redact=scrub_bytes,
                                  topic=self.coords.topic, partition=self.coords.partition, offset=self.coords.offset)
        return self.drop(stage, reason)


class Outcome(NamedTuple):
    """What the sink settles for one offset: a sample to write, a dead letter, or neither (dropped).

    ``sample`` is a TokenizedSample (text) or an MDS row dict with a ``domain`` (media).
    """

    coords: KafkaCoords
    sample: TokenizedSample | dict[str, Any] | None = None
    dead: DeadLetter | None = None
    dropped: str | None = None
    record_id: str | None = None
    dup_of: str | None = None
    source: str | None = None  # of a dropped record (the drop log keeps it, for takedown)
