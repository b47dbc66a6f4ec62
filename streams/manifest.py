"""On-disk state of a live MDS stream root: index.json, the headwater.json sidecar, the lock.

A stream root holds sealed shards plus two JSON files, both replaced atomically
(temp file + fsync + ``os.replace``) under one ``fcntl`` lock so several writer
processes never lose each other's entries (the gap mosaicml/streaming#646 leaves):

* ``index.json``: the stock MDS index (``{"version": 2, "shards": [...]}``), what
  ``streaming.StreamingDataset`` reads. Append-only, in publish order.
* ``headwater.json``: per shard its domain, writer, settled Kafka offset ranges, lineage
  manifest (vocab/tokenizer/discretizer/pipeline versions) and publish time.

Publish order is sidecar first, then index; so a shard is *published* iff its name is in
index.json, and :func:`settled_ranges` counts only published shards (plus empty "settled
only" windows, which have no shard at all).

Object-store roots (``s3://…``) have no lock and no rename: their per-writer layout and lock-free
commit live in :mod:`streams.storage`; the readers here (:func:`read_index`, :func:`read_sidecar`,
:func:`published_entries`, :func:`settled_ranges`) accept both kinds of root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from streams import storage
from streams.events import OffsetRange

__all__ = [
    "INDEX",
    "SIDECAR",
    "StreamManifest",
    "atomic_write_json",
    "check_sidecar",
    "empty_sidecar",
    "file_lock",
    "flock_within",
    "fsync_dir",
    "merge_ranges",
    "published_entries",
    "read_index",
    "read_sidecar",
    "read_writer_sidecar",
    "root_lock",
    "settled_ranges",
    "shard_name_of",
    "writer_published",
]

INDEX = "index.json"
SIDECAR = "headwater.json"
LOCK = ".headwater.lock"
STAGING = ".staging"
SIDECAR_FORMAT = "headwater-live-mds"
SIDECAR_VERSION = 1


@dataclass(kw_only=True, slots=True)
class StreamManifest:
    """Versions of everything that produced a shard's tokens (kept per shard in the sidecar)."""

    vocab_version: str
    tokenizer_version: str = ""
    discretizer_version: str = ""
    pipeline_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: StreamManifest | dict[str, Any]) -> StreamManifest:
        if isinstance(value, StreamManifest):
            return value
        known = {"vocab_version", "tokenizer_version", "discretizer_version", "pipeline_version", "extra"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"manifest: unknown field {min(unknown)!r}; known: {sorted(known)}")
        if not value.get("vocab_version"):
            raise ValueError("manifest: vocab_version is required")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def atomic_write_json(path: str, obj: Any, *, durable: bool = True, sync_dir: bool = True) -> None:
    """Write JSON to a unique temp file beside ``path``, fsync it, then ``os.replace`` it
    (and fsync the directory, unless a later write in the same directory will)."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, sort_keys=True))  # one-shot: the C encoder (json.dump is pure Python)
            f.flush()
            if durable:
                os.fdatasync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: leave the old file, and no half-written temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable and sync_dir:
        fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (makes the names created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flock_within(fd: int, wait_s: float) -> bool:
    """Take an exclusive ``flock`` on ``fd``, retrying every 0.2 s for up to ``wait_s``; False if
    another holder kept it that long."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock held while the block runs (``flock`` on ``path``, created if absent)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def root_lock(root: str) -> contextlib.AbstractContextManager[None]:
    """Exclusive inter-process lock of a stream root (flock on ``root/.headwater.lock``)."""
    return file_lock(os.path.join(root, LOCK))


def _read_json(path: str, default: Any) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None


def read_index(root: str) -> dict[str, Any]:
    """The MDS index of ``root`` (an empty one if none was published yet; for an object-store
    root, the merged index of all writers)."""
    if storage.is_remote(root):
        return storage.object_root(storage.normalize_root(root)).root_index()[0]
    obj = _read_json(os.path.join(root, INDEX), {"version": 2, "shards": []})
    if obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
        raise ValueError(f"{root}/{INDEX}: not an MDS version-2 index")
    return obj


def empty_sidecar() -> dict[str, Any]:
    return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "vocab_version": None,
            "shards": {}, "settled_only": {}}


def check_sidecar(where: str, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` if it is a sidecar this version understands (else ``ValueError``)."""
    if obj.get("format") != SIDECAR_FORMAT or obj.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{where}: unsupported sidecar {obj.get('format')!r} v{obj.get('version')!r}")
    return obj


def read_sidecar(root: str) -> dict[str, Any]:
    """The headwater.json sidecar of ``root`` (an empty one if missing; for an object-store root,
    the union of all writers' sidecars)."""
    if storage.is_remote(root):
        return _merged_sidecar(storage.object_root(storage.normalize_root(root)))
    return check_sidecar(f"{root}/{SIDECAR}", _read_json(os.path.join(root, SIDECAR), empty_sidecar()))


def read_writer_sidecar(store: storage.ObjectRoot, writer_id: str) -> tuple[dict[str, Any], str | None]:
    """One writer's sidecar in an object-store root and its version."""
    side, version = store.writer_sidecar(writer_id, empty_sidecar())
    return check_sidecar(f"{store.url}/{store.writer_dir(writer_id)}/{SIDECAR}", side), version


def _merged_sidecar(store: storage.ObjectRoot) -> dict[str, Any]:
    out = empty_sidecar()
    for writer_id in store.writers():
        side = read_writer_sidecar(store, writer_id)[0]
        out["vocab_version"] = out["vocab_version"] or side["vocab_version"]
        out["shards"].update(side["shards"])
        out["settled_only"].update(side["settled_only"])
    return out


def shard_name_of(info: dict[str, Any]) -> str:
    """A shard's name: its index entry's data basename without the ``.mds[.ext]`` suffix."""
    basename = info["raw_data"]["basename"]
    return basename.rsplit("/", 1)[-1].removesuffix(".mds")  # merged object-store index: writers/<id>/


def ranges_to_json(ranges: Iterable[OffsetRange]) -> list[dict[str, Any]]:
    return [asdict(r) for r in ranges]


def ranges_from_json(items: Iterable[dict[str, Any]]) -> list[OffsetRange]:
    return [OffsetRange(**r) for r in items]


def merge_ranges(ranges: Iterable[OffsetRange]) -> list[OffsetRange]:
    """Sort and coalesce overlapping/adjacent ranges per (topic, partition)."""
    out: list[OffsetRange] = []
    for r in sorted(ranges, key=lambda r: (r.topic, r.partition, r.start, r.end)):
        last = out[-1] if out else None
        if last and (last.topic, last.partition) == (r.topic, r.partition) and r.start <= last.end:
            out[-1] = OffsetRange(topic=r.topic, partition=r.partition, start=last.start, end=max(last.end, r.end))
        else:
            out.append(r)
    return out


def published_entries(root: str) -> dict[str, dict[str, Any]]:
    """Sidecar entries of published shards and settled-only windows, by name."""
    if storage.is_remote(root):
        store = storage.object_root(storage.normalize_root(root))
        return {n: e for w in store.writers() for n, e in writer_published(store, w).items()}
    names = {shard_name_of(info) for info in read_index(root)["shards"]}
    side = read_sidecar(root)
    out = {n: e for n, e in side["shards"].items() if n in names}
    out.update(side["settled_only"])
    return out


def settled_ranges(root: str, *, merge: bool = True) -> list[OffsetRange]:
    """Kafka offset ranges settled by everything published in ``root`` (all writers)."""
    ranges = [r for e in published_entries(root).values() for r in ranges_from_json(e["settled"])]
    return merge_ranges(ranges) if merge else ranges


def writer_published(store: storage.ObjectRoot, writer_id: str) -> dict[str, dict[str, Any]]:
    """Published entries of one writer of an object-store root: its committed index is the truth
    (the sidecar, put before it, may hold an entry whose index put never happened)."""
    names = {shard_name_of(info) for info in store.writer_index(writer_id)[0]["shards"]}
    side = read_writer_sidecar(store, writer_id)[0]
    out = {n: e for n, e in side["shards"].items() if n in names}
    out.update(side["settled_only"])
    return out
