"""Versioned event contracts: dataclasses, their JSON codec and pyarrow schemas.

Every event serialises to a JSON object carrying ``kind`` and ``schema_version``.
Decoding checks both and every field's type, and raises :class:`EventError`
naming the offending field, so a malformed or future event is never half-read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

__all__ = [
    "EVENT_TYPES",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MODALITIES",
    "SMALL_EVENT_BYTES",
    "Alert",
    "CheckpointSaved",
    "Control",
    "DeadLetter",
    "EvalReport",
    "Event",
    "EventError",
    "MetricsEvent",
    "OffsetRange",
    "RawRecord",
    "ShardPublished",
    "TokenizedSample",
    "arrow_schema",
    "decode_event",
]

MODALITIES: tuple[str, ...] = ("text", "audio", "image", "video")
E = TypeVar("E", bound="Event")


MAX_EVENT_BYTES = 8 * 1024 * 1024
"""Largest encoded event any decoder accepts (above ingest's 4 MiB raw-record limit)."""
SMALL_EVENT_BYTES = 256 * 1024
"""Limit of the command/alert/metrics kinds (``Event.MAX_BYTES``): checking a free-form field costs
about 1 s per MiB, so a consumer of ``control`` never spends more than ~0.3 s on one record."""
MAX_DEPTH = 64
"""Deepest nesting of lists/objects accepted inside free-form (``Any``) fields."""
_INT_LIMIT = 2**63  # integers must fit in int64 (the arrow schemas' type)


def _safe(text: str, limit: int) -> str:
    """``text`` truncated to ``limit`` chars and made UTF-8 encodable (lone surrogates escaped)."""
    if len(text) > limit:
        text = text[:limit] + f"...[{len(text) - limit} more chars]"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class EventError(ValueError):
    """An event could not be decoded; the message names the field and the problem.

    Field and problem come partly from untrusted input, so both are truncated and made
    UTF-8 encodable: the message is always safe to log or to put in a DeadLetter.
    """

    def __init__(self, kind: str, field_name: str, problem: str):
        self.kind, self.field, self.problem = kind, _safe(field_name, 200), _safe(problem, 1000)
        super().__init__(f"{kind}.{self.field}: {self.problem}")


def _now() -> float:
    return time.time()


def _show(value: Any) -> str:
    """A short, always-printable description of an untrusted value for error messages."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _check_str(kind: str, name: str, value: str) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EventError(kind, name, f"not valid UTF-8: lone surrogate at char {e.start}") from None
    return value


def _check_int(kind: str, name: str, value: int) -> int:
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise EventError(kind, name, f"integer out of int64 range ({value.bit_length()} bits)")
    return value


def _check_float(kind: str, name: str, value: float) -> float:
    if not math.isfinite(value):
        raise EventError(kind, name, f"non-finite number {value!r}")
    return value


def _check_json(kind: str, name: str, value: Any) -> Any:
    """Check a free-form value: JSON types only, finite numbers, int64 ints, UTF-8 strings, bounded depth."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            _check_int(kind, name, v)
        elif isinstance(v, float):
            _check_float(kind, name, v)
        elif isinstance(v, str):
            _check_str(kind, name, v)
        elif isinstance(v, (list, dict)):
            if depth >= MAX_DEPTH:
                raise EventError(kind, name, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(v, dict):
                for k in v:
                    if not isinstance(k, str):
                        raise EventError(kind, name, f"object key must be a string, got {_show(k)}")
                    _check_str(kind, name, k)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)
        else:
            raise EventError(kind, name, f"not a JSON value: {_show(v)}")
    return value


def _reject_constant(name: str) -> Any:
    raise EventError("Event", "<root>", f"not valid JSON: {name} is not a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # two readers could see two different events: refuse both
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise EventError("Event", dup, "duplicate key")
    return obj


def _loads(kind: str, data: Any) -> Any:
    """Parse one encoded event (bytes/str); every failure is an :class:`EventError`."""
    if data is None:
        raise EventError(kind, "<root>", "empty record (a Kafka tombstone)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_EVENT_BYTES:
            raise EventError(kind, "<root>", f"{len(data)} bytes > limit {MAX_EVENT_BYTES}")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise EventError(kind, "<root>", f"not valid UTF-8: {e.reason} at byte {e.start}") from None
    elif not isinstance(data, str):
        raise EventError(kind, "<root>", f"expected bytes or str, got {type(data).__name__}")
    elif len(data) > MAX_EVENT_BYTES:
        raise EventError(kind, "<root>", f"{len(data)} chars > limit {MAX_EVENT_BYTES}")
    try:
        return json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except EventError as e:
        raise EventError(kind, e.field, e.problem) from None
    except RecursionError:
        raise EventError(kind, "<root>", "not valid JSON: nesting too deep") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than sys.get_int_max_str_digits()
        raise EventError(kind, "<root>", f"not valid JSON: {e}") from None


def _guarded(kind: str, decode: typing.Callable[[], E]) -> E:
    """Run a decode step so that it raises nothing but :class:`EventError`.

    The checks above reject bad input explicitly; this is the backstop for whatever they miss
    (an exception from a ``__post_init__``, say), so callers need to catch only ``EventError``.
    """
    try:
        return decode()
    except EventError:
        raise
    except Exception as e:  # the decode contract: any input failure is an EventError
        raise EventError(kind, "<root>", f"rejected ({type(e).__name__}): {e}") from e


def _check(kind: str, name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (nested dataclasses decoded)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(kind, name, value, arg)
            except EventError as e:
                errors.append(e.problem)
        raise EventError(kind, name, "; ".join(errors))
    if origin is list:
        if not isinstance(value, list):
            raise EventError(kind, name, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_check(kind, f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise EventError(kind, name, f"expected an object, got {type(value).__name__}")
        kt, vt = typing.get_args(tp)
        return {_check(kind, name, k, kt): _check(kind, f"{name}.{k}", v, vt) for k, v in value.items()}
    if tp is Any:
        return _check_json(kind, name, value)
    if isinstance(tp, type) and issubclass(tp, Nested):
        if not isinstance(value, dict):
            raise EventError(kind, name, f"expected an object, got {type(value).__name__}")
        return tp._decode_fields(value, f"{kind}.{name}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventError(kind, name, f"expected a number, got {type(value).__name__}")
        if isinstance(value, int):
            _check_int(kind, name, value)
        return _check_float(kind, name, float(value))
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EventError(kind, name, f"expected an integer, got {type(value).__name__}")
        return _check_int(kind, name, value)
    if tp is str:
        if not isinstance(value, str):
            raise EventError(kind, name, f"expected str, got {type(value).__name__}")
        return _check_str(kind, name, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise EventError(kind, name, f"expected bool, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} on {kind}.{name}")


class Nested:
    """A dataclass embedded inside events (decoded field by field)."""

    @classmethod
    def _decode_fields(cls, obj: dict, kind: str):
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        extra = [k for k in obj if k not in known]
        if extra:
            names = sorted(k if isinstance(k, str) else _show(k) for k in extra)
            raise EventError(kind, names[0], "unknown field")
        kwargs = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in obj:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise EventError(kind, f.name, "missing required field")
                continue
            kwargs[f.name] = _check(kind, f.name, obj[f.name], hints[f.name])
        return _guarded(kind, lambda: cls(**kwargs))


class Event(Nested):
    """Base of all events: ``kind`` + ``schema_version`` + typed fields."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = MAX_EVENT_BYTES
    """Largest encoding of this kind: decoders reject (and ``streams.kafka.publish`` refuses) more,
    checked after parsing, before the costly field checks."""

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "schema_version": self.VERSION, **asdict(self)}  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_dict(cls, obj: Any) -> typing.Self:
        """Decode a parsed event; any problem with ``obj`` raises :class:`EventError` (only)."""
        return _guarded(cls.KIND, lambda: cls._from_dict(obj))

    @classmethod
    def _from_dict(cls, obj: Any) -> typing.Self:
        if not isinstance(obj, dict):
            raise EventError(cls.KIND, "<root>", f"expected a JSON object, got {type(obj).__name__}")
        obj = dict(obj)
        kind = obj.pop("kind", cls.KIND)
        if not isinstance(kind, str) or kind != cls.KIND:
            raise EventError(cls.KIND, "kind", f"expected {cls.KIND!r}, got {_show(kind)}")
        version = obj.pop("schema_version", None)
        if type(version) is not int or version != cls.VERSION:
            raise EventError(
                cls.KIND, "schema_version", f"unsupported version {_show(version)} (this reader knows {cls.VERSION})"
            )
        return cls._decode_fields(obj, cls.KIND)

    @classmethod
    def from_json(cls, data: str | bytes) -> typing.Self:
        """Decode one encoded event (UTF-8 JSON, at most ``MAX_BYTES``); raises only EventError."""
        obj = _loads(cls.KIND, data)
        _check_size(cls, data)
        return cls.from_dict(obj)


@dataclass(slots=True, kw_only=True)
class RawRecord(Event):
    """What producers send on raw.*: exactly one of text, uri, data_b64."""

    KIND: ClassVar[str] = "RawRecord"
    id: str
    modality: str
    source: str
    license: str
    text: str | None = None
    uri: str | None = None
    data_b64: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise EventError(self.KIND, "modality", f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if not self.id:
            raise EventError(self.KIND, "id", "must be a non-empty string")
        payloads = [n for n in ("text", "uri", "data_b64") if getattr(self, n) is not None]
        if len(payloads) != 1:
            raise EventError(self.KIND, "payload", f"exactly one of text, uri, data_b64 required, got {payloads or 'none'}")
        if self.modality == "text" and self.text is None and self.data_b64 is None and self.uri is None:
            raise EventError(self.KIND, "text", "text records need a payload")

    @classmethod
    def from_dict(cls, obj: Any) -> RawRecord:
        # Producers may omit kind/schema_version on raw records; default them.
        if isinstance(obj, dict):
            obj = {"kind": cls.KIND, "schema_version": cls.VERSION, **obj}
        return Event.from_dict.__func__(cls, obj)  # slots dataclasses break zero-arg super()

    def payload_bytes(self) -> bytes:
        """The inline payload as bytes (text as UTF-8, data_b64 decoded); uri records raise."""
        if self.text is not None:
            return self.text.encode("utf-8")
        if self.data_b64 is not None:
            try:
                return base64.b64decode(self.data_b64, validate=True)
            except (binascii.Error, ValueError) as e:
                raise EventError(self.KIND, "data_b64", f"invalid base64: {e}") from None
        raise EventError(self.KIND, "uri", "payload is by URI; read it with a media reader")


@dataclass(slots=True, kw_only=True)
class DeadLetter(Event):
    """A record that could not be processed: why, where, and its original bytes.

    The bytes are capped (:attr:`KEEP_BYTES`) so any dead letter fits a Kafka message:
    ``original_b64`` holds the first ``KEEP_BYTES`` bytes, ``original_size`` and
    ``original_sha256`` describe the whole original (``truncated`` says whether it was cut).
    """

    KIND: ClassVar[str] = "DeadLetter"
    KEEP_BYTES: ClassVar[int] = 64 * 1024
    MAX_DETAIL: ClassVar[int] = 2000
    MAX_ID: ClassVar[int] = 512
    reason: str
    stage: str
    original_b64: str
    record_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    detail: str = ""
    original_size: int = -1  # -1: not recorded (dead letters written before the cap existed)
    original_sha256: str = ""
    truncated: bool = False
    created_at: float = field(default_factory=_now)

    @classmethod
    def of(cls, original: bytes, *, reason: str, stage: str, detail: str = "", record_id: str | None = None,
           redact: Callable[[bytes], bytes] | None = None, **kw: Any) -> DeadLetter:
        """A dead letter keeping at most :attr:`KEEP_BYTES` of ``original`` plus its size and SHA-256.

        ``redact`` (e.g. a PII scrubber) rewrites the kept copy before it is stored; size and SHA-256
        always describe the unredacted original, so a takedown can still match it by hash.
        """
        original = bytes(original)
        stored = redact(original) if redact is not None else original
        kept = stored[: cls.KEEP_BYTES]
        clean = lambda s, n: s[:n].encode("utf-8", "backslashreplace").decode()  # lone surrogates -> \\udxxx
        return cls(
            original_b64=base64.b64encode(kept).decode(), reason=reason, stage=stage,
            detail=clean(detail, cls.MAX_DETAIL), record_id=None if record_id is None else clean(record_id, cls.MAX_ID),
            original_size=len(original),
            original_sha256=hashlib.sha256(original).hexdigest(), truncated=len(kept) < len(stored), **kw,
        )

    def original(self) -> bytes:
        """The kept bytes: the whole original unless :attr:`truncated`."""
        return base64.b64decode(self.original_b64)


@dataclass(slots=True, kw_only=True)
class TokenizedSample(Event):
    """One tokenized document/media item: the row written to an MDS stream."""

    KIND: ClassVar[str] = "TokenizedSample"
    id: str
    domain: str
    modality: str
    tokens: list[int]
    source: str
    license: str
    pipeline_version: str
    language: str = ""
    tokenizer_version: str = ""
    vocab_version: str = ""
    produced_at: float = field(default_factory=_now)
    lineage: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class OffsetRange(Nested):
    """A half-open Kafka offset range [start, end) on one partition."""

    topic: str
    partition: int
    start: int
    end: int


@dataclass(slots=True, kw_only=True)
class ShardPublished(Event):
    """A sealed MDS shard became visible in a stream root."""

    KIND: ClassVar[str] = "ShardPublished"
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    stream_root: str
    shard: str
    domain: str
    samples: int
    bytes: int
    vocab_version: str
    writer_id: str
    settled: list[OffsetRange] = field(default_factory=list)
    published_at: float = field(default_factory=_now)


@dataclass(slots=True, kw_only=True)
class CheckpointSaved(Event):
    """The trainer saved a DCP checkpoint."""

    KIND: ClassVar[str] = "CheckpointSaved"
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    run_id: str
    path: str
    step: int
    tokens: int
    vocab_version: str
    tokenizer_version: str = ""
    discretizer_version: str = ""
    data_cursor: dict[str, Any] = field(default_factory=dict)
    wall_time: float = field(default_factory=_now)
    #: what the weights were trained on so far, e.g. ``{"tokens_by_source": {source: tokens}}``
    lineage: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class EvalReport(Event):
    """Evaluation results of one checkpoint on one suite (or the error that prevented them)."""

    KIND: ClassVar[str] = "EvalReport"
    run_id: str
    step: int
    checkpoint_path: str
    suite: str
    vocab_version: str
    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=_now)


@dataclass(slots=True, kw_only=True)
class Alert(Event):
    """Something an on-call engineer or an automatic hook must act on."""

    KIND: ClassVar[str] = "Alert"
    MAX_BYTES: ClassVar[int] = SMALL_EVENT_BYTES
    rule: str
    severity: str
    message: str
    source: str
    dedup_key: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    alert_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.severity not in ("info", "warning", "critical"):
            raise EventError(self.KIND, "severity", f"expected info|warning|critical, got {self.severity!r}")


CONTROL_COMMANDS = (
    "rollback",
    "pause_domain",
    "resume_domain",
    "quarantine_shards",
    "quarantine_source",
    "pause_source",
    "resume_source",
)


@dataclass(slots=True, kw_only=True)
class Control(Event):
    """A command on the control topic (rollback, pause/resume, quarantine).

    Version 2 adds ``key_id`` and ``signature``: consumers accept only controls signed by a key
    of the keyring (``streams.signing``), and ``issued_by`` equals the signing ``key_id``.
    """

    KIND: ClassVar[str] = "Control"
    MAX_BYTES: ClassVar[int] = SMALL_EVENT_BYTES
    VERSION: ClassVar[int] = 2
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    issued_by: str = ""
    control_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    issued_at: float = field(default_factory=_now)
    key_id: str = ""
    signature: str = ""

    def __post_init__(self) -> None:
        if self.command not in CONTROL_COMMANDS:
            raise EventError(self.KIND, "command", f"unknown command {self.command!r}; expected one of {CONTROL_COMMANDS}")


@dataclass(slots=True, kw_only=True)
class MetricsEvent(Event):
    """A batch of named numeric metrics from one component."""

    KIND: ClassVar[str] = "MetricsEvent"
    MAX_BYTES: ClassVar[int] = SMALL_EVENT_BYTES
    component: str
    values: dict[str, float]
    step: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=_now)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.KIND: cls
    for cls in (RawRecord, DeadLetter, TokenizedSample, ShardPublished, CheckpointSaved, EvalReport, Alert, Control, MetricsEvent)
}


def decode_event(data: str | bytes | dict | None) -> Event:
    """Decode any event by its ``kind`` field.

    Whatever ``data`` is (a tombstone ``None``, bytes that are not UTF-8 or not JSON, huge
    integers, NaN, deep nesting, lone surrogates, wrong types), the only exception raised is
    :class:`EventError`, so a consumer loop needs exactly one ``except``.
    """
    encoded = data
    if not isinstance(data, dict):
        data = _loads("Event", data)
    if not isinstance(data, dict):
        raise EventError("Event", "<root>", f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise EventError("Event", "kind", f"unknown event kind {_show(kind)}")
    if not isinstance(encoded, dict):
        _check_size(EVENT_TYPES[kind], encoded)
    return EVENT_TYPES[kind].from_dict(data)


def _check_size(cls: type[Event], data: str | bytes) -> None:
    """The kind's own limit (``MAX_BYTES``), before its fields are checked."""
    if len(data) > cls.MAX_BYTES:
        unit = "chars" if isinstance(data, str) else "bytes"
        raise EventError(cls.KIND, "<root>", f"{len(data)} {unit} > limit {cls.MAX_BYTES} for {cls.KIND}")


def _arrow_type(tp: Any) -> pa.DataType:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arrow_type(inner)
    if origin is list:
        (item,) = typing.get_args(tp)
        return pa.list_(pa.int32() if item is int else _arrow_type(item))
    if origin is dict or tp is Any:
        return pa.string()  # JSON-encoded
    if isinstance(tp, type) and issubclass(tp, Nested):
        hints = typing.get_type_hints(tp)
        return pa.struct([(f.name, _arrow_type(hints[f.name])) for f in fields(tp)])  # type: ignore[arg-type]
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}[tp]


def arrow_schema(cls: type[Event]) -> pa.Schema:
    """The pyarrow schema of an event type (dict fields are JSON strings), tagged with its version."""
    hints = typing.get_type_hints(cls)
    cols = [pa.field(f.name, _arrow_type(hints[f.name])) for f in fields(cls)]  # type: ignore[arg-type]
    return pa.schema(cols, metadata={"kind": cls.KIND, "schema_version": str(cls.VERSION)})
