"""Source binding: each producer credential may only write the sources bound to it.

A producer is identified either by its Kafka principal or by a signed record header:

- **SASL**: Kafka does not stamp records with the writer's principal, so the binding goes through
  the topic: each raw topic is writable by one principal (a broker ACL, see docs/OPERATIONS.md),
  and ``topics`` maps the topic to that principal.
- **No SASL**: the producer signs the record value with its Ed25519 producer key
  (:func:`sign_record`, :mod:`streams.signing` primitives) and sends ``hw-producer`` (key id) and
  ``hw-sig`` headers; ``producer_keys`` maps the key id to its public key and principal.

``principals`` maps each principal to the sources it may write (compared after
:func:`streams.source_names.canonical_source`; ``"*"`` allows any). With ``mode = "enforce"`` a
record whose source is not bound to its producer is dead-lettered ``source_not_bound``; ``"off"``
(the default, for the local demo) checks nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from streams.signing import SigningKey, sign_bytes, verify_bytes
from streams.source_names import canonical_source

__all__ = ["PRODUCER_HEADER", "SIGNATURE_HEADER", "SourceBinding", "sign_record"]

PRODUCER_HEADER = "hw-producer"
SIGNATURE_HEADER = "hw-sig"
_CONTEXT = b"headwater-record\n"  # domain separation: a record signature is never a control signature

Headers = Sequence[tuple[str, bytes]]


def sign_record(key: SigningKey, value: bytes) -> list[tuple[str, bytes]]:
    """The Kafka headers a producer without SASL sends with ``value``."""
    return [(PRODUCER_HEADER, key.key_id.encode()), (SIGNATURE_HEADER, sign_bytes(key, _CONTEXT + value).encode())]


@dataclass(kw_only=True, slots=True)
class SourceBinding:
    """Principal -> allowed sources, and how a record's principal is established."""

    mode: str = "off"  # "enforce" | "off"
    principals: dict[str, list[str]] = field(default_factory=dict)
    topics: dict[str, str] = field(default_factory=dict)  # raw topic -> its only writer principal (SASL + ACL)
    producer_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # key id -> {public_key, principal}

    def __post_init__(self) -> None:
        if self.mode not in ("enforce", "off"):
            raise ValueError(f"source binding mode must be 'enforce' or 'off', got {self.mode!r}")

    @classmethod
    def load(cls, path: str) -> SourceBinding:
        """A binding from a JSON file with the fields of this class."""
        with open(path) as f:
            return cls(**json.load(f))

    def principal_of(self, *, topic: str, headers: Headers = (), value: bytes = b"") -> str | None:
        """The principal that wrote a record: its signed header's, else its topic's, else None."""
        h = {k: v for k, v in headers}
        if PRODUCER_HEADER in h:
            key_id = h[PRODUCER_HEADER].decode("utf-8", "replace")
            entry = self.producer_keys.get(key_id)
            sig = h.get(SIGNATURE_HEADER, b"").decode("ascii", "replace")
            if entry is None or not verify_bytes(entry["public_key"], _CONTEXT + bytes(value), sig):
                return None
            return entry["principal"]
        return self.topics.get(topic)

    def violation(self, source: str, *, topic: str, headers: Headers = (), value: bytes = b"") -> str | None:
        """Why ``source`` may not be written by this record's producer, or None when it may."""
        if self.mode == "off":
            return None
        principal = self.principal_of(topic=topic, headers=headers, value=value)
        if principal is None:
            return f"no verified producer for topic {topic!r} (no bound topic, no valid signed header)"
        allowed = {canonical_source(s) for s in self.principals.get(principal, [])}
        if "*" in allowed or canonical_source(source) in allowed:
            return None
        return f"principal {principal!r} is not bound to source {source[:80]!r}"

