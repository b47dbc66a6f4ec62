"""Hostile ``raw.*`` records for ingest isolation tests: each labelled with the dead-letter reason it
must get (``None`` for valid records, which must be published or counted as filtered/deduplicated).

:func:`hostile_corpus` is a fixed list of known-nasty records (one per finding of issue 14);
:func:`fuzz_records` generates many more with hypothesis (seeded, generate phase only): valid
records with random safe fields interleaved with records broken in one known way each.
Used by tests/test_ingest_isolation.py and bench/bench_ingest_isolation.py.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from beam_jobs.synthetic import english_doc

__all__ = ["Labelled", "fuzz_records", "hostile_corpus"]

_SAFE_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12).filter(
    lambda s: s[0].isalnum())
_PRINTABLE = st.characters(blacklist_categories=("Cs", "Cc"))  # no surrogates, no control characters


@dataclass(frozen=True, slots=True)
class Labelled:
    """One raw record (``value`` None: a Kafka tombstone) and the DLQ reason it must get (None: valid)."""

    value: bytes | None
    reason: str | None
    label: str
    id: str | None = None


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: lone surrogates travel as \udxxx escapes


def _text(i: str, text: str, **kw) -> dict:
    return {"id": i, "modality": "text", "source": "web", "license": "cc-by", "text": text, **kw}


def _image(i: str, **kw) -> dict:
    return {"id": i, "modality": "image", "source": "web", "license": "cc-by",
            "data_b64": base64.b64encode(b"\x89PNG not really").decode(), **kw}


def hostile_corpus(rng: random.Random, *, big: bool = True) -> list[Labelled]:
    """One record per known-nasty input (``big``: also a ~900 kB record whose uncapped dead letter
    exceeded kafka-python's 1 MiB request limit)."""
    doc = english_doc(rng)
    out = [
        Labelled(b'{"id":"h1","modality":"text","source":"s","license":"l","text":"x","meta":{"n":'
                 + b"7" * 5000 + b"}}", "malformed_json", "integer over 4300 digits"),
        Labelled(_dumps(_text("h2\ud800", doc)), "invalid_utf8", "lone surrogate in id"),
        Labelled(_dumps(_text("h3", doc, source="web\udfff")), "invalid_utf8", "lone surrogate in source"),
        Labelled(_dumps(_text("h4", doc, license="cc\ud83d")), "invalid_utf8", "lone surrogate in license"),
        Labelled(_dumps(_text("h5\x07", doc)), "control_char", "control character in id"),
        Labelled(_dumps(_text("h6", doc, source="web\x1b[31m")), "control_char", "ANSI escape in source"),
        Labelled(_dumps(_text("h7", doc, meta={"k\x00": "v"})), "control_char", "NUL in a meta key"),
        Labelled(_dumps(_text("h8", doc, meta={"note": "a\ud800b"})), "invalid_utf8", "lone surrogate in meta value"),
        Labelled(_dumps(_text("x" * 600, doc)), "field_too_long", "id of 600 chars"),
        Labelled(_dumps(_image("h10", meta={"domain": "../../etc"})), "unsafe_domain", "path in meta.domain"),
        Labelled(_dumps(_image("h11", meta={"domain": "a" * 80})), "unsafe_domain", "80-char meta.domain"),
        Labelled(_dumps(_image("h12", meta={"caption": {"nested": 1}})), "wrong_type", "caption not a string"),
        Labelled(b'{"id":"h13","id":"again","modality":"text","source":"s","license":"l","text":"t"}',
                 "duplicate_field", "duplicate key"),
        Labelled(b'{"id":"h14","modality":"text","source":"s","license":"l","text":"t","meta":'
                 + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json", "deep nesting"),
        Labelled(b"\xff\xfe\xfd\x00", "invalid_utf8", "bytes that are not UTF-8"),
        Labelled(b"[1, 2, 3]", "not_an_object", "JSON array"),
        Labelled(_dumps(_text("h17", "nul \x00 inside")), "nul_in_text", "NUL in text"),
        Labelled(_dumps({**_text("h18", doc), "modality": "smell"}), "unknown_modality", "unknown modality"),
    ]
    if big:
        out.append(Labelled(b'{"id": "h19", "text": "' + b"z" * 900_000, "malformed_json", "900 kB truncated JSON"))
    return out


def _valid(i: int) -> st.SearchStrategy[Labelled]:
    """A valid text record with a unique id, English-like text and random safe fields."""

    def build(doc_seed: int, source: str, license_: str, meta: dict) -> Labelled:
        rid, text = f"v{i}", english_doc(random.Random(f"{i}:{doc_seed}"))  # unique: no dedup drops
        return Labelled(_dumps(_text(rid, text, source=source, license=license_, meta=meta)), None, "valid", rid)

    meta = st.dictionaries(_SAFE_NAME, st.one_of(st.text(_PRINTABLE, max_size=30), st.integers(-10**6, 10**6),
                                                 st.booleans(), st.none()), max_size=3)
    # a few sources: every (source, language) is a domain, and each domain gets its own shard per batch
    sources = st.sampled_from(["web", "books", "news", "forum-2"])
    return st.builds(build, st.integers(0, 2**62), sources, st.text(_PRINTABLE, min_size=1, max_size=20), meta)


def _surrogate() -> st.SearchStrategy[str]:
    return st.integers(0xD800, 0xDFFF).map(chr)


def _control() -> st.SearchStrategy[str]:
    return st.sampled_from([chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]])


def _insert(s: str, ch: str, at: int) -> str:
    at %= len(s) + 1
    return s[:at] + ch + s[at:]


def _hostile(i: int) -> st.SearchStrategy[Labelled]:
    """A record broken in exactly one way (the label says which) and its expected reason."""
    doc = english_doc(random.Random(i))
    field_ = st.sampled_from(["id", "source", "license"])

    def in_field(ch_strategy, reason, label):
        return st.builds(lambda f, ch, at: Labelled(_dumps({**_text(f"b{i}", doc), f: _insert(
            _text(f"b{i}", doc)[f], ch, at)}), reason, f"{label} in {f}"), field_, ch_strategy, st.integers(0, 50))

    nasty_domain = st.text(_PRINTABLE, min_size=1, max_size=90).filter(
        lambda d: not (len(d) <= 64 and d.isascii() and d[0].isalnum() and all(c.isalnum() or c in "-_" for c in d)))
    return st.one_of(
        in_field(_surrogate(), "invalid_utf8", "lone surrogate"),
        in_field(_control(), "control_char", "control character"),
        st.integers(4301, 8000).map(lambda n: Labelled(
            b'{"id":"b%d","modality":"text","source":"s","license":"l","text":"t","meta":{"n":' % i + b"9" * n + b"}}",
            "malformed_json", "huge integer")),
        st.integers(513, 3000).map(lambda n: Labelled(_dumps(_text("i" * n, doc)), "field_too_long", "long id")),
        nasty_domain.map(lambda d: Labelled(_dumps(_image(f"b{i}", meta={"domain": d})), "unsafe_domain",
                                            "unsafe meta.domain")),
        st.tuples(_SAFE_NAME, _surrogate()).map(lambda kv: Labelled(
            _dumps(_text(f"b{i}", doc, meta={kv[0]: "x" + kv[1]})), "invalid_utf8", "surrogate in meta value")),
        st.integers(1, 200).map(lambda cut: Labelled(_dumps(_text(f"b{i}", doc))[:cut], "malformed_json",
                                                     "truncated JSON")),
        st.binary(min_size=1, max_size=64).map(lambda b: Labelled(b"\xff" + b, "invalid_utf8", "binary garbage")),
        st.sampled_from([b"[]", b"42", b'"text"', b"null", b"true"]).map(
            lambda b: Labelled(b, "not_an_object", "JSON non-object")),
        st.text(_PRINTABLE, min_size=1, max_size=10).filter(lambda m: m not in ("text", "audio", "image", "video")).map(
            lambda m: Labelled(_dumps({**_text(f"b{i}", doc), "modality": m}), "unknown_modality", "unknown modality")),
        st.integers(5_000, 50_000).map(lambda d: Labelled(
            _dumps(_text(f"b{i}", doc))[:-1] + b',"meta":{"deep":' + b"[" * d + b"]" * d + b"}}",
            "malformed_json", "deep nesting")),
    )


def fuzz_records(n: int, *, seed_value: int = 0, valid_share: float = 0.3, per_example: int = 8) -> list[Labelled]:
    """``n`` hypothesis-generated records, about ``valid_share`` of them valid, the rest hostile
    (``per_example`` records are drawn per hypothesis example; seeded, so deterministic)."""
    out: list[Labelled] = []
    round_ = 0
    while len(out) < n:

        @seed(seed_value * 1000 + round_)
        @settings(max_examples=max(1, (n - len(out)) // per_example + 1), database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.data())
        def collect(data) -> None:
            batch = []
            for j in range(per_example):
                i = len(out) + j
                valid = data.draw(st.integers(0, 99)) < valid_share * 100
                batch.append(data.draw(_valid(i) if valid else _hostile(i)))
            out.extend(batch)  # only whole batches: a failed draw leaves ``out`` as it was

        collect()
        round_ += 1
    return out[:n]
