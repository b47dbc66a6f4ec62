"""TailReader: follow a live MDS stream root as shards are published, with a resumable cursor.

Shards are consumed in publish order (index.json order). The cursor (:meth:`state_dict`) names
the shards fully consumed and the position inside the current one, so a reader restored with
:meth:`load_state_dict` neither repeats nor skips a sample. Shards are verified against the
index hashes and read with mosaicml-streaming's own ``MDSReader`` (via ``reader_from_json``);
a corrupt or missing shard is reported to ``on_corrupt`` and skipped.

Two parts are public for readers that schedule shards themselves (the trainer's per-domain
feeds): :class:`IndexWatcher` (a non-blocking poll of the published shard list) and
:class:`ShardOpener` (verify, decompress and read one shard, retrying transient I/O errors,
raising :class:`CorruptShard`).

An object-store root (``s3://…``) is read through :mod:`streams.storage`: the watcher polls the
merged index's version tag instead of a stat, and shards are downloaded into the cache directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from botocore.exceptions import BotoCoreError
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.format.base.reader import Reader
from streaming.base.hashing import get_hash

from streams import manifest as mf
from streams import storage
from streams.events import ShardPublished
from streams.writer_log import RemoteView

__all__ = ["CURSOR_VERSION", "CorruptShard", "IndexWatcher", "ShardEntry", "ShardOpener", "TailReader"]

CURSOR_VERSION = 1
log = logging.getLogger(__name__)


class CorruptShard(Exception):
    """A shard failed verification or decoding (it is reported and skipped, never retried)."""


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One published shard as the index and the sidecar list it."""

    name: str
    info: dict[str, Any]  # its index.json entry
    domain: str
    published_at: float  # sidecar publish time (0.0 if unknown)
    ordinal: int  # position in this reader's view (a writer's shards keep that writer's order)
    replaces: str = ""  # a takedown rewrote shard ``replaces`` into this one (streams/mds_rewrite.py)
    removed: tuple[int, ...] = ()  # sample indices of ``replaces`` that this shard no longer holds
    rewrites: tuple[tuple[str, tuple[int, ...]], ...] = ()  # every (replaced name, removed) since the original
    writer: str = ""  # the writer id that published it (its shards' order is the same for every reader)

    @property
    def samples(self) -> int:
        return int(self.info["samples"])

    @property
    def ancestors(self) -> tuple[str, ...]:
        """Names of the shards takedowns rewrote into this one, oldest first (empty: an original)."""
        if self.rewrites:
            return tuple(name for name, _ in self.rewrites)
        return (self.replaces,) if self.replaces else ()

    def map_index(self, name: str, index: int) -> int | None:
        """Sample ``index`` of shard ``name`` (this one or an ancestor) as an index of this shard;
        None if a takedown removed that sample. ``KeyError`` if ``name`` is neither."""
        at, kept = self._map(name, index)
        return at if kept else None

    def map_cursor(self, name: str, index: int) -> int:
        """A reader's next-sample position ``index`` in shard ``name`` (this one or an ancestor)
        as a position in this shard: the same sample, or the next one kept if it was removed."""
        return self._map(name, index)[0]

    def _map(self, name: str, index: int) -> tuple[int, bool]:
        if name == self.name:
            return index, True
        chain = self.rewrites or ((self.replaces, self.removed),)
        names = [n for n, _ in chain]
        if name not in names:
            raise KeyError(name)
        kept = True
        for _, removed in chain[names.index(name):]:
            kept = kept and index not in removed
            index -= sum(1 for i in removed if i < index)
        return index, kept


def _rewrites_of(meta: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A sidecar entry's takedown history (empty if absent or malformed)."""
    try:
        return tuple((str(n), tuple(int(i) for i in r)) for n, r in meta.get("rewrites") or ())
    except (TypeError, ValueError):
        return ()


class IndexWatcher:
    """The published shards of one root: :meth:`poll` never waits. A local root is followed with a
    :class:`streams.manifest.RootView` (a stat, then only the journal bytes appended since the last
    poll), an object-store root with a :class:`streams.writer_log.RemoteView` (a HEAD and a few
    LISTs, then only the log records committed since the last poll)."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.normalize_root(root)
        self._view: mf.RootView | RemoteView = (RemoteView(storage.object_root(self.root)) if storage.is_remote(self.root)
                                                else mf.RootView(self.root))
        self.entries: dict[str, ShardEntry] = {}
        self.emptied: set[str] = set()  # shards a takedown removed every sample of (settled-only now)
        self._scanned = 0  # local root: infos already turned into entries
        self._reloads = 0

    def poll(self) -> list[ShardEntry]:
        """Shards published since the last call, in publish order."""
        try:
            self._view.refresh()
            if self._view.reloads != self._reloads:  # a fold, merge or rewrite: rescan (names dedupe)
                self._reloads, self._scanned = self._view.reloads, 0
            infos, side = self._view.infos, self._view.side
            first, self._scanned = self._scanned, len(infos)
        except (ValueError, OSError, BotoCoreError) as e:
            # a foreign, half-written file or a network error: try again at the next poll
            log.warning("cannot poll %s, retrying at the next poll: %s", self.root, e)
            return []
        if first == 0:  # a full read (a takedown rewrite reloads): settled-only entries it emptied
            self.emptied.update(n for n, e in side["settled_only"].items() if e.get("replaces") == n)
        new = []
        for ordinal in range(first, len(infos)):
            info = infos[ordinal]
            name = mf.shard_name_of(info)
            if name in self.entries:
                continue
            meta = side["shards"].get(name) or {}
            entry = ShardEntry(name=name, info=info, domain=meta.get("domain") or name.split(".", 1)[0],
                               published_at=float(meta.get("published_at") or 0.0), ordinal=ordinal,
                               replaces=str(meta.get("replaces") or ""),
                               removed=tuple(int(i) for i in meta.get("removed") or ()),
                               rewrites=_rewrites_of(meta), writer=str(meta.get("writer_id") or ""))
            self.entries[name] = entry
            new.append(entry)
        return new


def _inside(basename: Any) -> bool:
    """A basename that stays inside its root and the cache: relative, no ``..`` component."""
    return (isinstance(basename, str) and bool(basename) and not basename.startswith("/") and "\\" not in basename
            and ".." not in basename.split("/"))


class ShardOpener:
    """Opens the shards of one root for reading: hash check, decompression into a cache directory,
    mosaicml-streaming's ``MDSReader``; an ``OSError`` is retried (``read_attempts`` in all, backoff
    from ``retry_backoff_s``) before the shard counts as corrupt."""

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | None = None, verify_hashes: bool = True,
                 read_attempts: int = 4, retry_backoff_s: float = 0.1):
        self.root = storage.normalize_root(root)
        self._store = storage.object_root(self.root) if storage.is_remote(self.root) else None
        self.verify_hashes = verify_hashes
        self.read_attempts, self.retry_backoff_s = max(1, read_attempts), retry_backoff_s
        self.transient_errors = 0  # OSErrors that a retry got past
        self._own_cache = cache_dir is None
        self._cache = cache_dir or tempfile.mkdtemp(prefix="headwater-tail-")
        self._cached: dict[str, str] = {}  # shard name -> its decompressed/downloaded copy
        os.makedirs(self._cache, exist_ok=True)

    def close(self) -> None:
        if self._own_cache:
            shutil.rmtree(self._cache, ignore_errors=True)

    def open(self, name: str, info: dict[str, Any]) -> Reader:
        """A reader of shard ``name`` (its index entry ``info``); raises :class:`CorruptShard`."""
        raw, zipped = info["raw_data"], info.get("zip_data")
        for part in (raw, zipped):
            if part is not None and not _inside(part.get("basename")):
                raise CorruptShard(f"shard {name}: basename {str(part.get('basename'))[:120]!r} leaves the root")
        data = self._load(zipped or raw)
        dirname = self.root
        if zipped:
            try:
                data = decompress(info["compression"], data)
            except Exception as e:
                raise CorruptShard(f"cannot decompress {zipped['basename']}: {e}") from e
            self._verify(raw, data)
        if zipped or self._store is not None:
            dirname = self._cache
            path = self._cached[name] = os.path.join(dirname, raw["basename"])
            os.makedirs(os.path.dirname(path), exist_ok=True)  # object roots: writers/<id>/ basenames
            with open(path, "wb") as f:
                f.write(data)
        try:
            return reader_from_json(dirname, "", info)
        except Exception as e:
            raise CorruptShard(f"bad index entry: {type(e).__name__}: {e}") from e

    def read(self, reader: Reader, i: int) -> dict[str, Any]:
        """Sample ``i`` of an opened shard; raises :class:`CorruptShard`."""
        try:
            return self._retrying(lambda: reader.get_item(i))
        except Exception as e:
            raise CorruptShard(f"sample {i} unreadable: {type(e).__name__}: {e}") from e

    def release(self, name: str) -> None:
        """Drop the decompressed copy of shard ``name`` (done with it)."""
        cached = self._cached.pop(name, None)
        if cached is not None and os.path.exists(cached):
            os.remove(cached)

    def _retrying(self, read: Callable[[], Any]) -> Any:
        """``read()``, retrying ``OSError`` and botocore's network errors (a transient I/O failure
        must not mark a shard corrupt for good); the last failure is raised as an ``OSError``."""
        for attempt in range(self.read_attempts - 1):
            try:
                return read()
            except (OSError, BotoCoreError) as e:
                self.transient_errors += 1
                log.warning("read error, retrying (attempt %d/%d): %s", attempt + 1, self.read_attempts, e)
                time.sleep(self.retry_backoff_s * 2**attempt)
        try:
            return read()
        except BotoCoreError as e:
            raise OSError(str(e)) from e

    def _load(self, file_info: dict[str, Any]) -> bytes:
        if self._store is not None:
            store, path = self._store, f"{self.root}/{file_info['basename']}"

            def read() -> bytes:
                data = store.read(file_info["basename"])
                if data is None:
                    raise FileNotFoundError(path)
                return data
        else:
            path = os.path.join(self.root, file_info["basename"])

            def read() -> bytes:
                with open(path, "rb") as f:
                    return f.read()

        try:
            data = self._retrying(read)
        except OSError as e:
            raise CorruptShard(f"cannot read {path} after {self.read_attempts} attempts: {e}") from e
        if len(data) != file_info["bytes"]:
            raise CorruptShard(f"{file_info['basename']}: {len(data)} bytes, index says {file_info['bytes']}")
        self._verify(file_info, data)
        return data

    def _verify(self, file_info: dict[str, Any], data: bytes) -> None:
        if not self.verify_hashes:
            return
        for algo, expected in sorted(file_info.get("hashes", {}).items())[:1]:
            if get_hash(algo, data) != expected:
                raise CorruptShard(f"{file_info['basename']}: {algo} hash mismatch")


class TailReader:
    """Yields samples of a stream root's shards as they appear.

    Args:
        root: the stream root a :class:`LiveStreamWriter` publishes into.
        domains: only shards of these domains (``None``: all).
        poll_interval_s: how often to re-check index.json while idle.
        exclude_shards: shard names to skip (quarantine); see :meth:`exclude`.
        on_corrupt: called ``(shard_name, reason)`` for a shard that fails verification or decoding.
        cache_dir: where compressed shards are decompressed (a private temp dir by default).
        verify_hashes: check shard files against the index hashes before reading.
        read_attempts: an ``OSError`` while reading a shard is retried (exponential backoff from
            ``retry_backoff_s``) this many times in all before the shard is reported corrupt.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        domains: Iterable[str] | None = None,
        poll_interval_s: float = 0.2,
        exclude_shards: Iterable[str] = (),
        on_corrupt: Callable[[str, str], None] | None = None,
        cache_dir: str | None = None,
        verify_hashes: bool = True,
        read_attempts: int = 4,
        retry_backoff_s: float = 0.1,
    ):
        self.root = storage.normalize_root(root)
        self.domains = None if domains is None else frozenset(domains)
        self.poll_interval_s = poll_interval_s
        self.exclude_shards: set[str] = set(exclude_shards)
        self.on_corrupt = on_corrupt
        self.opener = ShardOpener(self.root, cache_dir=cache_dir, verify_hashes=verify_hashes,
                                  read_attempts=read_attempts, retry_backoff_s=retry_backoff_s)
        self._wake = threading.Event()
        self._watcher = IndexWatcher(self.root)
        self._queue: deque[str] = deque()
        self._done: set[str] = set()
        self._corrupt: set[str] = set()
        self._current: str | None = None
        self._position = 0

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.opener.close()

    @property
    def transient_errors(self) -> int:
        """OSErrors that a retry got past."""
        return self.opener.transient_errors

    # --- following ---------------------------------------------------------------------------
    def notify(self, event: ShardPublished | None = None) -> None:
        """Wake an idle :meth:`samples` loop now (e.g. on a ShardPublished from the shards topic)."""
        self._wake.set()

    def exclude(self, names: Iterable[str]) -> None:
        """Quarantine shards: they are skipped (also mid-shard, at the next sample)."""
        self.exclude_shards.update(names)

    def poll(self) -> list[str]:
        """Re-read index.json if it changed; return names of newly visible shards (in order)."""
        new = []
        for entry in self._watcher.poll():
            name = entry.name
            if self.domains is not None and entry.domain not in self.domains:
                continue
            if name in self._done or name == self._current:
                continue
            if entry.replaces and self._take_over(entry):
                continue
            self._queue.append(name)
            new.append(name)
        for name in self._watcher.emptied.intersection(self._queue):  # nothing left to read in it
            self._queue.remove(name)
            self._done.add(name)
        return new

    def _take_over(self, entry: ShardEntry) -> bool:
        """A takedown rewrote ``entry.replaces`` into ``entry``: carry this reader's progress over
        (done stays done; the current shard continues at the same sample). True: do not queue it."""
        old = entry.replaces
        if old in self._done:
            self._done.add(entry.name)
            return True
        if old == self._current:
            self._current = entry.name
            self._position -= sum(1 for i in entry.removed if i < self._position)
            return True
        if old in self._queue:
            self._queue[self._queue.index(old)] = entry.name
            return True
        return False

    def samples(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield samples (dicts with the MDS columns plus ``_shard`` and ``_index``).

        Waits for new shards while idle; returns after ``timeout_s`` seconds without a new
        sample (``None``: follow forever, ``0``: drain what is published now).
        """
        idle_since = time.monotonic()
        while True:
            if self._current is None:
                self.poll()  # a stat; also maps queued shards a takedown rewrote to their replacements
                if self._queue:
                    self._current, self._position = self._queue.popleft(), 0
            progressed = False
            if self._current is not None:
                current = self._current
                for sample in self._read_current():
                    progressed = True
                    yield sample
                progressed = progressed or self._current != current  # finished, or moved to a replacement
            if progressed:
                idle_since = time.monotonic()
                continue
            if timeout_s is not None and time.monotonic() - idle_since >= timeout_s:
                return
            wait = self.poll_interval_s
            if timeout_s is not None:
                wait = max(0.0, min(wait, timeout_s - (time.monotonic() - idle_since)))
            self._wake.wait(wait)
            self._wake.clear()

    def _read_current(self) -> Iterator[dict[str, Any]]:
        name = self._current
        assert name is not None
        infos = self._watcher.entries
        if name not in infos:  # restored cursor: wait until the index lists it
            self.poll()
            if name not in infos:
                if name in self._watcher.emptied:  # a takedown removed every sample of it
                    self._finish(name, done=True)
                return
        info = infos[name].info
        reader = None
        try:
            if name not in self.exclude_shards:
                reader = self.opener.open(name, info)
            while reader is not None and self._current == name and self._position < info["samples"]:
                if name in self.exclude_shards:
                    break
                i = self._position
                sample = self.opener.read(reader, i)
                sample["_shard"], sample["_index"] = name, i
                self._position = i + 1
                if self._position == info["samples"]:
                    self._finish(name, done=True)
                yield sample
        except CorruptShard as e:
            self._corrupt.add(name)
            self._finish(name, done=True)
            log.warning("skipping corrupt shard %s: %s", name, e)
            if self.on_corrupt is not None:
                self.on_corrupt(name, str(e))
            return
        if self._current == name:  # excluded or empty: leave it (not done) and move on
            self._finish(name, done=False)

    def _finish(self, name: str, *, done: bool) -> None:
        if done:
            self._done.add(name)
        self._current, self._position = None, 0
        self.opener.release(name)

    # --- cursor ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cursor: shards fully consumed (or skipped as corrupt) and the position in the current one.

        A sample counts as consumed once :meth:`samples` has yielded it; save the cursor together
        with whatever consumed those samples (JSON-serialisable).
        """
        return {
            "version": CURSOR_VERSION,
            "done": sorted(self._done),
            "corrupt": sorted(self._corrupt),
            "current": self._current,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next sample is the one after the last consumed."""
        if state.get("version") != CURSOR_VERSION:
            raise ValueError(f"TailReader cursor version {state.get('version')!r} (this reader knows {CURSOR_VERSION})")
        self._done = set(state["done"])
        self._corrupt = set(state.get("corrupt", ()))
        self._current, self._position = state["current"], int(state["position"])
        self._watcher = IndexWatcher(self.root)
        self._queue.clear()
