"""On-disk state of a live MDS stream root: index.json, the headwater.json sidecar, the journal.

A local stream root holds sealed shards plus a *folded* state and a *journal* after it:

* ``index.json``: the stock MDS index (``{"version": 2, "shards": [...]}``), what
  ``streaming.StreamingDataset`` reads, plus one extra key (``headwater_journal``) naming the
  journal generation that continues it.
* ``headwater.json``: per shard its domain, writer, settled Kafka offset ranges, lineage
  manifest (vocab/tokenizer/discretizer/pipeline versions) and publish time.
* ``.journal/<generation>.jsonl``: one line per publish since the last fold (the shard's index
  entry and sidecar entry together). A publish is one ``O_APPEND`` write + ``fdatasync`` under the
  root's ``fcntl`` lock, so its cost does not grow with the number of shards (rewriting index.json
  on every publish made it O(history)). A line is published once it is complete (ends with a
  newline); a torn line left by a crash is ignored by readers and cut off by the next writer.

A *fold* (:func:`write_root`) rewrites index.json and the sidecar with everything published and
starts a new, empty journal generation. Writers fold by one stateless policy (:func:`fold_due`:
the journal holds 1/8 of the folded entries, at least 8 lines, or index.json is
``fold_interval_s`` old), at start and on close; ingest jobs also check the policy while idle and
fold when they end (:func:`fold_root`). So the amortized cost per publish stays constant while a
stock reader of a copy of a live root lags the writers by a bounded amount. The sidecar is
version 2 on a root with a journal, so a writer of an older version (which would not read the
journal) refuses the root instead of settling offsets twice. Every reader here (:class:`RootView`, :func:`read_index`, :func:`read_sidecar`,
:func:`published_entries`, :func:`settled_ranges`) sees index + journal, i.e. every publish.

Object-store roots (``s3://…``) have no lock and no rename: their per-writer layout and lock-free
commit live in :mod:`streams.storage` and :mod:`streams.writer_log`; the readers here accept both
kinds of root.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from streams import faultpoints, storage
from streams.events import OffsetRange

__all__ = [
    "INDEX",
    "JOURNAL_KEY",
    "SIDECAR",
    "OverlapError",
    "RootView",
    "SettledIndex",
    "StreamManifest",
    "append_journal",
    "atomic_write_json",
    "check_record",
    "check_sidecar",
    "empty_sidecar",
    "file_lock",
    "flock_within",
    "fold",
    "fold_due",
    "fold_root",
    "fsync_dir",
    "journal_path",
    "listed_entries",
    "merge_ranges",
    "published_entries",
    "read_index",
    "read_sidecar",
    "read_writer_sidecar",
    "root_lock",
    "settled_ranges",
    "shard_name_of",
    "write_root",
]

INDEX = "index.json"
SIDECAR = "headwater.json"
LOCK = ".headwater.lock"
STAGING = ".staging"
JOURNAL_DIR = ".journal"
JOURNAL_KEY = "headwater_journal"  # index.json: the journal generation that continues it
IMPLICIT_JOURNAL = "0"  # continues a missing index.json, or one without JOURNAL_KEY
FOLD_MIN = 8  # journal lines before a size-triggered fold ...
FOLD_FRACTION = 8  # ... or 1/FOLD_FRACTION of the folded entries, whichever is more
FOLD_EMPTY = 4096  # settled-only lines folded into a root that has no shard yet
SIDECAR_FORMAT = "headwater-live-mds"
SIDECAR_VERSION = 2  # 2: the root has a publish journal (a version-1 writer would not read it)
SIDECAR_READABLE = (1, 2, 3)  # 3: an object-store writer base continued by a log (streams/writer_log.py)


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
    """The MDS index of ``root``: every published shard in publish order (an empty index if none
    was published yet; for an object-store root, the merged index of all writers)."""
    if storage.is_remote(root):
        return {"version": 2, "shards": _remote_view(root).infos}
    view = RootView(root)
    view.refresh()
    return {"version": 2, "shards": list(view.infos)}


def _read_index_file(root: str) -> tuple[dict[str, Any], tuple[int, int, int] | None]:
    """index.json of a local root and the (inode, mtime, size) stamp of the file read."""
    path = os.path.join(root, INDEX)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return {"version": 2, "shards": []}, None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if not isinstance(obj, dict) or obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
        raise ValueError(f"{path}: not an MDS version-2 index")
    return obj, (st.st_ino, st.st_mtime_ns, st.st_size)


def _index_stamp(root: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(os.path.join(root, INDEX))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def journal_path(root: str, generation: str) -> str:
    """The journal file of ``generation`` in local root ``root``."""
    return os.path.join(root, JOURNAL_DIR, f"{generation}.jsonl")


def _journal_record(rec: Any) -> dict[str, Any]:
    """A journal line's record, checked before anything is applied (else ValueError/KeyError)."""
    if not isinstance(rec, dict) or rec.get("kind") not in ("shard", "settled", "entry"):
        raise ValueError(f"not a journal record of a known kind: {str(rec)[:80]!r}")
    return check_record(rec)


def check_record(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` if it is a well-formed publish record (name, sidecar entry with settled ranges; a
    shard's index entry naming it), else ValueError/KeyError/TypeError. Local journals and
    object-store writer logs (:mod:`streams.writer_log`) share it."""
    if not isinstance(rec["name"], str) or not isinstance(rec["entry"], dict):
        raise TypeError("name must be a string and entry an object")
    merge_ranges(ranges_from_json(rec["entry"]["settled"]))  # well-formed settled ranges
    if rec["kind"] == "shard":
        if not isinstance(rec["info"], dict) or shard_name_of(rec["info"]) != rec["name"]:
            raise ValueError(f"shard {rec['name']!r}: index entry does not name it")
        str(rec["entry"]["manifest"]["vocab_version"])
    return rec


class OverlapError(ValueError):
    """Settled offset ranges overlap ranges already published with different batch boundaries."""


class JournalGone(Exception):
    """The journal a view was following was folded away (re-read the root)."""


class RootView:
    """The published state of a local stream root (folded index.json + sidecar + journal), kept
    current by :meth:`refresh`, which reads only the journal bytes appended since the last call
    unless a fold or rewrite replaced index.json.

    ``infos`` (index entries in publish order), ``side`` (the sidecar with every journal entry
    applied) and ``names`` (published shard names) are read-only to callers. With
    ``track_settled``, the settled ranges of published entries are also indexed per partition
    for :meth:`replay_of` (what a writer checks before publishing).
    """

    def __init__(self, root: str, *, track_settled: bool = False):
        self.root = root
        self.track_settled = track_settled
        self.generation = IMPLICIT_JOURNAL
        self.folded = 0  # sidecar entries (shards and settled-only windows) in the folded state
        self.tail = 0  # complete journal lines consumed
        self.infos: list[dict[str, Any]] = []
        self.side: dict[str, Any] = empty_sidecar()
        self.names: set[str] = set()
        self.reloads = 0  # full re-reads (first load, folds, rewrites)
        self._stamp: tuple[int, int, int] | None | bool = False  # False: never loaded
        self._offset = 0
        self.settled = SettledIndex()  # with track_settled: what replay_of checks

    # --- reading ----------------------------------------------------------------------------------
    def refresh(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Bring the view up to date; returns what became visible, in publish order: (name, index
        entry) per shard, (name, None) per settled-only window. After a fold or rewrite, all of it."""
        for _ in range(50):
            try:
                if self._stamp is not False and _index_stamp(self.root) == self._stamp:
                    return self._read_tail()
                return self._reload()
            except JournalGone:
                continue  # a fold replaced index.json between our reads: read it again
        raise ValueError(f"{self.root}: index.json keeps changing under the reader")

    def folded_to(self, stamp: tuple[int, int, int] | None) -> None:
        """The view's state was just written as index.json ``stamp`` with an empty journal."""
        self._stamp, self._offset, self.tail = stamp, 0, 0
        self.folded = len(self.side["shards"]) + len(self.side["settled_only"])

    def folded_age(self) -> float:
        """Seconds since index.json was last written (infinite if there is none)."""
        stamp = self._stamp
        return time.time() - stamp[1] / 1e9 if isinstance(stamp, tuple) else float("inf")

    @property
    def journal_end(self) -> int:
        """Bytes of complete journal lines read so far (where the next publish appends)."""
        return self._offset

    def entry(self, name: str) -> dict[str, Any] | None:
        """The sidecar entry of published shard or settled-only window ``name`` (None if neither)."""
        if name in self.names and name in self.side["shards"]:
            return self.side["shards"][name]
        return self.side["settled_only"].get(name)

    def published(self) -> dict[str, dict[str, Any]]:
        """Sidecar entries of published shards and settled-only windows, by name."""
        out = {n: e for n, e in self.side["shards"].items() if n in self.names}
        out.update(self.side["settled_only"])
        return out

    def _reload(self) -> list[tuple[str, dict[str, Any] | None]]:
        index, stamp = _read_index_file(self.root)
        side = check_sidecar(f"{self.root}/{SIDECAR}", _read_json(os.path.join(self.root, SIDECAR), empty_sidecar()))
        generation = index.get(JOURNAL_KEY, IMPLICIT_JOURNAL)
        self._stamp, self.generation, self._offset, self.tail = stamp, generation, 0, 0
        self.reloads += 1
        self.infos, self.side = list(index["shards"]), side
        self.folded = len(side["shards"]) + len(side["settled_only"])
        self.names = {shard_name_of(i) for i in self.infos}
        out: list[tuple[str, dict[str, Any] | None]] = [(shard_name_of(i), i) for i in self.infos]
        out += [(n, None) for n in side["settled_only"]]
        if self.track_settled:
            self.settled = SettledIndex(self.published())
        return out + self._read_tail(fresh=True)

    def _read_tail(self, *, fresh: bool = False) -> list[tuple[str, dict[str, Any] | None]]:
        path = journal_path(self.root, self.generation)
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            if self.generation == IMPLICIT_JOURNAL and _index_stamp(self.root) == self._stamp:
                return []  # created by the first append
            if not fresh:  # journals are deleted only after index.json moved on: a fold happened
                raise JournalGone from None
            if _index_stamp(self.root) != self._stamp:
                raise JournalGone from None
            raise ValueError(f"{self.root}: journal {self.generation} named by {INDEX} is missing") from None
        end = data.rfind(b"\n") + 1  # a torn last line (a crash mid-append) is not published
        records, used, error = [], 0, None
        for line in data[:end].split(b"\n")[:-1]:
            try:
                records.append(_journal_record(json.loads(line)))
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                error = f"{path}: corrupt line at byte {self._offset + used}: {type(e).__name__}: {e}"
                break
            used += len(line) + 1
        out = [self._apply(rec) for rec in records]  # the valid lines before a corrupt one, once
        self._offset += used
        self.tail += len(records)
        if error is not None:
            raise ValueError(error)
        return [o for o in out if o is not None]

    def _apply(self, rec: dict[str, Any]) -> tuple[str, dict[str, Any] | None] | None:
        kind, name, entry = rec["kind"], rec["name"], rec["entry"]  # checked by _journal_record
        if kind == "shard":
            self.side["shards"][name] = entry
            self.side["vocab_version"] = entry["manifest"]["vocab_version"]
            self.infos.append(rec["info"])
            self.names.add(name)
            result: tuple[str, dict[str, Any] | None] | None = (name, rec["info"])
        elif kind == "settled":
            self.side["settled_only"][name] = entry
            result = (name, None)
        elif kind == "entry":  # repair of a legacy root: shard listed, sidecar entry lost
            self.side["shards"][name] = entry
            result = None
        else:
            result = None
        if self.track_settled and (kind == "settled" or name in self.names):
            self.settled.add(name, entry)
        return result

    def replay_of(self, settled: Iterable[OffsetRange]) -> str | None:
        """:meth:`SettledIndex.replay_of` over everything published (needs ``track_settled``)."""
        return self.settled.replay_of(settled)


class SettledIndex:
    """The settled Kafka offset ranges of published entries, indexed per partition, for the
    writer's replay / overlap check before a publish (:meth:`replay_of`)."""

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None):
        self._spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}  # sorted by start
        self._overlapping: set[tuple[str, int]] = set()  # partitions whose spans are not disjoint
        self._by_ranges: dict[frozenset[tuple[str, int, int, int]], str] = {}
        for name, entry in (entries or {}).items():
            self.add(name, entry, sort=False)
        for part, spans in self._spans.items():
            spans.sort()
            if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
                self._overlapping.add(part)  # a legacy root: checked by a scan, not bisection

    def add(self, name: str, entry: dict[str, Any], *, sort: bool = True) -> None:
        """Index the settled ranges of published entry ``name``."""
        ranges = merge_ranges(ranges_from_json(entry["settled"]))
        if not ranges:
            return
        self._by_ranges.setdefault(frozenset((r.topic, r.partition, r.start, r.end) for r in ranges), name)
        for r in ranges:
            spans = self._spans.setdefault((r.topic, r.partition), [])
            if sort:
                i = bisect.bisect_left(spans, (r.start, r.end, name))
                if (i and spans[i - 1][1] > r.start) or (i < len(spans) and spans[i][0] < r.end):
                    self._overlapping.add((r.topic, r.partition))
                spans.insert(i, (r.start, r.end, name))
            else:
                spans.append((r.start, r.end, name))

    def replay_of(self, settled: Iterable[OffsetRange]) -> str | None:
        """The published entry that settled exactly ``settled`` (an exact replay), if any; raises
        :class:`OverlapError` if ``settled`` overlaps other published ranges.
        O(log n) per range (published ranges of one partition are disjoint: this check keeps them so)."""
        settled = merge_ranges(settled)
        if not settled:
            return None
        same = self._by_ranges.get(frozenset((r.topic, r.partition, r.start, r.end) for r in settled))
        if same is not None:
            return same
        for a in settled:
            spans = self._spans.get((a.topic, a.partition), [])
            i = bisect.bisect_left(spans, (a.end,))  # spans[:i] start before a.end
            # disjoint spans: only the last of them can reach a; else (a legacy root) scan them all
            first = 0 if (a.topic, a.partition) in self._overlapping else max(0, i - 1)
            for start, end, other in spans[first:i]:
                if a.start < end and start < a.end:
                    raise OverlapError(
                        f"{a.topic}[{a.partition}] offsets [{a.start},{a.end}) overlap [{start},{end}) "
                        f"already settled by {other!r}; resume from settled() instead of replaying")
        return None


def append_journal(view: RootView, record: dict[str, Any], *, durable: bool) -> None:
    """Append one publish record to the journal of ``view`` (which must be current and read under
    the root lock); a torn line a crash left is cut off first. On an error the journal is cut back
    to its previous end (nothing published) unless the line was completely written."""
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    path = journal_path(view.root, view.generation)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:  # the implicit generation of a new or legacy root
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if durable:
            fsync_dir(os.path.dirname(path))
            fsync_dir(view.root)
    try:
        end = view.journal_end
        size = os.fstat(fd).st_size
        if size < end:
            raise ValueError(f"{path} shrank below what was read from it ({size} < {end} bytes)")
        if size > end:  # a torn line after the last complete one
            os.ftruncate(fd, end)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(f"{path}: short write")
            if durable:
                os.fdatasync(fd)
        except BaseException:
            if os.fstat(fd).st_size < end + len(line):
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def write_root(root: str, index: dict[str, Any], side: dict[str, Any], *, durable: bool = True) -> str:
    """Fold: replace the folded state of local root ``root`` with ``index`` and ``side`` (which must
    hold everything published, e.g. from a current :class:`RootView`) and start a new, empty
    journal generation. Call under the root lock. Crash-safe: the sidecar (a superset) is written
    first; the new journal exists, fsynced, before the index names it (it is removed if the index
    write fails); old journals go last."""
    generation = uuid.uuid4().hex
    jdir = os.path.join(root, JOURNAL_DIR)
    os.makedirs(jdir, exist_ok=True)
    atomic_write_json(os.path.join(root, SIDECAR), {**side, "version": SIDECAR_VERSION}, durable=durable,
                      sync_dir=False)
    faultpoints.reach("local.fold_between")
    new_journal = journal_path(root, generation)
    with open(new_journal, "xb"):
        pass
    try:
        if durable:
            fsync_dir(jdir)
        atomic_write_json(os.path.join(root, INDEX), {"version": 2, "shards": index["shards"], JOURNAL_KEY: generation},
                          durable=durable)
    except BaseException:  # e.g. ENOSPC: the old generation stays the truth
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new_journal)
        raise
    for f in os.listdir(jdir):
        if f != f"{generation}.jsonl":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(jdir, f))
    return generation


_VIEWS: dict[str, RootView] = {}  # fold_root's views, by absolute root
_REMOTE_VIEWS: dict[str, Any] = {}  # fold_root's views of object-store roots, by URL
_VIEWS_LOCK = threading.Lock()


def fold_due(view: RootView, interval_s: float) -> bool:
    """The fold policy (stateless, so every writer and driver of a root agrees): the journal holds
    1/FOLD_FRACTION of the folded entries (shards and settled-only windows; at least FOLD_MIN
    lines), or anything while index.json is ``interval_s`` old. A root with no shard gets no index.json (a stock reader rejects an empty
    one) until FOLD_EMPTY settled-only lines pile up."""
    if not view.tail:
        return False
    if not view.infos:
        return view.tail >= FOLD_EMPTY
    return view.tail >= max(FOLD_MIN, view.folded // FOLD_FRACTION) or view.folded_age() >= interval_s


def fold_root(root: str, *, force: bool = False, interval_s: float = 30.0, durable: bool = True) -> bool:
    """Fold local root ``root``'s journal into index.json when :func:`fold_due` (with ``force``:
    whenever it holds a line and the root a shard, e.g. at the end of a bounded job, so that a stock
    reader of a copy sees everything); cheap when not due (the process keeps one incremental view
    per root). Jobs call it while idle too, so a quiet stream's index.json is at most
    ``interval_s`` behind. An object-store root: its merged index is re-derived from every writer's
    base and log (:func:`streams.writer_log.merge_index`; True if that changed it)."""
    if storage.is_remote(root):
        return _merge_remote(root, force=force, interval_s=interval_s)
    with _VIEWS_LOCK:  # one view per root per process: a call reads only what was appended since
        view = _VIEWS.setdefault(os.path.abspath(root), RootView(os.path.abspath(root)))
    with root_lock(root):
        view.refresh()
        if (force and view.tail and view.infos) or fold_due(view, interval_s):
            fold(view, durable=durable)
            return True
    return False


def _merge_remote(root: str, *, force: bool, interval_s: float) -> bool:
    from streams.writer_log import RemoteView, merge_index  # it builds on this module

    store = storage.object_root(storage.normalize_root(root))
    if not force:  # one incremental view per root per process: a HEAD and a LIST per writer
        with _VIEWS_LOCK:
            view = _REMOTE_VIEWS.setdefault(store.url, RemoteView(store))
        view.refresh()
        if not view.unmerged or time.time() - view.merged_at < interval_s:
            return False
    return bool(merge_index(store))


def fold(view: RootView, *, durable: bool = True) -> None:
    """Fold a current ``view`` (read under the root lock) into index.json + sidecar; the view
    stays current without re-reading what it wrote."""
    view.generation = write_root(view.root, {"shards": view.infos}, view.side, durable=durable)
    view.folded_to(_index_stamp(view.root))


def empty_sidecar() -> dict[str, Any]:
    return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "vocab_version": None,
            "shards": {}, "settled_only": {}}


def check_sidecar(where: str, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` if it is a sidecar this version understands (else ``ValueError``)."""
    if obj.get("format") != SIDECAR_FORMAT or obj.get("version") not in SIDECAR_READABLE:
        raise ValueError(f"{where}: unsupported sidecar {obj.get('format')!r} v{obj.get('version')!r}")
    return obj


def read_sidecar(root: str) -> dict[str, Any]:
    """The headwater.json sidecar of ``root`` with every journal entry applied (an empty one if
    missing; for an object-store root, the union of all writers' sidecars)."""
    if storage.is_remote(root):
        return _remote_view(root).side
    view = RootView(root)
    view.refresh()
    return view.side


def read_writer_sidecar(store: storage.ObjectRoot, writer_id: str) -> tuple[dict[str, Any], str | None]:
    """One writer's sidecar in an object-store root and its version."""
    side, version = store.writer_sidecar(writer_id, empty_sidecar())
    return check_sidecar(f"{store.url}/{store.writer_dir(writer_id)}/{SIDECAR}", side), version


def _remote_view(root: str) -> Any:
    from streams.writer_log import RemoteView  # it builds on this module

    view = RemoteView(storage.object_root(storage.normalize_root(root)))
    view.refresh()
    return view


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
        from streams.writer_log import read_state  # it builds on this module

        store = storage.object_root(storage.normalize_root(root))
        return {n: e for w in store.writers() for n, e in read_state(store, w).published().items()}
    view = RootView(root)
    view.refresh()
    return view.published()


def settled_ranges(root: str, *, merge: bool = True) -> list[OffsetRange]:
    """Kafka offset ranges settled by everything published in ``root`` (all writers)."""
    ranges = [r for e in published_entries(root).values() for r in ranges_from_json(e["settled"])]
    return merge_ranges(ranges) if merge else ranges


def listed_entries(side: dict[str, Any], names: set[str]) -> dict[str, dict[str, Any]]:
    """The ``shards`` entries of a writer's sidecar (object-store root) for the shard ``names`` its
    index lists, the index read first. A listed shard whose entry is gone was replaced by a
    takedown that committed and dropped the entry between the two reads: its replacement (the entry
    whose ``replaces``/``rewrites`` history names it, same settled ranges) stands in, so settled
    ranges never shrink for such a reader."""
    out = {n: e for n, e in side["shards"].items() if n in names}
    missing = names - out.keys()
    if missing:
        for n, e in side["shards"].items():
            history = {e.get("replaces")} | {str(r[0]) for r in e.get("rewrites") or ()}
            if n not in out and missing & history:
                out[n] = e
    return out
