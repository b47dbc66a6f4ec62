"""Validate/Decode: original bytes -> text :class:`Doc`, media RawRecord, or DeadLetter.

Never raises on bad input: every failure becomes a DeadLetter with a reason,
the stage, the original bytes and the record's Kafka coordinates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.filters.pii import scrub_bytes, scrub_pii, scrub_value
from beam_jobs.records import Doc, KafkaCoords, SourceRecord
from streams.events import DeadLetter, EventError, RawRecord
from streams.source_binding import SourceBinding

__all__ = [
    "DLQ_TAG", "MEDIA_TAG", "SAFE_NAME", "Invalid", "ValidateConfig", "ValidateDecode", "check_fields", "check_name",
    "check_policy", "dead_letter", "decode_record", "no_duplicate_keys", "text_of",
]

STAGE = "validate"
MEDIA_TAG = "media"
DLQ_TAG = "dlq"


@dataclass(kw_only=True, slots=True)
class ValidateConfig:
    """Limits applied while decoding."""

    max_record_bytes: int = 4 * 1024 * 1024
    min_text_chars: int = 1
    max_name_chars: int = 512  # id, source, license, modality and meta keys
    max_uri_chars: int = 4096
    max_meta_bytes: int = 64 * 1024  # meta as JSON
    media_enabled: bool = True  # False: media records are dead-lettered as modality_not_enabled
    scrub_pii: bool = True  # PII scrubbed from meta strings (captions, alt) and from dead letters' kept copies
    license_allow: frozenset[str] | None = None  # allowed licenses (compared case-folded); None: any
    binding: SourceBinding | None = None  # producer -> sources it may write; None: not checked


class Invalid(Exception):
    """A record failed validation; ``reason`` is a short machine-readable label."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` rejecting repeated keys (one pass: linear in the number of keys)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise Invalid("duplicate_field", f"field {k[:100]!r} appears more than once")
        out[k] = v
    return out


#: Names (id, source, license, meta keys): no C0/C1 control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Free text (meta string values): NUL and C0 controls other than tab/newline/carriage return.
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: A safe domain label: the stream writer's shard-name rule (``streams.mds_writer``).
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _check_unicode(where: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid("invalid_utf8", f"{where}: lone surrogate at {e.start}") from None


def check_name(where: str, value: str, max_chars: int) -> None:
    """A short identifier-like string: valid Unicode, no control characters, at most ``max_chars``."""
    if len(value) > max_chars:
        raise Invalid("field_too_long", f"{where}: {len(value)} chars > {max_chars}")
    _check_unicode(where, value)
    if m := _CONTROL.search(value):
        raise Invalid("control_char", f"{where}: control character U+{ord(m.group()):04X} at {m.start()}")


def _check_meta(value: object, where: str, config: ValidateConfig) -> None:
    """Every key and string value of ``meta``, iteratively (no recursion limit to hit)."""
    stack = [(where, value)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, str):
            _check_unicode(at, v)
            if m := _TEXT_CONTROL.search(v):
                raise Invalid("control_char", f"{at}: control character U+{ord(m.group()):04X} at {m.start()}")
        elif isinstance(v, dict):
            for k, item in v.items():
                check_name(f"{at} key", k, config.max_name_chars)
                stack.append((f"{at}.{k[:40]}", item))
        elif isinstance(v, list):
            stack.extend((f"{at}[{i}]", item) for i, item in enumerate(v))


def check_fields(record: RawRecord, config: ValidateConfig) -> None:
    """Every string of a decoded record except the text payload; raise :class:`Invalid`."""
    for name in ("id", "source", "license", "modality"):
        check_name(name, getattr(record, name), config.max_name_chars)
    if record.uri is not None:
        check_name("uri", record.uri, config.max_uri_chars)
    if record.data_b64 is not None:
        _check_unicode("data_b64", record.data_b64)
    meta = record.meta
    _check_meta(meta, "meta", config)
    size = len(json.dumps(meta, ensure_ascii=False, default=str).encode())
    if size > config.max_meta_bytes:
        raise Invalid("field_too_long", f"meta: {size} bytes > {config.max_meta_bytes}")
    for key in ("caption", "alt", "language"):
        if key in meta and not isinstance(meta[key], str):
            raise Invalid("wrong_type", f"meta.{key} must be a string, got {type(meta[key]).__name__}")
    domain = meta.get("domain")
    if domain is not None and (not isinstance(domain, str) or not SAFE_NAME.match(domain)):
        raise Invalid("unsafe_domain", f"meta.domain {str(domain)[:80]!r} must match {SAFE_NAME.pattern}")


def check_policy(record: RawRecord, coords: KafkaCoords, raw: bytes, config: ValidateConfig,
                 headers: tuple[tuple[str, bytes], ...] = ()) -> None:
    """Deployment policy: the license allow-list and the producer's source binding (by topic, or by
    the signed producer headers the Kafka source passes on); raise :class:`Invalid`."""
    allow = config.license_allow
    if allow is not None and record.license.casefold() not in {a.casefold() for a in allow}:
        raise Invalid("license_not_allowed", f"license {record.license[:80]!r} is not in this deployment's allow-list")
    if config.binding is not None and (why := config.binding.violation(record.source, topic=coords.topic,
                                                                         headers=headers, value=raw)):
        raise Invalid("source_not_bound", why)


def _reason_of(e: EventError) -> str:
    if e.field == "modality":
        return "unknown_modality"
    if e.field == "schema_version":
        return "unsupported_version"
    if e.field == "payload":
        return "payload_fields"
    if e.field == "data_b64":
        return "invalid_base64"
    if e.problem.startswith("not valid UTF-8"):  # a lone surrogate in a string field
        return "invalid_utf8"
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
        obj = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise Invalid("malformed_json", str(e)) from None
    except RecursionError:
        raise Invalid("malformed_json", "nesting too deep") from None
    except ValueError as e:  # e.g. an integer literal over sys.get_int_max_str_digits() digits
        raise Invalid("malformed_json", str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        record = RawRecord.from_dict(obj)
    except EventError as e:
        raise Invalid(_reason_of(e), str(e)[:500]) from None
    check_fields(record, config)
    return record


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


def dead_letter(coords: KafkaCoords, raw: bytes, reason: str, *, stage: str, detail: str = "",
                record_id: str | None = None, scrub: bool = True) -> DeadLetter:
    """A DeadLetter for the record at ``coords`` (its bytes kept as DeadLetter.of caps them; with
    ``scrub``, PII is scrubbed from the kept copy and the detail, the SHA-256 is the original's)."""
    return DeadLetter.of(
        bytes(raw) if isinstance(raw, (bytes, bytearray)) else repr(raw).encode(),
        reason=reason,
        stage=stage,
        detail=scrub_pii(detail[:500])[0] if scrub else detail[:500],
        redact=scrub_bytes if scrub else None,
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
        coords, raw, *rest = element  # (coords, value[, headers]): headers when binding checks need them
        headers = rest[0] if rest else ()
        self.seen.inc()
        record_id = None
        try:
            record = decode_record(raw, self.config)
            record_id = record.id
            check_policy(record, coords, raw, self.config, headers)
            Metrics.counter("license", record.license.casefold() or "unknown").inc()  # admitted records per license
            if self.config.scrub_pii and record.meta:
                record.meta = scrub_value(record.meta)[0]  # captions/alt/meta reach the stream scrubbed
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
                DLQ_TAG, dead_letter(coords, raw, e.reason, stage=STAGE, detail=e.detail, record_id=record_id,
                                     scrub=self.config.scrub_pii)
            )
            return
        except Exception as e:  # noqa: BLE001 - an unforeseen failure is this record's, never the job's
            Metrics.counter("validate", "dlq_internal_error").inc()
            yield beam.pvalue.TaggedOutput(DLQ_TAG, dead_letter(
                coords, raw, "internal_error", stage=STAGE, detail=f"{type(e).__name__}: {e}", record_id=record_id,
                scrub=self.config.scrub_pii))
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
