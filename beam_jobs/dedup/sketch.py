"""The bounded per-document state of the text near-dup index: a :class:`Sketch`.

A kept document is remembered by its id hash, a hash of its Kafka coordinates, the LSH band
keys of its MinHash signature (to find it) and a small Bloom filter of its shingle hashes
(to verify it): no text, no shingles. A new document, whose full shingle set is at hand,
is verified against a candidate by testing each of its shingles in the candidate's filter:
the match count, corrected for the filter's false-positive rate, estimates the intersection
and so the Jaccard similarity far more tightly than comparing two signatures of the same
size (~0.005 standard error at 150 shingles vs 0.035 for 128 MinHash values).

Documents with more shingles than the filter has bits are sub-sampled consistently by hash
(``q`` = a power of two), and the new document is sampled the same way before testing.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import numpy as np
import xxhash

__all__ = ["Sketch", "coords_hash", "estimate_jaccard", "id_hash", "make_sketch", "sample_shingles"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_HEAD = struct.Struct("<QIIHB")  # id hash, coords hash, added (unix s), sampled shingles, log2 q


def id_hash(doc_id: str) -> int:
    """64-bit hash of a record id (the identity used for "never a duplicate of itself")."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=0x1D)


def coords_hash(topic: str, partition: int, offset: int) -> int:
    """32-bit hash of (topic, partition, offset): the record's other identity."""
    return xxhash.xxh32_intdigest(f"{topic}\x00{partition}\x00{offset}".encode("utf-8", "surrogatepass"))


def _mix(hashes: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint32 shingle hashes: independent-looking 64-bit values."""
    x = hashes.astype(np.uint64) * _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    return x ^ (x >> np.uint64(31))


def _q_for(n: int, bits: int) -> int:
    """log2 of the sampling divisor that keeps at most ``bits`` shingles."""
    lq = 0
    while n >> lq > bits:
        lq += 1
    return lq


def sample_shingles(hashes: np.ndarray, log2_q: int) -> np.ndarray:
    """The consistent 1/2**log2_q sample of shingle hashes (all of them for 0)."""
    if log2_q == 0:
        return hashes
    return hashes[(_mix(hashes) >> np.uint64(40)) & np.uint64((1 << log2_q) - 1) == 0]


def _k_for(n: int, bits: int) -> int:
    return max(1, min(8, round(bits / max(1, n) * math.log(2))))


def _positions(hashes: np.ndarray, k: int, bits: int) -> np.ndarray:
    x = _mix(hashes)
    h1, h2 = x & np.uint64(0xFFFFFFFF), (x >> np.uint64(32)) | np.uint64(1)
    return (h1[:, None] + np.arange(k, dtype=np.uint64)[None, :] * h2[:, None]) % np.uint64(bits)


class Sketch(NamedTuple):
    """What the index keeps per document (``bands`` live in the bucket tables, not here)."""

    idh: int  # id_hash(doc id)
    coordh: int  # coords_hash(topic, partition, offset)
    added: int  # unix seconds when indexed (the age horizon)
    n: int  # shingles in the (sampled) filter
    log2_q: int  # sampling divisor of the filter
    bloom: bytes

    def to_bytes(self) -> bytes:
        return _HEAD.pack(self.idh, self.coordh, self.added, self.n, self.log2_q) + self.bloom

    @classmethod
    def from_bytes(cls, data: bytes) -> Sketch:
        return cls(*_HEAD.unpack_from(data), bytes(data[_HEAD.size:]))


def make_sketch(idh: int, coordh: int, shingles: np.ndarray, bloom_bytes: int, added: int = 0) -> Sketch:
    """The sketch of a document with sorted unique uint32 shingle hashes ``shingles``."""
    bits = bloom_bytes * 8
    lq = _q_for(len(shingles), bits)
    sampled = sample_shingles(shingles, lq)
    filt = np.zeros(bits, dtype=bool)
    if len(sampled):
        filt[_positions(sampled, _k_for(len(sampled), bits), bits).ravel()] = True
    return Sketch(idh, coordh, added, len(sampled), lq, np.packbits(filt).tobytes())


def estimate_jaccard(sketch: Sketch, shingles: np.ndarray) -> float:
    """Jaccard similarity of the sketched document and one with shingle hashes ``shingles``."""
    n, log2_q, bloom = sketch.n, sketch.log2_q, sketch.bloom
    bits = len(bloom) * 8
    sampled = sample_shingles(shingles, log2_q)
    if n == 0 or len(sampled) == 0:
        return 1.0 if n == len(sampled) else 0.0
    filt = np.unpackbits(np.frombuffer(bloom, dtype=np.uint8)).astype(bool)
    k = _k_for(n, bits)
    matches = int(filt[_positions(sampled, k, bits)].all(axis=1).sum())
    fp = float(filt.mean()) ** k
    inter = min(max((matches - fp * len(sampled)) / (1.0 - fp), 0.0), float(min(n, len(sampled))))
    return inter / (n + len(sampled) - inter)
