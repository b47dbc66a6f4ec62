"""Dedup as Beam transforms: fingerprint (stateless, parallel) then check against keyed state.

Documents are keyed by a coarse shard key (language by default), so each key's
index lives in Beam keyed state: a bag of the fingerprints kept for that key.
A worker caches the index in memory: seeded from the documents already published
in the stream root (the snapshot that agrees with the settled offsets), plus the bag.
The cache is rebuilt when the bag's count says it is stale (the key moved between
workers); a new pipeline of the same ingest process (a new ``epoch``: the next
micro-batch) keeps it and only reads the shards published since.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec

from beam_jobs.dedup.index import DedupConfig, DedupIndex, fingerprint
from beam_jobs.records import Doc

__all__ = ["Dedup", "SeedFn", "release", "shard_key"]

class SeedFn(Protocol):
    """Reads (shard, shard_key, doc_id, text) of published documents in shards not skipped."""

    def read(self, skip_shards: Iterable[str] = ()) -> Iterable[tuple[str, str, str, str]]: ...


@dataclass(slots=True)
class _Cached:
    epoch: str
    indexes: dict[str, DedupIndex]  # shard key -> index (every key of this token shares the seed)
    seeded: set[str]  # published shards already in the indexes


# Per-process caches, keyed by the transform's token so that DoFn re-instantiation keeps them.
_CACHE: dict[str, _Cached] = {}
_COUNTS: dict[tuple[str, str], int] = {}
_EMBEDDERS: dict[str | None, object] = {}


def release(token: str) -> None:
    """Forget the in-process index of ``token``: after a failed micro-batch whose kept documents
    were never published, the next batch must start from a fresh token seeded from the stream."""
    _CACHE.pop(token, None)
    for k in [k for k in _COUNTS if k[0] == token]:
        del _COUNTS[k]


def shard_key(doc: Doc, how: str) -> str:
    """The coarse key that partitions the dedup index."""
    if how == "language":
        return doc.language or "und"
    if how == "source":
        return doc.source
    if how == "source_language":
        return f"{doc.source}/{doc.language or 'und'}"
    if how == "none":
        return "all"
    raise ValueError(f"unknown dedup shard_key {how!r}")


def _embedder(config: DedupConfig):
    if config.semantic_model not in _EMBEDDERS:
        from beam_jobs.dedup.semantic import MiniLMEmbedder

        _EMBEDDERS[config.semantic_model] = MiniLMEmbedder(config.semantic_model)
    return _EMBEDDERS[config.semantic_model]


def _new_index(config: DedupConfig) -> DedupIndex:
    index = DedupIndex(config)
    if config.semantic:
        from beam_jobs.dedup.semantic import SemanticIndex

        index.semantic = SemanticIndex(_embedder(config).dim)
    return index


class _FingerprintFn(beam.DoFn):
    def __init__(self, config: DedupConfig):
        self.config = config

    def setup(self):
        self.hasher = self.config.hasher()

    def process(self, doc: Doc):
        key = shard_key(doc, self.config.shard_key)
        if doc.dropped is not None:
            yield key, (doc, None)
            return
        emb = _embedder(self.config).embed([doc.text])[0] if self.config.semantic else None
        yield key, (doc, fingerprint(doc.id, doc.text, self.config, self.hasher, emb))


class _CheckFn(beam.DoFn):
    KEPT = BagStateSpec("kept", PickleCoder())
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())

    def __init__(self, config: DedupConfig, token: str, epoch: str, seed: SeedFn | None):
        self.config, self.token, self.epoch, self.seed = config, token, epoch, seed
        self.n_in = Metrics.counter("dedup", "in")
        self.n_out = Metrics.counter("dedup", "out")

    def _add_seed(self, cached: _Cached) -> None:
        """Add documents of shards published since the last call."""
        if self.seed is None:
            return
        hasher = self.config.hasher()
        for shard, key, doc_id, text in self.seed.read(skip_shards=cached.seeded):
            if key not in cached.indexes:
                cached.indexes[key] = _new_index(self.config)
            emb = _embedder(self.config).embed([text])[0] if self.config.semantic else None
            index = cached.indexes[key]
            fp = fingerprint(doc_id, text, self.config, hasher, emb)
            if index.check(fp) is None:  # kept earlier in this process: already indexed
                index.add(fp)
            cached.seeded.add(shard)

    def _index(self, key: str, kept, count_state) -> DedupIndex:
        count = count_state.read() or 0
        cached = _CACHE.get(self.token)
        if cached is None:
            cached = _CACHE[self.token] = _Cached(self.epoch, {}, set())
            self._add_seed(cached)
        elif cached.epoch != self.epoch:  # next pipeline of this process: catch up with the stream
            cached.epoch = self.epoch
            for k in [k for k in _COUNTS if k[0] == self.token]:
                del _COUNTS[k]
            self._add_seed(cached)
        index = cached.indexes.setdefault(key, _new_index(self.config))
        if _COUNTS.get((self.token, key), 0) != count:  # state this worker has not seen (key moved)
            for fp in kept.read():
                if index.check(fp) is None:
                    index.add(fp)
            _COUNTS[(self.token, key)] = count
        return index

    def process(self, element, kept=beam.DoFn.StateParam(KEPT), count_state=beam.DoFn.StateParam(COUNT)):  # noqa: B008
        key, (doc, fp) = element
        if fp is None:
            yield doc
            return
        self.n_in.inc()
        index = self._index(key, kept, count_state)
        hit = index.check_and_add(fp)
        if hit is None:
            kept.add(fp)
            count = (count_state.read() or 0) + 1
            count_state.write(count)
            _COUNTS[(self.token, key)] = count
            self.n_out.inc()
            yield doc
            return
        kind, original = hit
        Metrics.counter("dedup", f"drop_{kind}").inc()
        doc.lineage["dup_of"] = original
        yield doc.drop("dedup", kind)


class Dedup(beam.PTransform):
    """Docs -> Docs with duplicates marked dropped (``lineage['dup_of']`` points to the kept original)."""

    def __init__(self, config: DedupConfig | None = None, *, seed: SeedFn | None = None, token: str | None = None):
        """``token`` names the in-process index cache: pass the same token to the pipelines of
        successive micro-batches of one ingest process so they extend one index."""
        super().__init__()
        self.config = config or DedupConfig()
        self.seed = seed
        self.token = token or uuid.uuid4().hex
        self.epoch = uuid.uuid4().hex

    def expand(self, docs):
        return (
            docs
            | "Fingerprint" >> beam.ParDo(_FingerprintFn(self.config))
            | "CheckAgainstIndex" >> beam.ParDo(_CheckFn(self.config, self.token, self.epoch, self.seed))
        )
