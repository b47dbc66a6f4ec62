"""TailReader: follow a live MDS stream root as shards are published, with a resumable cursor.

Shards are consumed in publish order (index.json order). The cursor (:meth:`state_dict`) names
the shards fully consumed and the position inside the current one, so a reader restored with
:meth:`load_state_dict` neither repeats nor skips a sample. Shards are verified against the
index hashes and read with mosaicml-streaming's own ``MDSReader`` (via ``reader_from_json``);
a corrupt or missing shard is reported to ``on_corrupt`` and skipped.
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
from types import TracebackType
from typing import Any, Self

from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.format.base.reader import Reader
from streaming.base.hashing import get_hash

from streams import manifest as mf
from streams.events import ShardPublished

__all__ = ["CURSOR_VERSION", "TailReader"]

CURSOR_VERSION = 1
log = logging.getLogger(__name__)


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
        self.root = os.path.abspath(os.fspath(root))
        self.domains = None if domains is None else frozenset(domains)
        self.poll_interval_s = poll_interval_s
        self.exclude_shards: set[str] = set(exclude_shards)
        self.on_corrupt = on_corrupt
        self.verify_hashes = verify_hashes
        self.read_attempts, self.retry_backoff_s = max(1, read_attempts), retry_backoff_s
        self.transient_errors = 0  # OSErrors that a retry got past
        self._own_cache = cache_dir is None
        self._cache = cache_dir or tempfile.mkdtemp(prefix="headwater-tail-")
        os.makedirs(self._cache, exist_ok=True)
        self._wake = threading.Event()
        self._index_stat: tuple[int, int, int] | None = None
        self._infos: dict[str, dict[str, Any]] = {}
        self._domain_of: dict[str, str] = {}
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
        if self._own_cache:
            shutil.rmtree(self._cache, ignore_errors=True)

    # --- following ---------------------------------------------------------------------------
    def notify(self, event: ShardPublished | None = None) -> None:
        """Wake an idle :meth:`samples` loop now (e.g. on a ShardPublished from the shards topic)."""
        self._wake.set()

    def exclude(self, names: Iterable[str]) -> None:
        """Quarantine shards: they are skipped (also mid-shard, at the next sample)."""
        self.exclude_shards.update(names)

    def poll(self) -> list[str]:
        """Re-read index.json if it changed; return names of newly visible shards (in order)."""
        path = os.path.join(self.root, mf.INDEX)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._index_stat:
            return []
        try:
            index = mf.read_index(self.root)
            side = mf.read_sidecar(self.root)  # read after the index: holds every shard listed there
        except (ValueError, OSError):
            return []  # a foreign, half-written file: try again at the next poll
        self._index_stat = stamp
        new = []
        for info in index["shards"]:
            name = mf.shard_name_of(info)
            if name in self._infos:
                continue
            self._infos[name] = info
            entry = side["shards"].get(name)
            self._domain_of[name] = entry["domain"] if entry else name.split(".", 1)[0]
            if self.domains is not None and self._domain_of[name] not in self.domains:
                continue
            if name in self._done or name == self._current:
                continue
            self._queue.append(name)
            new.append(name)
        return new

    def samples(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield samples (dicts with the MDS columns plus ``_shard`` and ``_index``).

        Waits for new shards while idle; returns after ``timeout_s`` seconds without a new
        sample (``None``: follow forever, ``0``: drain what is published now).
        """
        idle_since = time.monotonic()
        while True:
            if self._current is None:
                if not self._queue:
                    self.poll()
                if self._queue:
                    self._current, self._position = self._queue.popleft(), 0
            progressed = False
            if self._current is not None:
                for sample in self._read_current():
                    progressed = True
                    yield sample
                progressed = progressed or self._current is None
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
        if name not in self._infos:  # restored cursor: wait until the index lists it
            self.poll()
            if name not in self._infos:
                return
        info = self._infos[name]
        reader = None
        try:
            if name not in self.exclude_shards:
                reader = self._open(name, info)
            while reader is not None and self._current == name and self._position < info["samples"]:
                if name in self.exclude_shards:
                    break
                i = self._position
                try:
                    sample = self._retrying(lambda i=i: reader.get_item(i))
                except Exception as e:
                    raise _Corrupt(f"sample {i} unreadable: {type(e).__name__}: {e}") from e
                sample["_shard"], sample["_index"] = name, i
                self._position = i + 1
                if self._position == info["samples"]:
                    self._finish(name, done=True)
                yield sample
        except _Corrupt as e:
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
        cached = os.path.join(self._cache, f"{name}.mds")
        if os.path.exists(cached):
            os.remove(cached)

    def _open(self, name: str, info: dict[str, Any]) -> Reader:
        raw, zipped = info["raw_data"], info.get("zip_data")
        data = self._load(zipped or raw)
        dirname = self.root
        if zipped:
            try:
                data = decompress(info["compression"], data)
            except Exception as e:
                raise _Corrupt(f"cannot decompress {zipped['basename']}: {e}") from e
            self._verify(raw, data)
            dirname = self._cache
            with open(os.path.join(dirname, raw["basename"]), "wb") as f:
                f.write(data)
        try:
            return reader_from_json(dirname, "", info)
        except Exception as e:
            raise _Corrupt(f"bad index entry: {type(e).__name__}: {e}") from e

    def _retrying(self, read: Callable[[], Any]) -> Any:
        """``read()``, retrying ``OSError`` (a transient I/O failure must not mark a shard corrupt for good)."""
        for attempt in range(self.read_attempts - 1):
            try:
                return read()
            except OSError as e:
                self.transient_errors += 1
                log.warning("read error, retrying (attempt %d/%d): %s", attempt + 1, self.read_attempts, e)
                time.sleep(self.retry_backoff_s * 2**attempt)
        return read()

    def _load(self, file_info: dict[str, Any]) -> bytes:
        path = os.path.join(self.root, file_info["basename"])

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        try:
            data = self._retrying(read)
        except OSError as e:
            raise _Corrupt(f"cannot read {path} after {self.read_attempts} attempts: {e}") from e
        if len(data) != file_info["bytes"]:
            raise _Corrupt(f"{file_info['basename']}: {len(data)} bytes, index says {file_info['bytes']}")
        self._verify(file_info, data)
        return data

    def _verify(self, file_info: dict[str, Any], data: bytes) -> None:
        if not self.verify_hashes:
            return
        for algo, expected in sorted(file_info.get("hashes", {}).items())[:1]:
            if get_hash(algo, data) != expected:
                raise _Corrupt(f"{file_info['basename']}: {algo} hash mismatch")

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
        self._index_stat = None
        self._infos.clear()
        self._queue.clear()


class _Corrupt(Exception):
    """A shard failed verification or decoding (internal; reported via on_corrupt)."""
