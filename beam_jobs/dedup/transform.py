"""Dedup as Beam transforms: fingerprint (stateless, parallel) then check against keyed state.

Documents are keyed by a coarse shard key (language by default), so each key's
index lives in Beam keyed state: a bag of the fingerprints kept for that key.
A worker caches the index built from the bag in memory and rebuilds it when the
bag's count says the cache is stale (the key moved between workers) or after a
restart, where the index is first seeded from the documents already published.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec

from beam_jobs.dedup.index import DedupConfig, DedupIndex, Fingerprint, fingerprint
from beam_jobs.records import Doc

__all__ = ["Dedup", "shard_key", "SeedFn"]

#: Returns (shard_key, doc_id, text) of every document already published (restart seed).
SeedFn = Callable[[], Iterable[tuple[str, str, str]]]

# Per-process caches, keyed by the transform's token so that DoFn re-instantiation keeps them.
_INDEXES: dict[tuple[str, str], tuple[int, DedupIndex]] = {}
_SEEDS: dict[str, dict[str, list[Fingerprint]]] = {}
_EMBEDDERS: dict[str | None, object] = {}


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

    def __init__(self, config: DedupConfig, token: str, seed: SeedFn | None):
        self.config, self.token, self.seed = config, token, seed
        self.n_in = Metrics.counter("dedup", "in")
        self.n_out = Metrics.counter("dedup", "out")

    def _seed_for(self, key: str) -> list[Fingerprint]:
        if self.token not in _SEEDS:
            by_key: dict[str, list[Fingerprint]] = {}
            if self.seed is not None:
                hasher = self.config.hasher()
                for k, doc_id, text in self.seed():
                    emb = _embedder(self.config).embed([text])[0] if self.config.semantic else None
                    by_key.setdefault(k, []).append(fingerprint(doc_id, text, self.config, hasher, emb))
            _SEEDS[self.token] = by_key
        return _SEEDS[self.token].get(key, [])

    def _index(self, key: str, kept, count_state) -> DedupIndex:
        count = count_state.read() or 0
        cached = _INDEXES.get((self.token, key))
        if cached is not None and cached[0] == count:
            return cached[1]
        index = _new_index(self.config)
        for fp in self._seed_for(key):
            index.add(fp)
        for fp in kept.read():
            index.add(fp)
        _INDEXES[(self.token, key)] = (count, index)
        return index

    def process(self, element, kept=beam.DoFn.StateParam(KEPT), count_state=beam.DoFn.StateParam(COUNT)):
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
            _INDEXES[(self.token, key)] = (count, index)
            self.n_out.inc()
            yield doc
            return
        kind, original = hit
        Metrics.counter("dedup", f"drop_{kind}").inc()
        doc.lineage["dup_of"] = original
        yield doc.drop("dedup", kind)


class Dedup(beam.PTransform):
    """Docs -> Docs with duplicates marked dropped (``lineage['dup_of']`` points to the kept original)."""

    def __init__(self, config: DedupConfig | None = None, *, seed: SeedFn | None = None):
        super().__init__()
        self.config = config or DedupConfig()
        self.seed = seed
        self.token = uuid.uuid4().hex

    def expand(self, docs):
        return (
            docs
            | "Fingerprint" >> beam.ParDo(_FingerprintFn(self.config))
            | "CheckAgainstIndex" >> beam.ParDo(_CheckFn(self.config, self.token, self.seed))
        )
