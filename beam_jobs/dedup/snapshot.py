"""On-disk steps shared by the settled indexes (text :mod:`beam_jobs.dedup.settled`, images
:mod:`beam_jobs.media.dedup_settled`, embeddings :mod:`beam_jobs.dedup.semantic_settled`):
segment folders of ``.npy`` columns, the horizon, the atomically rewritten ``snapshot.json``,
the purge list of taken-down documents, the lock that serialises the processes folding one
index, and reading a stream root's unindexed tail.

Where an index lives (:func:`index_home`): under a local stream root itself; for an object-store
root (``s3://...``) in a local cache folder of the machine, ``<cache>/<sha256(root)[:16]>/``
(``<cache>`` defaults to ``$HEADWATER_STATE_DIR/dedup``, else ``~/.cache/headwater/dedup``). The
stream is the truth and such a cache only a copy of it: a fresh machine's first sync folds every
published shard of every writer (O(history), once), later ones the tail. The purge list of an
object-store root is the one object ``ROOT/<index folder>/purged.npy`` (:func:`add_purged_to`),
which every machine's sync reads (:func:`read_purged_of`), so a takedown reaches every cache."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import numpy as np

from streams import storage
from streams.manifest import INDEX, JOURNAL_DIR, flock_within, fsync_dir

__all__ = ["LOCK", "PURGED", "SNAPSHOT", "STATE_DIR_ENV", "ColumnSegment", "DedupCacheError", "SegmentSet",
           "SnapshotBusy", "add_purged", "add_purged_to", "apply_horizon", "default_cache_dir", "fsync_dir",
           "index_home", "open_generation", "read_purged", "read_purged_of", "read_segment", "read_snapshot",
           "read_tail", "read_tails", "snapshot_lock", "write_segment", "write_snapshot"]

SNAPSHOT = "snapshot.json"
LOCK = ".lock"  # flock of the processes folding or purging one index folder (a file: never cleaned up)
PURGED = "purged.npy"  # id hashes of documents taken down: never folded, dropped from the snapshot
STATE_DIR_ENV = "HEADWATER_STATE_DIR"  # a machine's local state folder (default ~/.cache/headwater)
ROOT_NAME = "root.url"  # in an object-store root's cache folder: the root, endpoint and epoch it caches
EPOCH = "_dedup/epoch"  # in an object-store root: the id of this incarnation of the root
_log = logging.getLogger(__name__)


class SnapshotBusy(RuntimeError):
    """Another process held an index folder's lock for longer than the caller would wait."""


class DedupCacheError(OSError):
    """The local cache folder of an object-store root's dedup indexes cannot be created or written."""


def default_cache_dir() -> str:
    """``$HEADWATER_STATE_DIR/dedup``, else ``~/.cache/headwater/dedup``."""
    state = os.environ.get(STATE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "headwater")
    return os.path.join(state, "dedup")


def root_epoch(root: str) -> str:
    """The identity of an object-store root's incarnation: the object ``ROOT/_dedup/epoch`` (a
    random id created with ``If-None-Match`` at first use), so a cache can tell a root deleted and
    re-created at the same URL from the one it folded."""
    store, rel = storage.object_root(root), EPOCH
    for attempt in range(storage.CAS_ATTEMPTS):
        data = store.read(rel)
        if data is not None:
            return data.decode(errors="replace").strip()
        try:
            store.put(rel, uuid.uuid4().hex.encode(), if_version=None)
        except storage.PreconditionFailed:  # another process created it first: read theirs
            storage.backoff(attempt)
    raise storage.PreconditionFailed(f"{root}/{rel}: cannot be read or created")


def index_home(root: str, cache_dir: str | None = None) -> str:
    """The local folder holding ``root``'s index folders (``_dedup``, ``_media_dedup``, ...):
    a local root itself; for an object-store root its folder in the cache ``cache_dir``
    (``None``: :func:`default_cache_dir`), ``<cache_dir>/<sha256(endpoint, root)[:16]>``, created
    and checked writable (else :class:`DedupCacheError`). A cache of another incarnation of the
    root (:func:`root_epoch` differs: deleted and re-created) is emptied first: it would drop new
    documents as copies of ones that no longer exist and skip re-used shard names."""
    if not storage.is_remote(root):
        return root
    url = storage.normalize_root(root)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    home = os.path.join(os.path.abspath(cache_dir or default_cache_dir()),
                        hashlib.sha256(f"{endpoint}\n{url}".encode()).hexdigest()[:16])
    identity = f"{url}\n{endpoint}\n{root_epoch(root)}\n"
    try:
        os.makedirs(home, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".probe-"):
            pass
        name = os.path.join(home, ROOT_NAME)
        try:
            with open(name) as f:
                known = f.read()
        except FileNotFoundError:
            known = None
        if known != identity:
            if known is not None:
                _log.warning("dedup cache %s held another incarnation of %s (epoch changed): emptied", home, url)
                for entry in os.listdir(home):
                    if os.path.isdir(os.path.join(home, entry)):
                        shutil.rmtree(os.path.join(home, entry), ignore_errors=True)
            _log.info("new dedup cache %s for %s: its first settlement point folds every published shard "
                      "(every writer's) once, later ones only the tail", home, url)
            tmp = f"{name}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(identity)
            os.replace(tmp, name)
    except OSError as e:
        raise DedupCacheError(f"dedup cache {home} of {url} is not writable ({e}); set "
                              f"--dedup-cache-dir or ${STATE_DIR_ENV} to a writable folder") from e
    return home


@contextmanager
def snapshot_lock(ddir: str, wait_s: float) -> Iterator[None]:
    """Exclusive across processes while the block folds or purges the index folder ``ddir``
    (``flock`` on ``ddir/.lock``, waiting up to ``wait_s``, else :class:`SnapshotBusy`). Two
    workers syncing one local root take turns: the second folds on top of the first's
    generation instead of overwriting it. Local folders only (flock)."""
    os.makedirs(ddir, exist_ok=True)
    fd = os.open(os.path.join(ddir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not flock_within(fd, wait_s):
            raise SnapshotBusy(f"{ddir} is being folded by another process for more than {wait_s:.0f} s")
        yield  # closing fd releases the flock
    finally:
        os.close(fd)


def read_purged(ddir: str) -> np.ndarray:
    """The sorted id hashes on ``ddir``'s purge list (empty if none)."""
    path = os.path.join(ddir, PURGED)
    return np.load(path) if os.path.exists(path) else np.zeros(0, np.uint64)


def add_purged(ddir: str, hashes: Iterable[int]) -> int:
    """Add id ``hashes`` to ``ddir/purged.npy`` (atomic, fsynced; call under :func:`snapshot_lock`);
    the number new to it."""
    old = read_purged(ddir)
    new = np.setdiff1d(np.fromiter(hashes, dtype=np.uint64), old)
    if not len(new):
        return 0
    os.makedirs(ddir, exist_ok=True)
    tmp = os.path.join(ddir, f".{PURGED}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.union1d(old, new))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ddir, PURGED))
    fsync_dir(ddir)
    return len(new)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_purged_of(root: str, home: str, dirname: str) -> np.ndarray:
    """The purge list of ``root``'s index ``dirname``: ``home/dirname/purged.npy`` for a local
    root, the object ``ROOT/dirname/purged.npy`` for an object-store root (every machine's cache
    reads the same list; a HEAD per sync, a GET only when its version changed)."""
    if not storage.is_remote(root):
        return read_purged(os.path.join(home, dirname))
    store, rel = storage.object_root(root), f"{dirname}/{PURGED}"
    version = store.version(rel)
    if version is None:
        return np.zeros(0, np.uint64)
    copy = os.path.join(home, f"{dirname}.{PURGED}")  # the last list read, named by its version
    try:
        with open(f"{copy}.version") as f:
            if f.read() == version:
                with open(copy, "rb") as g:
                    return _npy(g.read())
    except (FileNotFoundError, ValueError):
        pass
    data = store.read(rel)
    if data is None:
        return np.zeros(0, np.uint64)
    purged = _npy(data)
    with open(copy, "wb") as f:  # cached for the next sync (a HEAD instead of a GET of the list)
        f.write(data)
    with open(f"{copy}.version", "w") as f:
        f.write(version)
    return purged


def add_purged_to(root: str, dirname: str, hashes: Iterable[int], *, lock_wait_s: float) -> int:
    """Add id ``hashes`` to the purge list of ``root``'s index ``dirname`` (see
    :func:`read_purged_of`); the number new to it. A local root's list is rewritten under the
    index's :func:`snapshot_lock`; an object-store root's object by a conditional put (If-Match
    the version read, retried on a conflict), so concurrent takedowns lose no id."""
    hashes = np.fromiter(hashes, dtype=np.uint64)
    if not storage.is_remote(root):
        ddir = os.path.join(root, dirname)
        with snapshot_lock(ddir, lock_wait_s):
            return add_purged(ddir, hashes.tolist())
    store, rel = storage.object_root(root), f"{dirname}/{PURGED}"
    for attempt in range(storage.CAS_ATTEMPTS):
        version = store.version(rel)
        data = store.read(rel) if version is not None else None
        old = np.zeros(0, np.uint64) if data is None else _npy(data)
        new = np.setdiff1d(hashes, old)
        if not len(new):
            return 0
        buf = io.BytesIO()
        np.save(buf, np.union1d(old, new))
        try:
            store.put(rel, buf.getvalue(), if_version=version if data is not None else None)
            return len(new)
        except storage.PreconditionFailed:  # another takedown wrote it in between: read again
            storage.backoff(attempt)
    raise storage.PreconditionFailed(f"{root}/{rel}: lost {storage.CAS_ATTEMPTS} conditional-put rounds")


class _Aged(Protocol):
    path: str
    created: float

    def __len__(self) -> int: ...


class ColumnSegment:
    """A segment whose columns ``FIELDS`` are attributes (arrays, usually memory-mapped)."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, path: str, arrays: dict[str, np.ndarray], created: float):
        self.path, self.created = path, created
        for name in self.FIELDS:
            setattr(self, name, arrays[name])

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.FIELDS)


class SegmentSet:
    """Size of an index over ``self.segments`` (a mixin for slotted dataclasses)."""

    __slots__ = ()
    segments: tuple[Any, ...]

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)


def read_snapshot(ddir: str) -> dict[str, Any] | None:
    """``ddir/snapshot.json`` as last written, ``None`` if there is none."""
    path = os.path.join(ddir, SNAPSHOT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


_Index = TypeVar("_Index")


def open_generation(cache: dict[tuple[str, int], _Index], lock: threading.Lock, root: str, generation: int,
                    load: Callable[[], _Index], what: str) -> _Index:
    """The index of ``generation`` of ``root`` from a process's ``cache`` of complete indexes (the one
    this process built), else ``load()``-ed from the snapshot; raises if the snapshot has moved on
    from the generation the pipeline was built for. ``what`` names the index in that error."""
    key = (root, generation)
    with lock:
        if key not in cache:
            index = load()
            if index.generation != generation:
                raise RuntimeError(f"{what} snapshot of {root} is at generation {index.generation}, "
                                   f"the pipeline was built for {generation}")
            cache[key] = index
        return cache[key]


def write_segment(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` (one ``.npy`` each) and ``meta.json`` as the folder ``path``, replaced
    whole; every file, the folder and its parent are fsynced, so a snapshot written after it
    never names a segment a power loss could leave empty."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name, arr in arrays.items():
        with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
            f.flush()
            os.fsync(f.fileno())
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_segment(path: str, fields: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A segment folder's columns ``fields`` (memory-mapped) and its meta."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in fields}, meta


def apply_horizon(segs: list[_Aged], *, now: float, horizon_age_s: float | None, horizon_count: int | None,
                  log: logging.Logger, what: str, unit: str) -> None:
    """Forget (in place) the oldest whole segments older than ``horizon_age_s``, then while the
    others still hold ``horizon_count`` items; logged to ``log`` as ``"<what> horizon"`` in ``unit``."""
    while segs and horizon_age_s is not None and now - segs[0].created > horizon_age_s:
        log.info("%s horizon (age): forgetting %d %s of %s", what, len(segs[0]), unit, segs[0].path)
        segs.pop(0)
    while len(segs) > 1 and horizon_count is not None and sum(len(s) for s in segs) - len(segs[0]) >= horizon_count:
        log.info("%s horizon (count): forgetting %d %s of %s", what, len(segs[0]), unit, segs[0].path)
        segs.pop(0)


def write_snapshot(ddir: str, generation: int, segs: Sequence[_Aged], shards: Iterable[str],
                   now: float, *, meta: dict[str, Any] | None = None, keep: Iterable[str] = ()) -> dict[str, Any]:
    """Atomically (re)write ``ddir/snapshot.json`` naming ``segs`` and the covered ``shards``
    (plus ``meta``), then remove every other folder in ``ddir`` but ``keep``; returns the
    snapshot written."""
    snap = {"version": 1, "generation": generation, "segments": [os.path.basename(s.path) for s in segs],
            "shards": sorted(shards), "written_at": now, **(meta or {})}
    tmp = os.path.join(ddir, f"{SNAPSHOT}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(snap, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ddir, SNAPSHOT))
    fsync_dir(ddir)
    keep = set(snap["segments"]) | {SNAPSHOT, *keep}
    for name in os.listdir(ddir):
        if name not in keep and os.path.isdir(os.path.join(ddir, name)):
            shutil.rmtree(os.path.join(ddir, name), ignore_errors=True)
    return snap


def read_tail(root: str, covered: frozenset[str], modality: str,
              key: str | None) -> tuple[list[tuple[str, Any]], set[str]]:
    """``(sample id, lineage[key])`` of the ``modality`` samples carrying ``key`` in the shards
    of ``root`` published but not in ``covered``, and those shards; ``key`` ``None``: every
    ``modality`` sample, as ``(sample id, None)``."""
    found, shards = read_tails(root, covered, (modality,), key)
    return found[modality], shards


def read_tails(root: str, covered: frozenset[str], modalities: Sequence[str],
               key: str | None) -> tuple[dict[str, list[tuple[str, Any]]], set[str]]:
    """:func:`read_tail` of several ``modalities`` in one pass over the tail (each shard is read,
    for an object-store root downloaded, once): per modality its ``(sample id, value)`` list."""
    from streams.mds import TailReader

    found: dict[str, list[tuple[str, Any]]] = {m: [] for m in modalities}
    shards: set[str] = set()
    if not storage.is_remote(root) and not any(os.path.exists(os.path.join(root, name))
                                                for name in (INDEX, JOURNAL_DIR)):  # nothing published
        return found, shards
    with TailReader(root, exclude_shards=covered) as reader:
        shards.update(set(reader.poll()) - covered)  # nothing new: no new generation
        for s in reader.samples(timeout_s=0):
            shards.add(s["_shard"])
            out = found.get(s.get("modality"))
            if out is None:
                continue
            if key is None:
                out.append((s["id"], None))
                continue
            lineage = s.get("lineage") or {}
            if isinstance(lineage, str):
                lineage = json.loads(lineage)
            if key in lineage:
                out.append((s["id"], lineage[key]))
    return found, shards
