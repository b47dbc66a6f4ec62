"""The settled semantic index: embeddings of documents already published (local runner).

Embeddings never go into the training stream. The semantic stage writes the int8 embeddings of
the documents it keeps, per bundle, to a side file ``<stream_root>/_semantic_dedup/pending/
<time>-<uuid>.npz`` (:func:`write_pending`: atomic and fsynced) before the bundle's output can
reach the sink, so before their shards can publish. :func:`sync` (a settlement point, like the
text index's) reads the shards published since the last snapshot (the *tail*) and folds the
pending rows of exactly the documents they hold (matched by id hash) into one immutable
segment; a drop in batch k is therefore caused only by a document published earlier. It then
atomically rewrites ``snapshot.json`` (fsynced after its segments) and trims the side files:
folded rows leave, rows never published (dropped downstream, or a crashed batch) leave after
``grace_s``. A restart maps the segments and reads only the tail. For an object-store root the
``_semantic_dedup`` folder, side files included, lives in this machine's cache
(:func:`~beam_jobs.dedup.snapshot.index_home`) and the purge list in the root, as for the text
index; since embeddings are not in the stream, such a cache holds only the documents this
machine's pipelines kept (another machine's are not compared semantically).

``snapshot.json`` records the embedding model id and dimension: a snapshot of another model,
or one that cannot be read, is set aside with a logged error and rebuilt (empty, plus whatever
pending rows the tail matches) instead of mixing spaces or blocking start-up.

A segment holds per document: the shard key (uint32 slot into the segment's key table, stored
whole in ``meta.json``), id hash, coords hash, id (truncated to ``ID_BYTES``), the quantisation
scale (float32) and the int8 codes (``dim`` bytes): 420 B per document at MiniLM's 384
dimensions. Horizon: at most ``horizon`` documents per shard key; when a key would hold more,
or beyond ``max_segments`` segments, the snapshot is compacted to the newest
``0.8 x horizon`` of each key. So the snapshot is bounded by ``keys x horizon``, whatever the
history. Within one process, the next generation copies the ANN indexes already built and adds
only the tail (until a compaction).

The built ANN index of each key (HNSW, IVF; not flat, whose rebuild is a copy) is persisted as
``ann/<kind>-<key hash>.npz`` (``faiss.serialize_index`` plus a meta record; atomic and
fsynced): when a lookup builds it, and when a sync extends it. The meta names the segments it
covers, the model and dimension, and a digest of the covered rows' id hashes and int8 codes; a
restart's first lookup loads it and adds only the rows of the segments after them. A file that
is missing, unreadable, of another model or kind, or whose digest does not match the snapshot's
rows (a compaction, a reset) is logged and the index rebuilt (then persisted again); a sync
removes the files a compaction left stale. A file is only a cache: it is never needed.

Processes syncing (or purging) one root take turns under ``_semantic_dedup/.lock``
(:func:`~beam_jobs.dedup.snapshot.snapshot_lock`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field

import numpy as np

from beam_jobs.dedup.settled import ID_BYTES
from beam_jobs.dedup.sketch import id_hash
from beam_jobs.dedup.snapshot import (
    PURGED,
    SNAPSHOT,
    ColumnSegment,
    SegmentSet,
    add_purged_to,
    fsync_dir,
    index_home,
    open_generation,
    read_purged_of,
    read_segment,
    read_snapshot,
    read_tail,
    snapshot_lock,
    write_segment,
    write_snapshot,
)

__all__ = ["ANN", "DIRNAME", "PENDING", "PURGED", "SemanticSegment", "SemanticSettledIndex", "SemanticSettledRef", "purge",
           "quantize", "read_generation", "sync", "write_pending"]

log = logging.getLogger(__name__)
DIRNAME = "_semantic_dedup"
PENDING = "pending"
ANN = "ann"  # the persisted ANN index of each shard key
LOCK_WAIT_S = 300.0  # how long a sync or purge waits for another process folding the same root
_COLS = ("idh", "coordh", "ids", "scale", "codes")
_LOCK = threading.Lock()
_OPEN: dict[tuple[str, int], SemanticSettledIndex] = {}


def quantize(vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation: ``(scales, codes)`` with ``vecs ~ codes * scales``."""
    vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
    peak = np.abs(vecs).max(axis=1) if vecs.size else np.zeros(len(vecs), np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return scale, np.clip(np.rint(vecs / scale[:, None]), -127, 127).astype(np.int8)


def _json_array(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode("utf-8", "surrogatepass"), dtype=np.uint8)


def _empty_cols(dim: int = 0) -> dict[str, np.ndarray]:
    return {"names": np.zeros(0, object), "idh": np.zeros(0, np.uint64), "coordh": np.zeros(0, np.uint32),
            "ids": np.zeros(0, f"S{ID_BYTES}"), "scale": np.zeros(0, np.float32), "codes": np.zeros((0, dim), np.int8)}


def _write_npz(path: str, meta: dict, cols: dict[str, np.ndarray]) -> None:
    """``cols`` (``names``: each row's shard key) as the side file ``path``: atomic and fsynced."""
    table = sorted(set(cols["names"].tolist()))
    slot = {k: i for i, k in enumerate(table)}
    arrays = {"key": np.array([slot[k] for k in cols["names"].tolist()], dtype=np.uint32),
              "keys": _json_array(table), "meta": _json_array(meta), **{f: cols[f] for f in _COLS}}
    _savez(path, arrays)


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as the ``.npz`` file ``path``: written aside, fsynced, renamed, folder fsynced."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def _read_npz(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        table = json.loads(z["keys"].tobytes())
        cols = {f: z[f] for f in _COLS}
        cols["names"] = np.array(table, dtype=object)[z["key"].astype(np.int64)]
    return meta, cols


def write_pending(home: str, *, model: str, keys: list[str], ids: list[str], coordh: list[int],
                  vecs: np.ndarray, now: float | None = None) -> str:
    """Write the embeddings of kept documents (their shard keys, ids, coords hashes) as one side
    file under ``<home>/_semantic_dedup/pending/`` (``home``: a local stream root, or the
    :attr:`SemanticSettledRef.home` of an object-store one) and return its path. Call before the
    documents can reach the sink: :func:`sync` folds a row only once its document is published."""
    vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
    pdir = os.path.join(home, DIRNAME, PENDING)
    os.makedirs(pdir, exist_ok=True)
    scale, codes = quantize(vecs)
    cols = {"names": np.array(keys, dtype=object), "idh": np.array([id_hash(i) for i in ids], dtype=np.uint64),
            "coordh": np.array(coordh, dtype=np.uint32), "scale": scale, "codes": codes,
            "ids": np.array([i.encode("utf-8", "surrogatepass")[:ID_BYTES] for i in ids], dtype=f"S{ID_BYTES}")}
    now = time.time() if now is None else now
    path = os.path.join(pdir, f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.npz")
    _write_npz(path, {"model": model, "dim": int(vecs.shape[1]), "created": now}, cols)
    return path


def purge(root: str, ids: list[str], *, lock_wait_s: float = LOCK_WAIT_S) -> int:
    """Forget the embeddings of the documents ``ids`` (a takedown): their id hashes join
    ``<root>/_semantic_dedup/purged.npy`` (atomic, fsynced, under the sync lock; for an
    object-store root that object), so no side file row of theirs is ever folded, and the next
    :func:`sync` rewrites the snapshot (and drops the persisted ANN indexes) without them (even
    with no new shard). Until then a pipeline pinned to an older generation may still drop a
    near-duplicate as ``dup_of`` one of them. Returns the number added."""
    return add_purged_to(root, DIRNAME, (id_hash(i) for i in ids), lock_wait_s=lock_wait_s)


class SemanticSegment(ColumnSegment):
    """An immutable, memory-mapped set of settled embeddings."""

    FIELDS = ("key", *_COLS)

    def __init__(self, path: str, arrays: dict[str, np.ndarray], created: float, keys: list[str]):
        super().__init__(path, arrays, created)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.idh)

    @classmethod
    def write(cls, path: str, names: np.ndarray, arrays: dict[str, np.ndarray], created: float) -> SemanticSegment:
        """Write columns (``names``: each row's shard key, as objects) and open the segment. Keys
        are stored whole (any length) and addressed by uint32 slots."""
        keys = sorted(set(names.tolist()))
        slot = {k: i for i, k in enumerate(keys)}
        arrays = {"key": np.array([slot[k] for k in names.tolist()], dtype=np.uint32), **arrays}
        write_segment(path, arrays, {"created": created, "docs": len(names), "keys": keys})
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> SemanticSegment:
        """The segment at ``path``; ``ValueError`` when it is truncated or inconsistent."""
        arrays, meta = read_segment(path, cls.FIELDS)
        n, keys = int(meta["docs"]), meta["keys"]
        if any(len(a) != n for a in arrays.values()) or arrays["codes"].ndim != 2 or (
                n and int(np.max(arrays["key"])) >= len(keys)):
            raise ValueError(f"semantic segment {path} is inconsistent with its meta ({n} docs)")
        return cls(path, arrays, meta["created"], keys)

    def names(self) -> np.ndarray:
        """Each row's shard key (objects)."""
        return np.array(self.keys, dtype=object)[np.asarray(self.key, dtype=np.int64)]

    def count_by_key(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.key, dtype=np.int64), minlength=len(self.keys))
        return {k: int(c) for k, c in zip(self.keys, counts) if c}


def _ann_path(ddir: str, kind: str, key: str) -> str:
    return os.path.join(ddir, ANN, f"{kind}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:24]}.npz")


class _KeyIndex:
    """One shard key's settled documents: an ANN index over the dequantised vectors, and which
    segments' rows it holds (names, in order) with a digest of their id hashes and codes."""

    def __init__(self, kind: str):
        self.kind, self.index = kind, None
        self.idh, self.coordh = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        self.ids = np.zeros(0, f"S{ID_BYTES}")
        self.segments: tuple[str, ...] = ()
        self._hashes = (hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16))  # id hashes, codes

    @classmethod
    def build(cls, segs, key: str, kind: str) -> _KeyIndex:
        return cls(kind).extended(segs, key, copy=False)

    def digest(self) -> str:
        return "".join(h.hexdigest() for h in self._hashes)

    def _grown(self, segs, key: str) -> tuple[_KeyIndex, np.ndarray]:
        """A new index sharing this one's ANN index, plus the columns of ``key`` in ``segs``;
        and their codes."""
        cols = _columns(segs, only=key)
        new = _KeyIndex(self.kind)
        new.idh = np.concatenate([self.idh, cols["idh"]])
        new.coordh = np.concatenate([self.coordh, cols["coordh"]])
        new.ids = np.concatenate([self.ids, cols["ids"]])
        new.segments = self.segments + tuple(os.path.basename(s.path) for s in segs)
        new._hashes = tuple(h.copy() for h in self._hashes)
        new._hashes[0].update(np.ascontiguousarray(cols["idh"], dtype=np.uint64).tobytes())
        new._hashes[1].update(np.ascontiguousarray(cols["codes"], dtype=np.int8).tobytes())
        new.index = self.index
        return new, cols["codes"]

    def extended(self, segs, key: str, *, copy: bool = True) -> _KeyIndex:
        """This index plus the rows of ``key`` in ``segs`` (a copy unless ``copy=False``)."""
        from beam_jobs.dedup.semantic import SemanticIndex

        new, codes = self._grown(segs, key)
        new.index = self.index.copy() if copy and self.index is not None else self.index
        if len(codes):
            data = codes.astype(np.float32)  # renormalised: cosine without quantisation scale error
            data /= np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
            if new.index is None:
                new.index = SemanticIndex(data.shape[1], self.kind)
            new.index.add_many(data, [""] * len(data))  # ids are looked up in self.ids
        return new

    def save(self, ddir: str, key: str, space: tuple[str, int]) -> None:
        """Persist the ANN index (not a flat one: rebuilding it is a copy) with what it covers."""
        if self.index is None or self.kind == "flat":
            return
        meta = {"version": 1, "key": key, "kind": self.kind, "model": space[0], "dim": space[1],
                "segments": list(self.segments), "rows": len(self.idh), "digest": self.digest()}
        os.makedirs(os.path.join(ddir, ANN), exist_ok=True)
        _savez(_ann_path(ddir, self.kind, key), {"meta": _json_array(meta), "index": self.index.to_bytes()})

    @classmethod
    def restore(cls, ddir: str, key: str, kind: str, segs, space: tuple[str, int]) -> _KeyIndex | None:
        """The persisted index of ``key`` when it holds exactly the rows of ``key`` in a prefix of
        ``segs`` (same model, kind and digest), else ``None`` with a log line saying why."""
        from beam_jobs.dedup.semantic import SemanticIndex

        path = _ann_path(ddir, kind, key)
        if not os.path.exists(path):
            log.info("semantic dedup: no persisted %s index of key %r under %s: building it", kind, key, ddir)
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                covered = list(meta["segments"])
                if (meta["key"], meta["kind"], meta["model"], meta["dim"]) != (key, kind, *space) or [
                        os.path.basename(s.path) for s in segs[:len(covered)]] != covered:
                    log.info("semantic dedup: persisted index %s is of another model, kind or generation than "
                             "the snapshot: rebuilding it", path)
                    return None
                stored, _ = cls(kind)._grown(segs[:len(covered)], key)
                if stored.digest() != meta["digest"] or len(stored.idh) != meta["rows"]:
                    log.warning("semantic dedup: persisted index %s does not match the snapshot's vectors: "
                                "rebuilding it", path)
                    return None
                stored.index = SemanticIndex.from_bytes(z["index"], kind)
            if len(stored.index) != len(stored.idh) or stored.index.dim != space[1]:
                raise ValueError(f"{len(stored.index)} vectors of dim {stored.index.dim}, "
                                 f"the snapshot holds {len(stored.idh)} of dim {space[1]}")
        except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
            log.warning("semantic dedup: persisted index %s is unreadable (%s: %s): rebuilding it",
                        path, type(e).__name__, e)
            return None
        return stored

    def lookup(self, vec: np.ndarray, *, idh: int, coordh: int, threshold: float, k: int = 4) -> str | None:
        if self.index is None:
            return None
        scores, pos = self.index.search_many(vec.reshape(1, -1), k)
        for score, i in zip(scores[0], pos[0]):
            if i < 0 or float(score) < threshold:
                continue
            if int(self.idh[i]) == idh or int(self.coordh[i]) == coordh:  # never a duplicate of itself
                continue
            return self.ids[i].decode("utf-8", "replace")
        return None


@dataclass(slots=True)
class SemanticSettledIndex(SegmentSet):
    """Segments of one snapshot generation, oldest first; read-only once built. The ANN index of
    a shard key is opened on its first lookup (once per process and generation): the persisted
    one plus the rows after it, else built and persisted. ``home``: the folder holding
    ``_semantic_dedup`` (a local stream root, or an object-store root's cache folder)."""

    home: str
    kind: str = "hnsw"
    generation: int = 0
    segments: tuple[SemanticSegment, ...] = ()
    shards: frozenset[str] = frozenset()
    reset: bool = False  # the snapshot on disk was set aside (unreadable, or another model)
    model: tuple[str, int] | None = None  # (id, dimension) checked at load; None: not checked
    space: tuple[str, int] | None = None  # (id, dimension) of the embeddings held, from the snapshot
    _built: dict[str, _KeyIndex] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, home: str, kind: str = "hnsw", *, model: tuple[str, int] | None = None) -> SemanticSettledIndex:
        """The snapshot under ``home`` as last written (empty if none). ``model``: the ``(id, dimension)`` the
        caller embeds with; a snapshot of another model is not used (empty, ``reset``, covered
        shards kept: their embeddings are of the old space). A snapshot that cannot be read is
        moved aside and logged as an error; the index is empty with no covered shard, so the
        next :func:`sync` refolds every pending row the published shards still match."""
        ddir = os.path.join(home, DIRNAME)
        try:
            snap = read_snapshot(ddir)
            if snap is None:
                return cls(home, kind, model=model)
            gen, shards = int(snap["generation"]), frozenset(snap["shards"])
            if model is not None and (snap.get("model"), snap.get("dim")) != tuple(model):
                log.warning("semantic dedup snapshot of %s was built with model %s (dim %s), this run embeds with "
                            "%s (dim %d): starting an empty semantic index (earlier documents are not compared)",
                            home, snap.get("model"), snap.get("dim"), model[0], model[1])
                return cls(home, kind, gen, (), shards, reset=True, model=model, space=tuple(model))
            segs = tuple(SemanticSegment.open(os.path.join(ddir, name)) for name in snap["segments"])
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:  # json errors are ValueErrors
            aside = os.path.join(ddir, f"{SNAPSHOT}.bad-{time.time_ns()}")
            if os.path.exists(os.path.join(ddir, SNAPSHOT)):
                os.replace(os.path.join(ddir, SNAPSHOT), aside)
            log.error("ALERT semantic dedup snapshot of %s is unreadable (%s: %s); moved to %s and rebuilt from "
                      "the pending embeddings of published shards (near-duplicates of older documents are kept)",
                      home, type(e).__name__, e, aside)
            return cls(home, kind, reset=True, model=model)
        space = (snap["model"], int(snap["dim"])) if snap.get("model") is not None else None
        return cls(home, kind, gen, segs, shards, model=model, space=space)

    def count_by_key(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for seg in self.segments:
            for k, n in seg.count_by_key().items():
                out[k] = out.get(k, 0) + n
        return out

    def key_index(self, key: str) -> _KeyIndex:
        with self._lock:
            if key not in self._built:
                self._built[key] = self._open_key(key)
            return self._built[key]

    def _open_key(self, key: str) -> _KeyIndex:
        """``key``'s ANN index: the persisted one extended with the segments after it, else built;
        persisted again when it grew."""
        ddir = os.path.join(self.home, DIRNAME)
        stored = None if self.kind == "flat" or self.space is None else _KeyIndex.restore(
            ddir, key, self.kind, self.segments, self.space)
        if stored is None:
            built = _KeyIndex.build(self.segments, key, self.kind)
        else:
            built = stored.extended(self.segments[len(stored.segments):], key, copy=False)
        if self.space is not None and (stored is None or len(built.idh) > len(stored.idh)):
            built.save(ddir, key, self.space)
        return built

    def lookup(self, key: str, vec: np.ndarray, *, idh: int, coordh: int, threshold: float) -> str | None:
        """Id of a settled document of shard ``key`` at cosine >= ``threshold`` (never the record
        itself: same id hash or same coords hash), else ``None``."""
        return self.key_index(key).lookup(vec, idh=idh, coordh=coordh, threshold=threshold)


@dataclass(frozen=True, slots=True)
class SemanticSettledRef:
    """A pinned generation of a stream root's settled semantic index (picklable); ``home`` holds
    its ``_semantic_dedup`` (the root itself, or an object-store root's cache folder)."""

    root: str
    generation: int
    home: str
    kind: str = "hnsw"

    def open(self) -> SemanticSettledIndex:
        """This generation's index: the in-process one when this process built it, else loaded."""
        return open_generation(_OPEN, _LOCK, self.home, self.generation,
                               lambda: SemanticSettledIndex.load(self.home, self.kind), "semantic dedup")


def _published_ids(root: str, covered: frozenset[str]) -> tuple[np.ndarray, set[str]]:
    """Id hashes of the text samples in the published shards not yet covered, and those shards."""
    found, shards = read_tail(root, covered, "text", None)
    return np.array(sorted({id_hash(doc_id) for doc_id, _ in found}), dtype=np.uint64), shards


def _take(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {f: v[rows] for f, v in cols.items()}


def _concat(parts: list[dict[str, np.ndarray]], dim: int) -> dict[str, np.ndarray]:
    return {f: np.concatenate([p[f] for p in parts]) for f in parts[0]} if parts else _empty_cols(dim)


def _scan_pending(home: str, published: np.ndarray, settled: np.ndarray, model: tuple[str, int], now: float,
                  grace_s: float) -> tuple[dict[str, np.ndarray], list[tuple[str, dict | None, dict | None]]]:
    """The pending rows whose documents are in ``published`` and not ``settled`` (already held,
    or taken down: such rows are dropped), oldest first, one per id hash and coords hash; and
    what to do with each side file once they are in a snapshot: ``(path, meta, rest)``:
    rewrite with ``rest``, or delete when ``rest`` is ``None``."""
    pdir = os.path.join(home, DIRNAME, PENDING)
    parts, actions = [], []
    for name in sorted(os.listdir(pdir)) if os.path.isdir(pdir) else ():
        path = os.path.join(pdir, name)
        if not name.endswith(".npz"):  # a crashed writer's temporary file
            if now - os.path.getmtime(path) > grace_s:
                actions.append((path, None, None))
            continue
        try:
            meta, cols = _read_npz(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.error("semantic dedup side file %s is unreadable (%s: %s): removed", path, type(e).__name__, e)
            actions.append((path, None, None))
            continue
        if (meta.get("model"), meta.get("dim")) != tuple(model):
            log.warning("semantic dedup side file %s is of model %s (dim %s), not %s: %d rows discarded",
                        path, meta.get("model"), meta.get("dim"), model[0], len(cols["idh"]))
            actions.append((path, None, None))
            continue
        known = np.isin(cols["idh"], settled)
        hit = np.isin(cols["idh"], published) & ~known
        parts.append(_take(cols, np.flatnonzero(hit)))
        hit |= known
        if hit.all():
            actions.append((path, None, None))
        elif now - float(meta["created"]) > grace_s:
            log.info("semantic dedup: %d pending rows of %s never published within %.0f s: discarded",
                     int((~hit).sum()), path, grace_s)
            actions.append((path, None, None))
        elif hit.any():
            actions.append((path, meta, _take(cols, np.flatnonzero(~hit))))
    cols = _concat(parts, model[1])
    seen: set[tuple[int, int]] = set()
    first = [i for i, pair in enumerate(zip(cols["idh"].tolist(), cols["coordh"].tolist()))
             if not (pair in seen or seen.add(pair))]
    return _take(cols, np.array(first, dtype=np.int64)), actions


def _apply(actions: list[tuple[str, dict | None, dict | None]]) -> None:
    for path, meta, rest in actions:
        if rest is None:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        else:
            _write_npz(path, meta, rest)


def _columns(segs, only: str | None = None) -> dict[str, np.ndarray]:
    """The rows of ``segs`` (oldest first) as columns, ``names`` included; ``only``: one shard key's."""
    parts = []
    for seg in segs:
        names = seg.names()
        rows = np.flatnonzero(names == only) if only is not None else np.arange(len(seg))
        parts.append({"names": names[rows], **{f: np.asarray(getattr(seg, f)[rows]) for f in _COLS}})
    return _concat(parts, 0)


def _newest_per_key(names: np.ndarray, horizon: int) -> np.ndarray:
    """Positions of the newest ``horizon`` rows of each shard key (rows oldest first; order kept)."""
    seen: dict[str, int] = {}
    keep = []
    for i in range(len(names) - 1, -1, -1):
        n = seen.get(names[i], 0)
        if n < horizon:
            seen[names[i]] = n + 1
            keep.append(i)
    return np.array(keep[::-1], dtype=np.int64)


def sync(root: str, *, horizon: int, kind: str = "hnsw", model: str | None = None, max_segments: int = 16,
         low_water: float = 0.8, grace_s: float = 3600.0, now: float | None = None,
         lock_wait_s: float = LOCK_WAIT_S, cache_dir: str | None = None) -> SemanticSettledRef:
    """Fold the pending rows of the documents published since the last snapshot into a new
    segment, apply the per-key horizon, write the next generation, trim the side files.

    ``model``: the embedding model directory (``None``: the packaged MiniLM); its id and
    dimension are recorded in the snapshot, and a snapshot or side file of another model is not
    used. A key never holds more than ``horizon`` documents: beyond it (or beyond
    ``max_segments`` segments) the snapshot is compacted to the newest ``low_water x horizon``
    of each key, so compaction (and the ANN rebuild it causes) is amortised over many
    micro-batches. Between compactions the ANN indexes this process already built are copied,
    extended with the new rows only and persisted. Call at a settlement point (before a
    micro-batch, after the previous one published); processes syncing one index folder take
    turns (waiting up to ``lock_wait_s``, else :class:`~beam_jobs.dedup.snapshot.SnapshotBusy`).
    ``cache_dir``: where an object-store root's index is kept
    (:func:`~beam_jobs.dedup.snapshot.index_home`). Returns the pinned reference the pipeline's
    semantic dedup uses."""
    from beam_jobs.dedup.semantic import model_identity

    now = time.time() if now is None else now
    ident = model_identity(model)
    home = index_home(root, cache_dir)
    with snapshot_lock(os.path.join(home, DIRNAME), lock_wait_s):
        return _sync(root, home, horizon=horizon, kind=kind, ident=ident, max_segments=max_segments,
                     low_water=low_water, grace_s=grace_s, now=now)


def _sync(root: str, home: str, *, horizon: int, kind: str, ident: tuple[str, int], max_segments: int, low_water: float,
          grace_s: float, now: float) -> SemanticSettledRef:
    """:func:`sync`'s fold, under the index folder's lock."""
    with _LOCK:
        index = _OPEN.get((home, read_generation(home)))
    if index is None or index.kind != kind or index.model != ident:
        index = SemanticSettledIndex.load(home, kind, model=ident)
    published, shards = _published_ids(root, index.shards)
    purged = read_purged_of(root, home, DIRNAME)
    held = np.concatenate([np.asarray(seg.idh) for seg in index.segments]) if index.segments else np.zeros(0, np.uint64)
    dirty = bool(len(purged)) and bool(np.isin(held, purged).any())  # a takedown since the last snapshot
    # A document already held (a rewritten shard's survivor, a replay) is not folded twice.
    cols, actions = _scan_pending(home, published, np.union1d(purged, held), ident, now, grace_s)
    if not shards and index.generation and not index.reset and not dirty:
        _apply(actions)  # side files past their grace, rows already held or taken down
        with _LOCK:
            _OPEN.setdefault((home, index.generation), index)
        return SemanticSettledRef(root, index.generation, home, kind)
    gen = index.generation + 1
    ddir = os.path.join(home, DIRNAME)
    os.makedirs(ddir, exist_ok=True)
    segs = list(index.segments)
    new = []
    if len(cols["idh"]):
        keep = _newest_per_key(cols["names"], horizon)
        new = [SemanticSegment.write(os.path.join(ddir, f"seg-{gen:08d}"), cols["names"][keep],
                                     {f: cols[f][keep] for f in _COLS}, now)]
    segs += new
    counts: dict[str, int] = {}
    for seg in segs:
        for k, n in seg.count_by_key().items():
            counts[k] = counts.get(k, 0) + n
    over = any(n > horizon for n in counts.values())
    compact = len(segs) > max_segments or over or dirty
    if compact:  # trims keys (to low water) only when one is over the horizon
        cols = _columns(segs)
        low = max(1, int(horizon * low_water)) if over else horizon
        alive = ~np.isin(cols["idh"], purged)
        keep = np.sort(np.concatenate([np.flatnonzero((cols["names"] == k) & alive)[-low:] for k in counts]))
        log.info("semantic dedup horizon/compaction: %d of %d documents kept in one segment",
                 len(keep), len(cols["names"]))
        names = cols.pop("names")[keep]
        segs = [SemanticSegment.write(os.path.join(ddir, f"seg-{gen:08d}-m"), names,
                                      {f: v[keep] for f, v in cols.items()}, now)]
    snap = write_snapshot(ddir, gen, segs, index.shards | shards, now,
                          meta={"model": ident[0], "dim": ident[1]}, keep=(PENDING, PURGED, ANN))
    _apply(actions)  # after the snapshot holds the folded rows: a crash in between refolds nothing twice
    _prune_ann(ddir, snap["segments"], now, grace_s)
    built = SemanticSettledIndex(home, kind, gen, tuple(segs), frozenset(snap["shards"]), model=ident, space=ident)
    if not compact and not index.reset:  # the previous generation stays pinned and read-only: extend copies
        with index._lock:
            carried = dict(index._built)
        for k, ki in carried.items():
            built._built[k] = grown = ki.extended(new, k)
            if len(grown.idh) > len(ki.idh):
                grown.save(ddir, k, ident)
    with _LOCK:
        _OPEN[(home, gen)] = built
        for key in [k for k in _OPEN if k[0] == home and k[1] < gen - 1]:
            del _OPEN[key]
    return SemanticSettledRef(root, gen, home, kind)


def _prune_ann(ddir: str, segments: list[str], now: float, grace_s: float) -> None:
    """Remove the persisted ANN indexes that cover a segment no longer in the snapshot (after a
    compaction or a reset), and temporary files of crashed writers older than ``grace_s``."""
    adir = os.path.join(ddir, ANN)
    for name in sorted(os.listdir(adir)) if os.path.isdir(adir) else ():
        path = os.path.join(adir, name)
        try:
            if name.startswith("."):
                stale = now - os.path.getmtime(path) > grace_s
            else:
                with np.load(path, allow_pickle=False) as z:
                    covered = json.loads(z["meta"].tobytes())["segments"]
                stale = segments[:len(covered)] != covered
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            stale = True
        if stale:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def read_generation(home: str) -> int:
    """The generation of the snapshot last written under ``home`` (0: none, -1: unreadable)."""
    try:
        snap = read_snapshot(os.path.join(home, DIRNAME))
        return 0 if snap is None else int(snap["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1
