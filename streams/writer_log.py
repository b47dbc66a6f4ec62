"""One writer of an object-store stream root: a folded *base* plus a *log* of immutable records.

Object stores cannot append, so a publish that rewrote the writer's index and sidecar cost
O(history). Instead each writer prefix ``writers/<id>/`` of a root (:mod:`streams.storage`) holds:

* ``index.json`` and ``headwater.json``: the writer's *base*, its MDS index and sidecar as of log
  record :data:`LOG_KEY` (each object carries its own), with the writer's ``owner`` token;
* ``log/<seq>.json``: one immutable record per commit after that: a shard (its index entry and
  sidecar entry together), a settled-only window, or an owner ``claim``.

**A commit is one conditional create** (``If-None-Match: *``) of the next sequence number, so
its cost does not grow with history, and two processes never both commit seq *n*: the loser
re-reads the log, re-checks replay and overlap against what won, and retries at *n+1*. A writer
that starts claims its id with a ``claim`` record: an older process with that id can commit again
only after reading past the claim, which fences it (:class:`~streams.storage.WriterFenced`).

A writer *folds* its log into its base (:func:`fold`: two ``If-Match`` puts, O(N)) by the local
journal's policy (1/8 of the base's entries, at least 8 records, or ``fold_interval_s``), at
start and on close; then it re-derives the merged root ``index.json`` (:func:`merge_index`),
which records per writer the log seq it covers (:data:`MERGED_KEY`), and deletes its records that
base and merged index both cover once they are :data:`LOG_GRACE_S` old (never the newest record:
a reader that finds the next seq missing knows it fell behind a fold and re-reads the base).
Stock readers (``StreamingDataset(remote=…)``) read the merged index, so they lag by at most one
fold; :class:`RemoteView` (what :class:`~streams.mds_reader.IndexWatcher` and
:func:`streams.manifest.read_index` use) adds every writer's records after it, so they see each
commit at once. Each writer's shards keep their log order everywhere (the merged index appends a
writer's entries in its order); the interleaving of different writers is not global.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from streams import faultpoints, storage
from streams import manifest as mf

__all__ = [
    "LOG_GRACE_S",
    "LOG_KEY",
    "MERGED_KEY",
    "LogGap",
    "RemoteView",
    "RootStates",
    "WriterState",
    "append",
    "collect_log",
    "fan_out",
    "fold",
    "fold_due",
    "gc_log",
    "log_key",
    "merge_index",
    "read_log",
    "read_state",
    "read_states",
    "refresh_state",
    "root_states",
]

log = logging.getLogger(__name__)
LOG = "log"
LOG_KEY = "headwater_log_seq"  # base index.json / headwater.json: the last log record folded into it
MERGED_KEY = "headwater_writers"  # merged index.json: per writer, the last log record it covers
FOLDED_AT = "headwater_folded_at"
ACKED_KEY = "headwater_acked_seq"  # base index.json: every shard record up to it had its event delivered
#: Folded records stay this long (a reader that lags more re-reads the base).
LOG_GRACE_S = 120.0
#: Sidecar version of a writer base continued by a log (older versions would not read the log).
BASE_SIDECAR_VERSION = 3
_KINDS = ("shard", "settled", "claim")
_RECORD_KEY = re.compile(r"([0-9]{12})\.json")
#: A record's data basename: ``<16 hex attempt>/<name>.mds[.<compression ext>]`` (never a path out).
_BASENAME = re.compile(r"[0-9a-f]{16}/([A-Za-z0-9_.-]+)\.mds(\.[a-z0-9]+)?")
_ENTRY_TYPES = {"domain": str, "writer_id": str, "samples": int, "bytes": int, "published_at": (int, float)}
#: Concurrent requests of one view or writer (the per-writer LISTs and state reads).
FANOUT = 16
#: A reader lists a writer idle for k polls only every min(2^k, IDLE_SKIP_MAX)-th poll.
IDLE_SKIP_MAX = 16
RELOAD_ATTEMPTS = 5


class LogGap(Exception):
    """Records the reader needs were folded and deleted since it read the base: read it again."""


def _log_dir(writer_id: str) -> str:
    return f"{storage.WRITERS}/{writer_id}/{LOG}"


def log_key(writer_id: str, seq: int) -> str:
    """The object key (root-relative) of record ``seq`` of ``writer_id``'s log."""
    return f"{_log_dir(writer_id)}/{seq:012d}.json"


def _record(writer_id: str, seq: int, data: bytes) -> dict[str, Any]:
    """A parsed, checked log record (``ValueError`` on anything else: a root holds no such object).
    Basenames must be ``<attempt>/<name>.mds[.ext]`` and entries name this writer, so a record
    cannot point a reader's cache path outside its directory or at another writer's shards."""
    try:
        rec = json.loads(data)
        if not isinstance(rec, dict) or rec.get("seq") != seq or rec.get("kind") not in _KINDS:
            raise ValueError("not a log record of this sequence number")
        if not isinstance(rec.get("owner"), str):
            raise TypeError("owner must be a string")
        if rec["kind"] != "claim":
            mf.check_record(rec)
            entry = rec["entry"]
            for key, kind in _ENTRY_TYPES.items():
                if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                    raise TypeError(f"entry field {key!r} must be {kind}")
            if entry["writer_id"] != writer_id:
                raise ValueError(f"entry of writer {entry['writer_id']!r} in the log of {writer_id!r}")
        if rec["kind"] == "shard":
            for key in ("raw_data", "zip_data"):
                part = rec["info"].get(key)
                if part is None and key == "zip_data":
                    continue
                match = _BASENAME.fullmatch(part["basename"]) if isinstance(part, dict) else None
                if match is None or match[1] != rec["name"]:
                    raise ValueError(f"{key} basename {str(part)[:80]!r} is not <attempt>/{rec['name']}.mds[.ext]")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{log_key(writer_id, seq)}: corrupt log record: {type(e).__name__}: {e}") from None
    return rec


def fan_out(fn: Callable[[str], Any], items: Iterable[str]) -> dict[str, Any]:
    """``{item: fn(item)}``, up to :data:`FANOUT` requests at a time (per-writer reads are
    independent; one after another they would cost W round trips)."""
    items = list(items)
    if len(items) <= 1:
        return {i: fn(i) for i in items}
    with ThreadPoolExecutor(min(FANOUT, len(items))) as pool:
        return dict(zip(items, pool.map(fn, items), strict=True))


def collect_log(store: storage.ObjectRoot, writer_id: str, after: int) -> list[tuple[int, dict[str, Any]]]:
    """``(seq, listing entry)`` of the log records of ``writer_id`` after ``after``, in order (one
    LIST from the key after ``after``: O(records returned), not O(history))."""
    bucket, _, prefix = store.path(_log_dir(writer_id)).partition("/")
    out: list[tuple[int, dict[str, Any]]] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}/", "StartAfter": f"{prefix}/{after:012d}.json"}
    while True:
        page = store.fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            match = _RECORD_KEY.fullmatch(obj["Key"].rsplit("/", 1)[-1])
            if match and int(match[1]) > after:  # anything else under log/ is not a record
                out.append((int(match[1]), obj))
        if not page.get("IsTruncated"):
            return sorted(out, key=lambda item: item[0])
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def read_log(store: storage.ObjectRoot, writer_id: str, after: int,
             on_corrupt: Callable[[ValueError], None] | None = None) -> list[dict[str, Any]]:
    """The records of ``writer_id``'s log after seq ``after``, in order, up to the first missing
    seq; :class:`LogGap` if the first one (``after + 1``) is gone (folded and deleted). A corrupt
    record raises ``ValueError``; with ``on_corrupt``, it is passed there and the valid records
    before it are returned (a reader keeps every other writer, and this one up to there)."""
    listed = collect_log(store, writer_id, after)
    seqs = []
    for seq, _ in listed:
        if seq != after + 1 + len(seqs):
            break
        seqs.append(seq)
    if listed and not seqs:
        raise LogGap(f"{store.url}/{_log_dir(writer_id)}: record {after + 1} is gone")
    if not seqs:
        return []
    paths = [store.path(log_key(writer_id, s)) for s in seqs]
    try:
        blobs = store.fs.cat(paths) if len(paths) > 1 else {paths[0]: store.fs.cat_file(paths[0])}
    except FileNotFoundError as e:  # deleted between the listing and the read
        raise LogGap(str(e)) from None
    out = []
    for seq, path in zip(seqs, paths, strict=True):
        try:
            out.append(_record(writer_id, seq, blobs[path]))
        except ValueError as e:
            if on_corrupt is None:
                raise
            on_corrupt(e)
            break
    return out


def read_states(store: storage.ObjectRoot, writers: Iterable[str]) -> tuple[dict[str, WriterState], dict[str, str]]:
    """:func:`read_state` of each writer (concurrently); writers whose state cannot be read (a
    corrupt record or base) are returned apart with their error, so one cannot stop the root."""
    def one(writer_id: str) -> WriterState | str:
        try:
            return read_state(store, writer_id)
        except ValueError as e:
            log.error("%s: writer %s is unreadable, its shards stay as last merged: %s", store.url, writer_id, e)
            return str(e)

    got = fan_out(one, writers)
    return ({w: s for w, s in got.items() if isinstance(s, WriterState)},
            {w: s for w, s in got.items() if isinstance(s, str)})


@dataclass(slots=True)
class WriterState:
    """One writer's effective state: its base with every log record after it applied.

    ``index``/``side`` hold writer-relative basenames; ``index_v``/``side_v`` are the versions of
    the base objects read (``None`` for an incremental refresh's caller to ignore: only
    :func:`read_state` sets them); ``seq`` is the last record applied."""

    writer_id: str
    index: dict[str, Any]
    side: dict[str, Any]
    index_v: str | None = None
    side_v: str | None = None
    seq: int = 0
    owner: str | None = None
    folded_at: float = 0.0
    base_entries: int = 0  # sidecar entries of the base (the fold policy's measure)
    unfolded: int = 0  # records after the older of the two bases
    acked: int = 0  # ShardPublished delivered for every shard record up to this seq (outbox)
    names: set[str] = field(default_factory=set)
    _index_seq: int = 0
    _side_seq: int = 0
    _owner_seq: int = 0

    def published(self) -> dict[str, dict[str, Any]]:
        """Sidecar entries of the shards its index lists, and its settled-only windows, by name."""
        out = mf.listed_entries(self.side, self.names)
        out.update(self.side["settled_only"])
        return out

    def apply(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Apply one record (the next seq); returns it if it published something new."""
        seq, kind = rec["seq"], rec["kind"]
        self.seq, self.unfolded = seq, self.unfolded + 1
        if kind == "claim":
            if seq > self._owner_seq:  # else the newer base already names this owner or a later one
                self.owner, self._owner_seq = rec["owner"], seq
            return None
        new = False
        if kind == "shard" and seq > self._index_seq:
            self.index["shards"].append(rec["info"])
            self.names.add(rec["name"])
            new = True
        if seq > self._side_seq:
            if kind == "shard":
                self.side["shards"][rec["name"]] = rec["entry"]
                self.side["vocab_version"] = rec["entry"]["manifest"]["vocab_version"]
            else:
                self.side["settled_only"][rec["name"]] = rec["entry"]
            new = True
        return rec if new else None


def read_state(store: storage.ObjectRoot, writer_id: str) -> WriterState:
    """Read ``writer_id``'s base and log (O(its history)); retried while a fold moves the base."""
    for attempt in range(storage.CAS_ATTEMPTS):
        index, index_v = store.writer_index(writer_id)
        side, side_v = mf.read_writer_sidecar(store, writer_id)
        i_seq, s_seq = int(index.get(LOG_KEY, 0)), int(side.get(LOG_KEY, 0))
        owner, owner_seq = (index.get("owner"), i_seq) if i_seq >= s_seq else (side.get("owner"), s_seq)
        state = WriterState(writer_id, index, side, index_v, side_v, seq=min(i_seq, s_seq), owner=owner,
                            folded_at=float(min(index.get(FOLDED_AT, 0), side.get(FOLDED_AT, 0))),
                            base_entries=len(side["shards"]) + len(side["settled_only"]),
                            names={mf.shard_name_of(i) for i in index["shards"]}, _index_seq=i_seq,
                            _side_seq=s_seq, _owner_seq=owner_seq, acked=int(index.get(ACKED_KEY, i_seq)))
        try:
            records = read_log(store, writer_id, state.seq)
        except LogGap:
            storage.backoff(attempt)
            continue
        for rec in records:
            state.apply(rec)
        state.seq = max(state.seq, i_seq, s_seq)
        return state
    raise ValueError(f"{store.url}/{storage.WRITERS}/{writer_id}: the base keeps moving under the reader")


def refresh_state(store: storage.ObjectRoot, state: WriterState) -> tuple[WriterState, list[dict[str, Any]] | None]:
    """Bring ``state`` up to date by reading only the records after its seq (one LIST). Returns
    the state and the records that published something, or (a fresh :func:`read_state`, None)
    when it fell behind a fold (everything must be re-read)."""
    try:
        records = read_log(store, state.writer_id, state.seq)
    except LogGap:
        return read_state(store, state.writer_id), None
    return state, [r for r in map(state.apply, records) if r is not None]


class RootStates:
    """Every writer's effective state of one object-store root and the settled-range index over
    them (what a writer checks replays and overlaps against), kept current incrementally. One per
    root per process (:func:`root_states`), shared by its writers: ``lock`` guards every use."""

    def __init__(self, store: storage.ObjectRoot):
        self.store = store
        self.lock = threading.Lock()
        self.states: dict[str, WriterState] = {}
        self.settled = mf.SettledIndex()
        self._warned: set[str] = set()

    def sync(self, own: str) -> WriterState:
        """Read what every writer committed since the last sync (one LIST of the writer prefixes,
        one LIST per writer log, concurrently; a writer seen first or fallen behind a fold is read
        in full); returns writer ``own``'s state. Another writer whose log is corrupt keeps its
        last good state (logged); ``own``'s raises ``ValueError``."""
        store = self.store

        def one(writer_id: str) -> tuple[WriterState | None, list[dict[str, Any]] | None]:
            state = self.states.get(writer_id)
            try:
                return (read_state(store, writer_id), None) if state is None else refresh_state(store, state)
            except ValueError as e:
                if writer_id == own:
                    raise
                if str(e) not in self._warned:
                    self._warned.add(str(e))
                    log.error("%s: writer %s is unreadable, checked as last read: %s", store.url, writer_id, e)
                return state, []

        rebuild = False
        for writer_id, (state, records) in fan_out(one, store.writers()).items():
            if state is None:
                continue
            first = writer_id not in self.states
            self.states[writer_id] = state
            if first:
                for name, entry in state.published().items():
                    self.settled.add(name, entry)
            elif records is None:
                rebuild = True
            else:
                for rec in records:
                    self.settled.add(rec["name"], rec["entry"])
        if rebuild:
            self.settled = mf.SettledIndex({n: e for st in self.states.values() for n, e in st.published().items()})
        return self.states[own]

    def entries(self) -> int:
        """Shards and settled-only windows of the whole root (the fold policy's measure)."""
        return sum(len(s.names) + len(s.side["settled_only"]) for s in self.states.values())

    def published_entry(self, name: str) -> dict[str, Any]:
        """The sidecar entry of published shard or settled-only window ``name`` (any writer)."""
        for state in self.states.values():
            entry = state.published().get(name)
            if entry is not None:
                return entry
        raise KeyError(name)

    def vocab_version(self, own: str) -> str | None:
        """The vocab of writer ``own``, else of any writer of the root."""
        ordered = [self.states[own], *self.states.values()] if own in self.states else list(self.states.values())
        return next((s.side["vocab_version"] for s in ordered if s.side["vocab_version"]), None)


_ROOTS: dict[tuple[str, int], RootStates] = {}
_ROOTS_LOCK = threading.Lock()


def root_states(store: storage.ObjectRoot) -> RootStates:
    """The process's :class:`RootStates` of ``store`` (per pid: a forked child starts its own)."""
    with _ROOTS_LOCK:
        return _ROOTS.setdefault((store.url, os.getpid()), RootStates(store))


def append(store: storage.ObjectRoot, state: WriterState, record: dict[str, Any]) -> bool:
    """Commit ``record`` as the next record after ``state.seq`` (a conditional create); applied to
    ``state`` if it won. False if that seq is taken (refresh and check again); True also when our
    own earlier attempt of these bytes won (its response was lost)."""
    rec = {**record, "seq": state.seq + 1}
    data = storage.json_bytes(rec)
    key = log_key(state.writer_id, rec["seq"])
    try:
        store.put(key, data, if_version=None)
    except storage.PreconditionFailed:
        if store.read(key) != data:
            return False
    state.apply(rec)
    return True


def fold_due(state: WriterState, interval_s: float, root_entries: int) -> bool:
    """The local journal's fold policy (:func:`streams.manifest.fold_due`) for one writer's log,
    measured against the whole root's ``root_entries`` (a fold re-derives the merged index, which
    costs O(root), so a writer with a small prefix in a large root must not fold every 8 records)."""
    if not state.unfolded:
        return False
    due = max(mf.FOLD_MIN, root_entries // mf.FOLD_FRACTION)
    return state.unfolded >= due or time.time() - state.folded_at >= interval_s


def fold(store: storage.ObjectRoot, writer_id: str, owner: str, acked: int | None = None) -> WriterState:
    """Fold ``writer_id``'s log into its base (sidecar first, then index; each ``If-Match`` the
    version read, retried from a fresh read when a takedown edited it) as owner ``owner``,
    recording ``acked`` (the outbox watermark; ``None``: keep the base's);
    :class:`~streams.storage.WriterFenced` if another process claimed the id. Returns the state."""
    wdir = store.writer_dir(writer_id)
    for attempt in range(storage.CAS_ATTEMPTS):
        state = read_state(store, writer_id)
        if state.owner != owner:
            raise storage.WriterFenced(
                f"{store.url}/{wdir}: writer id {writer_id!r} is now owned by {state.owner!r}, not by this "
                f"writer ({owner!r}); another process started with this writer id, so this one may not commit "
                "(writer ids must be unique per live process)")
        stamp = {"owner": owner, LOG_KEY: state.seq, FOLDED_AT: time.time()}
        state.acked = state.acked if acked is None else acked
        try:
            store.put(f"{wdir}/{mf.SIDECAR}", storage.json_bytes({**state.side, **stamp, "version": BASE_SIDECAR_VERSION}),
                      if_version=state.side_v)
            faultpoints.reach("remote.fold_between")
            store.put(f"{wdir}/{mf.INDEX}", storage.json_bytes({**state.index, **stamp, ACKED_KEY: state.acked}),
                      if_version=state.index_v)
        except storage.PreconditionFailed:  # a takedown (or a claim) changed the base: read again
            storage.backoff(attempt)
            continue
        state.folded_at, state.unfolded = stamp[FOLDED_AT], 0
        state.base_entries = len(state.side["shards"]) + len(state.side["settled_only"])
        state._index_seq = state._side_seq = state._owner_seq = state.seq
        return state
    raise storage.PreconditionFailed(f"{store.url}/{wdir}: fold lost {storage.CAS_ATTEMPTS} times")


def gc_log(store: storage.ObjectRoot, writer_id: str, upto: int) -> int:
    """Delete ``writer_id``'s records up to seq ``upto`` (what its base and the merged index
    cover) created :data:`LOG_GRACE_S` before its newest one (the store's clock), never the
    newest. Returns how many."""
    listed = collect_log(store, writer_id, 0)
    if not listed:
        return 0
    newest = listed[-1]  # its LastModified is the clock: the store's, never this host's
    cutoff = newest[1]["LastModified"].timestamp() - LOG_GRACE_S
    doomed = [store.path(log_key(writer_id, seq)) for seq, obj in listed[:-1]
              if seq <= upto and obj["LastModified"].timestamp() <= cutoff]
    if doomed:
        store.fs.rm(doomed)
    return len(doomed)


# --- the merged root index ---------------------------------------------------------------------
def merge_index(store: storage.ObjectRoot) -> int:
    """Derive the merged root index from every writer's effective state (compare-and-swap,
    retried on conflict). Every entry its writer still lists keeps its position; an entry that a
    takedown replaced gives its position to its replacement (the writer's sidecar entry that
    ``replaces`` it); an entry its writer no longer lists is dropped; every entry not yet merged is
    appended (writers in id order, each in its own order). Entries outside ``writers/`` are kept
    as they are, and so are those of a writer whose state cannot be read (:func:`read_states`).
    Records per writer the log seq covered. Returns how many entries were added or dropped (0: the
    shard list was current)."""
    for attempt in range(storage.CAS_ATTEMPTS):
        merged, version = store.root_index()
        states, broken = read_states(store, store.writers())
        shards = _derive(states, merged["shards"], _listed(store, states, merged["shards"], broken))
        covered = {w: s.seq for w, s in states.items()}
        covered.update({w: (merged.get(MERGED_KEY) or {}).get(w, 0) for w in broken})
        before, after = [_basename(i) for i in merged["shards"]], [_basename(i) for i in shards]
        if before == after and merged.get(MERGED_KEY) == covered:
            return 0
        if not shards and not merged["shards"]:
            return 0  # no shard yet: no index.json (a stock reader rejects an empty one)
        faultpoints.reach("remote.before_merge")
        try:
            store.put(mf.INDEX, storage.json_bytes({**merged, "shards": shards, MERGED_KEY: covered}),
                      if_version=version)
            return len(set(before) ^ set(after))
        except storage.PreconditionFailed:  # lost the CAS, or a 409 conflict: re-read and retry
            storage.backoff(attempt)
    raise storage.PreconditionFailed(f"{store.url}/{mf.INDEX}: {storage.CAS_ATTEMPTS} merge attempts lost to other writers")


def _listed(store: storage.ObjectRoot, states: dict[str, WriterState], merged: list[dict[str, Any]],
            broken: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every writer's index entries with root-relative basenames, by basename (writers in id
    order); an unreadable writer's entries as ``merged`` lists them."""
    out = {_basename(e): e for w, st in states.items()
           for e in (storage.prefixed(i, f"{store.writer_dir(w)}/") for i in st.index["shards"])}
    out.update({_basename(e): e for e in merged if _writer_of(_basename(e)) in broken})
    return out


def _derive(states: dict[str, WriterState], merged: list[dict[str, Any]],
            listed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The merged shard list from the previous one and every writer's ``listed`` entries."""
    successor: dict[tuple[str, str], str] = {}  # (writer, replaced shard name) -> replacement basename
    by_name = {(_writer_of(b), _name(b)): b for b in listed}
    for writer_id, state in states.items():  # a takedown rewrote shards: the sidecar says what replaces what
        for name, entry in state.side["shards"].items():
            new = by_name.get((writer_id, name))
            if new is not None and entry.get("replaces"):
                successor[(writer_id, entry["replaces"])] = new
    out: list[dict[str, Any]] = []
    placed: set[str] = set()
    for info in merged:
        b = _basename(info)
        if not _writer_of(b):  # not a writer's shard (e.g. a copied local root): left alone
            out.append(info)
            continue
        if b not in listed:
            b = successor.get((_writer_of(b), _name(b)))
            if b is None:  # emptied by a takedown, or replaced twice before a merge: dropped
                continue
        if b not in placed:
            out.append(listed[b])
            placed.add(b)
    out += [e for b, e in listed.items() if b not in placed]
    return out


def _basename(info: dict[str, Any]) -> str:
    return info["raw_data"]["basename"]


def _writer_of(basename: str) -> str:
    """The writer id of a merged-index basename ``writers/<id>/…`` ("" for anything else)."""
    parts = basename.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == storage.WRITERS else ""


def _name(basename: str) -> str:
    return basename.rsplit("/", 1)[-1].removesuffix(".mds")


# --- readers -------------------------------------------------------------------------------------
class RemoteView:
    """What an object-store root has published, kept current by :meth:`refresh`: the merged
    index as a merge would derive it now (:func:`merge_index`), then each writer's newer records.

    A poll is a HEAD of the merged index, a LIST of the writer prefixes and one LIST per writer
    log (concurrently); a writer whose log was idle for k polls in a row is listed only every
    min(2^k, :data:`IDLE_SKIP_MAX`)-th poll, so a root of many quiet writers costs few requests
    (a quiet writer's next record shows up that many polls later at most). The whole root is
    re-read only when the merged index changed (after a merge or a takedown). A writer whose log
    holds a corrupt record is logged and kept up to that record; the others go on.

    ``infos`` (merged-index entries, root-relative basenames) and ``side`` (the union of the
    writers' sidecars) are read-only to callers; ``reloads`` counts full re-reads, ``unmerged``
    the records read since (what the merged index lacks) and ``merged_at`` its modification time."""

    def __init__(self, store: storage.ObjectRoot):
        self.store = store
        self.infos: list[dict[str, Any]] = []
        self.side: dict[str, Any] = mf.empty_sidecar()
        self.reloads = 0
        self.unmerged = 0
        self.merged_at = 0.0
        self._version: str | None | bool = False  # False: never loaded
        self._seen: dict[str, int] = {}  # writer -> last log seq applied
        self._idle: dict[str, int] = {}  # writer -> polls in a row that found nothing new
        self._polls = 0
        self._warned: set[str] = set()

    def refresh(self) -> None:
        """Bring the view up to date."""
        head = self.store.head(mf.INDEX)
        if (head[0] if head else None) != self._version:
            self._reload()
            return
        self._polls += 1
        due = [w for w in self.store.writers() if self._polls % min(2 ** self._idle.get(w, 0), IDLE_SKIP_MAX) == 0]
        got = fan_out(self._new_records, due)
        if any(records is None for records in got.values()):  # fell behind a fold: the merged index moved too
            self._reload()
            return
        for writer_id, records in got.items():
            self._idle[writer_id] = 0 if records else min(self._idle.get(writer_id, 0) + 1, 8)
            prefix = f"{self.store.writer_dir(writer_id)}/"
            for rec in records:
                self._seen[writer_id] = rec["seq"]
                self.unmerged += rec["kind"] != "claim"
                if rec["kind"] == "shard":
                    self.infos.append(storage.prefixed(rec["info"], prefix))
                    self.side["shards"][rec["name"]] = rec["entry"]
                    self.side["vocab_version"] = self.side["vocab_version"] or rec["entry"]["manifest"]["vocab_version"]
                elif rec["kind"] == "settled":
                    self.side["settled_only"][rec["name"]] = rec["entry"]

    def _new_records(self, writer_id: str) -> list[dict[str, Any]] | None:
        def corrupt(e: ValueError) -> None:
            if str(e) not in self._warned:
                self._warned.add(str(e))
                log.error("%s: %s; this writer's later records are not read until it is repaired", self.store.url, e)

        try:
            return read_log(self.store, writer_id, self._seen.get(writer_id, 0), on_corrupt=corrupt)
        except LogGap:
            return None

    def _reload(self) -> None:
        for attempt in range(RELOAD_ATTEMPTS):  # the merged index moving meanwhile: read again
            head = self.store.head(mf.INDEX)
            merged = self.store.root_index()[0]
            states, broken = read_states(self.store, self.store.writers())
            if self.store.head(mf.INDEX) == head:
                break
            storage.backoff(attempt + 3)
        version, self.merged_at = head or (None, 0.0)
        infos = _derive(states, merged["shards"], _listed(self.store, states, merged["shards"], broken))
        side = mf.empty_sidecar()
        for state in states.values():
            side["vocab_version"] = side["vocab_version"] or state.side["vocab_version"]
            side["shards"].update(mf.listed_entries(state.side, state.names))
            side["settled_only"].update(state.side["settled_only"])
        self.infos, self.side, self._version = infos, side, version
        covered = merged.get(MERGED_KEY) or {}
        self._seen = {w: s.seq for w, s in states.items()}
        self._seen.update({w: int(covered.get(w, 0)) for w in broken})
        self._idle = {}
        self.unmerged = sum(1 for w, s in states.items() if s.seq > int(covered.get(w, 0)))  # at least
        self.reloads += 1
