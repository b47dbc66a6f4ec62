"""Versioned event contracts: dataclasses, their JSON codec and pyarrow schemas.

Every event serialises to a JSON object carrying ``kind`` and ``schema_version``.
Decoding checks both and every field's type, and raises :class:`EventError`
naming the offending field, so a malformed or future event is never half-read.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import types
import typing
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

__all__ = [
    "EVENT_TYPES",
    "MODALITIES",
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


class EventError(ValueError):
    """An event could not be decoded; the message names the field and the problem."""

    def __init__(self, kind: str, field_name: str, problem: str):
        self.kind, self.field, self.problem = kind, field_name, problem
        super().__init__(f"{kind}.{field_name}: {problem}")


def _now() -> float:
    return time.time()


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
        return value
    if isinstance(tp, type) and issubclass(tp, Nested):
        if not isinstance(value, dict):
            raise EventError(kind, name, f"expected an object, got {type(value).__name__}")
        return tp._decode_fields(value, f"{kind}.{name}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventError(kind, name, f"expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EventError(kind, name, f"expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise EventError(kind, name, f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} on {kind}.{name}")


class Nested:
    """A dataclass embedded inside events (decoded field by field)."""

    @classmethod
    def _decode_fields(cls, obj: dict, kind: str):
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        extra = set(obj) - known
        if extra:
            raise EventError(kind, min(extra), "unknown field")
        kwargs = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in obj:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise EventError(kind, f.name, "missing required field")
                continue
            kwargs[f.name] = _check(kind, f.name, obj[f.name], hints[f.name])
        return cls(**kwargs)


class Event(Nested):
    """Base of all events: ``kind`` + ``schema_version`` + typed fields."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "schema_version": self.VERSION, **asdict(self)}  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_dict(cls, obj: Any) -> typing.Self:
        if not isinstance(obj, dict):
            raise EventError(cls.KIND, "<root>", f"expected a JSON object, got {type(obj).__name__}")
        obj = dict(obj)
        kind = obj.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise EventError(cls.KIND, "kind", f"expected {cls.KIND!r}, got {kind!r}")
        version = obj.pop("schema_version", None)
        if version != cls.VERSION:
            raise EventError(
                cls.KIND, "schema_version", f"unsupported version {version!r} (this reader knows {cls.VERSION})"
            )
        return cls._decode_fields(obj, cls.KIND)

    @classmethod
    def from_json(cls, data: str | bytes) -> typing.Self:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EventError(cls.KIND, "<root>", f"not valid JSON: {e}") from None
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
    """A record that could not be processed: why, where, and the original bytes."""

    KIND: ClassVar[str] = "DeadLetter"
    reason: str
    stage: str
    original_b64: str
    record_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    detail: str = ""
    created_at: float = field(default_factory=_now)

    @classmethod
    def of(cls, original: bytes, *, reason: str, stage: str, **kw: Any) -> DeadLetter:
        return cls(original_b64=base64.b64encode(original).decode(), reason=reason, stage=stage, **kw)

    def original(self) -> bytes:
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
    run_id: str
    path: str
    step: int
    tokens: int
    vocab_version: str
    tokenizer_version: str = ""
    discretizer_version: str = ""
    data_cursor: dict[str, Any] = field(default_factory=dict)
    wall_time: float = field(default_factory=_now)


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
    """A command on the control topic (rollback, pause/resume, quarantine)."""

    KIND: ClassVar[str] = "Control"
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    issued_by: str = ""
    control_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    issued_at: float = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.command not in CONTROL_COMMANDS:
            raise EventError(self.KIND, "command", f"unknown command {self.command!r}; expected one of {CONTROL_COMMANDS}")


@dataclass(slots=True, kw_only=True)
class MetricsEvent(Event):
    """A batch of named numeric metrics from one component."""

    KIND: ClassVar[str] = "MetricsEvent"
    component: str
    values: dict[str, float]
    step: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=_now)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.KIND: cls
    for cls in (RawRecord, DeadLetter, TokenizedSample, ShardPublished, CheckpointSaved, EvalReport, Alert, Control, MetricsEvent)
}


def decode_event(data: str | bytes | dict) -> Event:
    """Decode any event by its ``kind`` field."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EventError("Event", "<root>", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EventError("Event", "<root>", "expected a JSON object")
    kind = data.get("kind")
    if kind not in EVENT_TYPES:
        raise EventError("Event", "kind", f"unknown event kind {kind!r}")
    return EVENT_TYPES[kind].from_dict(data)


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
