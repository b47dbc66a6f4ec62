"""Validate/Decode: original bytes -> text :class:`Doc`, media RawRecord, or DeadLetter.

Never raises on bad input: every failure becomes a DeadLetter with a reason,
the stage, the original bytes and the record's Kafka coordinates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.records import Doc, KafkaCoords, SourceRecord
from streams.events import DeadLetter, EventError, RawRecord

__all__ = ["DLQ_TAG", "MEDIA_TAG", "Invalid", "ValidateConfig", "ValidateDecode", "decode_record"]

STAGE = "validate"
MEDIA_TAG = "media"
DLQ_TAG = "dlq"


@dataclass(kw_only=True, slots=True)
class ValidateConfig:
    """Limits applied while decoding."""

    max_record_bytes: int = 4 * 1024 * 1024
    min_text_chars: int = 1
    media_enabled: bool = True  # False: media records are dead-lettered as modality_not_enabled


class Invalid(Exception):
    """A record failed validation; ``reason`` is a short machine-readable label."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise Invalid("duplicate_field", f"field {dup!r} appears more than once")
    return dict(pairs)


def _reason_of(e: EventError) -> str:
    if e.field == "modality":
        return "unknown_modality"
    if e.field == "schema_version":
        return "unsupported_version"
    if e.field == "payload":
        return "payload_fields"
    if e.field == "data_b64":
        return "invalid_base64"
    if e.problem == "missing required field":
        return "missing_field"
    if e.problem == "unknown field":
        return "unknown_field"
    return "wrong_type"


def decode_record(raw: bytes, config: ValidateConfig) -> RawRecord:
    """Parse and check one record's bytes; raise :class:`Invalid` with a reason."""
    if not isinstance(raw, (bytes, bytearray)):
        raise Invalid("wrong_type", f"record value must be bytes, got {type(raw).__name__}")
    if len(raw) > config.max_record_bytes:
        raise Invalid("oversize", f"{len(raw)} bytes > limit {config.max_record_bytes}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("invalid_utf8", str(e)) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise Invalid("malformed_json", str(e)) from None
    except RecursionError:
        raise Invalid("malformed_json", "nesting too deep") from None
    if not isinstance(obj, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return RawRecord.from_dict(obj)
    except EventError as e:
        raise Invalid(_reason_of(e), str(e)) from None


def text_of(record: RawRecord, config: ValidateConfig) -> str:
    """The text payload of a text record (inline text or UTF-8 data_b64)."""
    if record.uri is not None:
        raise Invalid("payload_by_uri", "text records must carry text inline")
    if record.text is not None:
        text = record.text
    else:
        try:
            text = record.payload_bytes().decode("utf-8")
        except EventError as e:
            raise Invalid("invalid_base64", str(e)) from None
        except UnicodeDecodeError as e:
            raise Invalid("invalid_utf8", str(e)) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid("invalid_utf8", f"lone surrogate at {e.start}") from None
    if "\x00" in text:
        raise Invalid("nul_in_text", "text contains NUL characters")
    if len(text.strip()) < config.min_text_chars:
        raise Invalid("empty_text", "text payload is empty")
    return text


def dead_letter(coords: KafkaCoords, raw: bytes, reason: str, *, stage: str, detail: str = "", record_id: str | None = None):
    return DeadLetter.of(
        bytes(raw) if isinstance(raw, (bytes, bytearray)) else repr(raw).encode(),
        reason=reason,
        stage=stage,
        detail=detail[:500],
        record_id=record_id,
        topic=coords.topic,
        partition=coords.partition,
        offset=coords.offset,
    )


class _ValidateFn(beam.DoFn):
    def __init__(self, config: ValidateConfig):
        self.config = config
        self.seen = Metrics.counter("validate", "in")

    def process(self, element: SourceRecord):
        coords, raw = element
        self.seen.inc()
        record_id = None
        try:
            record = decode_record(raw, self.config)
            record_id = record.id
            if record.modality != "text":
                if not self.config.media_enabled:
                    raise Invalid("modality_not_enabled", f"modality {record.modality!r}: media tokenizers are not enabled")
                Metrics.counter("validate", f"out_{record.modality}").inc()
                yield beam.pvalue.TaggedOutput(MEDIA_TAG, (coords, record))
                return
            text = text_of(record, self.config)
        except Invalid as e:
            Metrics.counter("validate", f"dlq_{e.reason}").inc()
            yield beam.pvalue.TaggedOutput(
                DLQ_TAG, dead_letter(coords, raw, e.reason, stage=STAGE, detail=e.detail, record_id=record_id)
            )
            return
        Metrics.counter("validate", "out_text").inc()
        yield Doc(coords=coords, id=record.id, source=record.source, license=record.license, text=text, meta=record.meta)


class ValidateDecode(beam.PTransform):
    """SourceRecord -> main: Doc (text); ``media``: (coords, RawRecord); ``dlq``: DeadLetter."""

    def __init__(self, config: ValidateConfig | None = None):
        super().__init__()
        self.config = config or ValidateConfig()

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_ValidateFn(self.config)).with_outputs(DLQ_TAG, MEDIA_TAG, main="text")
