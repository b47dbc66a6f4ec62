"""LiveStreamWriter: append sealed, immutable MDS shards to a stream root and publish each.

Each :meth:`LiveStreamWriter.write_shard` call writes ONE shard with mosaicml-streaming's
``MDSWriter`` into ``root/.staging``, then, under the root lock, moves it into the root under a
deterministic name and commits it with one line appended to the root's journal (folded into
``index.json`` and the sidecar by the policy of :mod:`streams.manifest`). A replay
of the same settled offset ranges (or, without ranges, the same content) is a no-op that
returns the original :class:`ShardPublished`.

An object-store root (``s3://…``) has no lock and no rename: the writer first claims its id (an
owner token, see :mod:`streams.storage`); each shard is sealed in a local temp directory, uploaded
as an immutable object under a fresh key in this writer's own prefix, then this writer's sidecar
and index are put conditionally. An in-process lock per writer id serialises threads. A takedown
that edits this writer's files meanwhile (keeping its owner token) makes the writer re-read and
redo the publish; only a foreign token fences it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np
from botocore.exceptions import BotoCoreError
from streaming.base.format.mds.writer import MDSWriter

from streams import faultpoints, storage
from streams import manifest as mf
from streams import writer_log as wl
from streams.events import OffsetRange, ShardPublished, TokenizedSample
from streams.manifest import OverlapError

__all__ = ["COLUMNS", "LiveStreamWriter", "OverlapError", "sample_from_event", "seal_rows"]

#: MDS column encodings of every live-stream sample (trainer and evaluators import this).
COLUMNS: dict[str, str] = {
    "id": "str",
    "domain": "str",
    "modality": "str",
    "tokens": "ndarray:int32",
    "source": "str",
    "license": "str",
    "pipeline_version": "str",
    "language": "str",
    "produced_at": "float64",
    "lineage": "json",
}
REQUIRED = ("id", "modality", "tokens", "source", "license")
_COLUMN_SET = frozenset(COLUMNS)
_STR_COLUMNS = ("id", "modality", "source", "license", "pipeline_version", "language")
log = logging.getLogger(__name__)
_EMPTY: dict[str, Any] = {}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAX_SHARD_BYTES = 2**32 - 1  # MDS sample offsets are uint32


def sample_from_event(ev: TokenizedSample) -> dict[str, Any]:
    """The stream row of a :class:`TokenizedSample` event."""
    lineage = dict(ev.lineage)
    for key in ("tokenizer_version", "vocab_version"):
        if getattr(ev, key):
            lineage.setdefault(key, getattr(ev, key))
    return {
        "id": ev.id, "domain": ev.domain, "modality": ev.modality,
        "tokens": np.asarray(ev.tokens, dtype=np.int32), "source": ev.source, "license": ev.license,
        "pipeline_version": ev.pipeline_version, "language": ev.language,
        "produced_at": ev.produced_at, "lineage": lineage,
    }


def seal_rows(stage: str, rows: Sequence[dict[str, Any]], *, compression: str | None,
              hashes: Sequence[str]) -> list[dict[str, Any]]:
    """Encode, compress, hash and write ``rows`` as MDS shard(s) in ``stage``; their index entries."""
    w = MDSWriter(columns=COLUMNS, out=stage, compression=compression, hashes=list(hashes),
                  size_limit=_MAX_SHARD_BYTES)
    try:
        for row in rows:
            w.write(row)
        w.flush_shard()
    finally:
        w.executor.shutdown(wait=True)
    if w.event.is_set():
        raise RuntimeError(f"MDSWriter failed while sealing a shard in {stage}")
    return w.shards


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} must match {_NAME_RE.pattern} (it becomes part of shard file names)")
    return value


class LiveStreamWriter:
    """Appends sealed shards to a stream root; safe with other writers (threads or processes).

    Args:
        root: local stream root directory (created if missing), or an object-store URL
            (``s3://bucket/prefix``; see :mod:`streams.storage`).
        writer_id: stable id of this writer (part of shard names); ``[A-Za-z0-9_-]``.
        manifest: :class:`StreamManifest` or dict with vocab/tokenizer/discretizer/pipeline versions.
        compression: MDS compression (``"zstd"``, ``"zstd:3"``, ... or ``None``).
        hashes: hash algorithms recorded in the index (readers verify them).
        publisher: called with each :class:`ShardPublished` after it is visible (e.g. to Kafka).
        vocab_size: if set, token ids outside ``[0, vocab_size)`` are rejected.
        durable: fsync shard files and JSON before publishing.
        orphan_grace_s: object-store roots: at start, unlisted shard objects of this writer's
            prefix older than this are deleted (uploads of publishes that never committed).
        fold_interval_s: local roots: fold the journal into index.json at least this often while
            publishing (also when it holds 1/8 of the folded shards, at start and on close; see
            :func:`streams.manifest.fold_due`), which bounds how far a stock reader lags.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        writer_id: str,
        manifest: mf.StreamManifest | dict[str, Any],
        compression: str | None = "zstd",
        hashes: Sequence[str] = ("xxh64",),
        publisher: Callable[[ShardPublished], None] | None = None,
        vocab_size: int | None = None,
        durable: bool = True,
        orphan_grace_s: float = 900.0,
        fold_interval_s: float = 30.0,
    ):
        self.root = storage.normalize_root(root)
        self.writer_id = _check_name("writer_id", writer_id)
        self.manifest = mf.StreamManifest.of(manifest)
        self.compression = compression or None
        self.hashes = sorted(hashes)
        self.publisher = publisher
        self.vocab_size = vocab_size
        self._token_limit = vocab_size if vocab_size is not None else 2**31 - 1
        self.durable = durable
        self.orphan_grace_s = orphan_grace_s
        self.fold_interval_s = fold_interval_s
        self._store = storage.object_root(self.root) if storage.is_remote(self.root) else None
        if self._store is None:
            self._staging = os.path.join(self.root, mf.STAGING)
            os.makedirs(self._staging, exist_ok=True)
            self._view = mf.RootView(self.root, track_settled=True)
            self._fold_failures, self._fold_after = 0, 0.0
            with mf.root_lock(self.root):
                self._view.refresh()
                if self._view.tail and self._view.infos:
                    self._fold()  # what a crashed writer journaled: a complete index.json for stock readers
        else:
            self._lock = storage.writer_lock(self.root, self.writer_id)
            self._fold_failures, self._fold_after = 0, 0.0
            self._root = wl.root_states(self._store)
            self._unacked: dict[str, int] = {}  # shard name -> log seq, its event not yet delivered
            with self._lock:
                self._owner, claimed = self._claim()  # fences any older process with this writer id
                with self._root.lock:  # what this process knew of the id predates the claim: read it again
                    self._root.states.pop(self.writer_id, None)
                self._remove_orphans()
                self._resend_unacked(claimed)
                with self._root.lock:
                    self._sync()
                self._fold_remote()  # the outbox watermark; a merge of what a crash left unmerged; log GC
            self._staging = tempfile.mkdtemp(prefix=f"headwater-stage-{self.writer_id}-")
        self._clean_own_staging()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._clean_own_staging()
        if self._store is not None:  # object-store root: the staging dir is this writer's temp dir
            shutil.rmtree(self._staging, ignore_errors=True)
            own = self._root.states.get(self.writer_id)
            if exc_type is None and own is not None and own.unfolded:
                with self._lock:
                    self._fold_remote()
        elif exc_type is None:
            with mf.root_lock(self.root):
                self._view.refresh()
                if self._view.tail and self._view.infos:
                    self._fold()

    def settled(self, *, merge: bool = True) -> list[OffsetRange]:
        """All offset ranges settled by published shards in the root (every writer)."""
        return mf.settled_ranges(self.root, merge=merge)

    def write_shard(
        self,
        samples: Sequence[dict[str, Any]],
        *,
        domain: str,
        settled: Sequence[OffsetRange] = (),
        name: str | None = None,
    ) -> ShardPublished:
        """Write, seal and publish one shard of ``samples``; returns its ShardPublished event.

        ``settled`` are the Kafka offset ranges this shard settles (written, filtered,
        deduplicated or dead-lettered). With no samples, the ranges are recorded as settled
        without a shard (nothing is published to readers).
        """
        _check_name("domain", domain)
        settled = list(settled)
        rows = [self._row(i, s, domain) for i, s in enumerate(samples)]
        if not rows and not settled:
            raise ValueError("write_shard: no samples and no settled ranges; nothing to write")
        if not rows:
            return self._settle_only(domain, settled, name)

        stage = os.path.join(self._staging, f"{self.writer_id}-{uuid.uuid4().hex}")
        try:
            entries = self._seal(stage, rows)
            if len(entries) != 1:
                raise ValueError(f"write_shard: {len(rows)} samples exceed one MDS shard (4 GiB); split them")
            info = json.loads(json.dumps(entries[0]))
            name = _check_name("name", name) if name else self._name(domain, settled, stage, info)
            return self._publish(stage, info, name, domain, settled)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    # --- internals -----------------------------------------------------------------------
    def _seal(self, stage: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Encode, compress, hash and write ``rows`` as MDS shard(s) in ``stage``; their index entries.

        Calls ``MDSWriter.flush_shard`` rather than ``finish``: finish writes a staging index we
        do not need and, for each call, may sleep a whole second waiting on its upload queue.
        """
        return seal_rows(stage, rows, compression=self.compression, hashes=self.hashes)

    def _row(self, i: int, sample: dict[str, Any], domain: str) -> dict[str, Any]:
        if not _COLUMN_SET.issuperset(sample):
            raise ValueError(f"sample {i}: unknown column {min(set(sample) - _COLUMN_SET)!r}; columns: {list(COLUMNS)}")
        for col in REQUIRED:
            if col not in sample:
                raise ValueError(f"sample {i}: missing column {col!r}")
        if sample.get("domain", domain) != domain:
            raise ValueError(f"sample {i}: domain {sample['domain']!r} differs from shard domain {domain!r}")
        tokens = sample["tokens"]
        if type(tokens) is not np.ndarray or tokens.dtype != np.int32 or tokens.ndim != 1:
            tokens = self._tokens(i, sample)
        if tokens.size and tokens.view(np.uint32).max() >= self._token_limit:  # negatives wrap high
            lo, hi = tokens.min(), tokens.max()
            raise ValueError(f"sample {i} ({sample['id']!r}): token id {lo if lo < 0 else hi} "
                             f"out of range [0, {self._token_limit})")
        lineage = sample.get("lineage", _EMPTY)
        if isinstance(lineage, str):
            try:
                lineage = json.loads(lineage)
            except json.JSONDecodeError as e:
                raise ValueError(f"sample {i}: lineage is not valid JSON: {e}") from None
        row = {
            "id": sample["id"], "domain": domain, "modality": sample["modality"], "tokens": tokens,
            "source": sample["source"], "license": sample["license"],
            "pipeline_version": sample.get("pipeline_version", self.manifest.pipeline_version),
            "language": sample.get("language", ""),
            "produced_at": float(sample.get("produced_at", time.time())), "lineage": lineage,
        }
        for col in _STR_COLUMNS:
            if type(row[col]) is not str:
                raise ValueError(f"sample {i}: column {col!r} must be str, got {type(row[col]).__name__}")
        return row

    @staticmethod
    def _tokens(i: int, sample: dict[str, Any]) -> np.ndarray:
        tokens = np.asarray(sample["tokens"])
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(f"sample {i} ({sample['id']!r}): tokens must be a 1-D integer array, "
                             f"got {tokens.dtype} shape {tokens.shape}")
        info = np.iinfo(np.int32)
        if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
            bad = tokens.min() if tokens.min() < info.min else tokens.max()
            raise ValueError(f"sample {i} ({sample['id']!r}): token id {bad} out of int32 range")
        return tokens.astype(np.int32)

    def _name(self, domain: str, settled: list[OffsetRange], stage: str, info: dict[str, Any]) -> str:
        if settled:
            key = json.dumps({"domain": domain, "settled": mf.ranges_to_json(mf.merge_ranges(settled))},
                             sort_keys=True).encode()
        else:
            with open(os.path.join(stage, self._data_basename(info)), "rb") as f:
                key = f.read()
        return f"{domain}.{self.writer_id}.{hashlib.sha256(key).hexdigest()[:16]}"

    @staticmethod
    def _data_basename(info: dict[str, Any]) -> str:
        return (info.get("zip_data") or info["raw_data"])["basename"]

    def _event(self, name: str, entry: dict[str, Any]) -> ShardPublished:
        return ShardPublished(
            stream_root=self.root, shard=name, domain=entry["domain"], samples=entry["samples"],
            bytes=entry["bytes"], vocab_version=entry["manifest"]["vocab_version"],
            writer_id=entry["writer_id"], settled=mf.ranges_from_json(entry["settled"]),
            published_at=entry["published_at"],
        )

    def _entry(self, domain: str, settled: list[OffsetRange], samples: int, nbytes: int) -> dict[str, Any]:
        return {
            "domain": domain, "writer_id": self.writer_id, "samples": samples, "bytes": nbytes,
            "settled": mf.ranges_to_json(settled), "manifest": self.manifest.to_dict(),
            "published_at": time.time(),
        }

    def _publish(self, stage: str, info: dict[str, Any], name: str, domain: str,
                 settled: list[OffsetRange]) -> ShardPublished:
        src = os.path.join(stage, self._data_basename(info))
        info["raw_data"]["basename"] = f"{name}.mds"
        if info.get("zip_data"):
            info["zip_data"]["basename"] = f"{name}.mds.{info['zip_data']['basename'].rsplit('.', 1)[1]}"
        if self._store is not None:
            event = self._publish_remote(src, info, name, domain, settled)
            if self.publisher is not None:
                self.publisher(event)  # raises: the bundle is retried, its replay sends it again
                with self._lock:
                    self._unacked.pop(event.shard, None)
            return event
        if self.durable:
            with open(src, "rb+") as f:
                os.fdatasync(f.fileno())
        with mf.root_lock(self.root):
            view = self._view
            view.refresh()
            self._check_vocab(view.side)
            replay = name if name in view.names else view.replay_of(settled)
            if replay is not None and view.entry(replay) is None:  # legacy root: sidecar entry lost
                entry = self._entry(domain, settled, info["samples"], 0)
                mf.append_journal(view, {"kind": "entry", "name": replay, "entry": entry}, durable=self.durable)
                view.refresh()
            if replay is not None:
                event = self._event(replay, view.entry(replay))
            else:
                dest = os.path.join(self.root, self._data_basename(info))
                os.replace(src, dest)
                faultpoints.reach("local.after_rename")
                try:
                    entry = self._entry(domain, settled, info["samples"], os.path.getsize(dest))
                    if self.durable:
                        mf.fsync_dir(self.root)  # the shard's name is durable before the line naming it
                    mf.append_journal(view, {"kind": "shard", "name": name, "info": info, "entry": entry},
                                      durable=self.durable)
                except BaseException:
                    # e.g. ENOSPC: nothing was published; do not leave an orphan shard taking space
                    # (a replay with other batch boundaries would never overwrite it).
                    view.refresh()
                    if name not in view.names:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(dest)
                    raise
                faultpoints.reach("local.after_journal")
                view.refresh()
                event = self._event(name, entry)
                self._maybe_fold()
        if self.publisher is not None:
            self.publisher(event)
        return event

    def _check_vocab(self, side: dict[str, Any]) -> None:
        if side["vocab_version"] not in (None, self.manifest.vocab_version):
            raise ValueError(f"stream root {self.root} holds vocab {side['vocab_version']}, "
                             f"this writer has {self.manifest.vocab_version}")

    def _fold(self) -> None:
        """Fold the journal (under the root lock). A failure (e.g. ENOSPC) costs nothing published:
        the journal stays the truth and the next publish or close folds again."""
        try:
            mf.fold(self._view, durable=self.durable)
            self._fold_failures = 0
        except OSError as e:  # back off: a full disk must not cost an O(N) rewrite per publish
            self._fold_failures += 1
            self._fold_after = time.monotonic() + min(300.0, 2.0 ** self._fold_failures)
            log.warning("fold of %s failed (%d in a row), the journal keeps its lines: %s",
                        self.root, self._fold_failures, e)
            self._view.refresh()

    def _maybe_fold(self) -> None:
        if time.monotonic() >= self._fold_after and mf.fold_due(self._view, self.fold_interval_s):
            self._fold()

    def _settle_only(self, domain: str, settled: list[OffsetRange], name: str | None) -> ShardPublished:
        key = json.dumps({"domain": domain, "settled": mf.ranges_to_json(mf.merge_ranges(settled))},
                         sort_keys=True).encode()
        name = _check_name("name", name) if name else (
            f"{domain}.{self.writer_id}.{hashlib.sha256(key).hexdigest()[:16]}")
        if self._store is not None:
            return self._settle_only_remote(domain, settled, name)
        with mf.root_lock(self.root):
            view = self._view
            view.refresh()
            self._check_vocab(view.side)
            replay = name if view.entry(name) is not None else view.replay_of(settled)
            if replay is not None:
                return self._event(replay, view.entry(replay))
            entry = self._entry(domain, settled, 0, 0)
            mf.append_journal(view, {"kind": "settled", "name": name, "entry": entry}, durable=self.durable)
            view.refresh()
            self._maybe_fold()
        return self._event(name, entry)

    # --- object-store roots (streams/storage.py, streams/writer_log.py) ---------------------------
    def _sync(self) -> wl.WriterState:
        """Bring every writer's state of the root up to date (:meth:`streams.writer_log.RootStates.sync`,
        caller holds its lock); returns this writer's. :class:`~streams.storage.WriterFenced` once
        another process claimed this writer id."""
        own = self._root.sync(self.writer_id)
        if own.owner != self._owner:
            store = self._root.store
            raise self._fenced(f"{store.url}/{store.writer_dir(self.writer_id)}", own.owner)
        return own

    def _fenced(self, where: str, owner: str | None) -> storage.WriterFenced:
        return storage.WriterFenced(
            f"{where} changed under this writer: writer id {self.writer_id!r} of {self.root} is now "
            f"owned by {owner!r}, not by this writer ({self._owner!r}); another process started with "
            "this writer id, so this one may not commit (writer ids must be unique per live process)")

    def _claim(self) -> tuple[str, wl.WriterState]:
        """Commit a ``claim`` record with a fresh owner token, then fold it into the base (whose
        versions change, fencing an older-version process too). An older process with this id
        must read past the claim before it could commit again, and then sees a foreign owner.
        Returns the token and the state the claim was committed on."""
        store = self._store
        assert store is not None
        token = uuid.uuid4().hex
        state = wl.read_state(store, self.writer_id)
        for attempt in range(storage.CAS_ATTEMPTS):
            if wl.append(store, state, {"kind": "claim", "owner": token, "at": time.time()}):
                wl.fold(store, self.writer_id, token)
                return token, state
            state, _ = wl.refresh_state(store, state)  # a publish of the previous owner landed
            storage.backoff(attempt)
        raise storage.PreconditionFailed(f"{self.root}: could not claim writer id {self.writer_id!r} in "
                                         f"{storage.CAS_ATTEMPTS} attempts")

    def _resend_unacked(self, claimed: wl.WriterState) -> None:
        """The outbox of an object-store root: re-send the ShardPublished events of this writer id's
        shard records after the base's acknowledged seq and before our claim (a previous process
        died between a commit and its event's delivery, or its send failed). At least once."""
        store = self._store
        assert store is not None
        if self.publisher is None or claimed.acked >= claimed.seq - 1:
            return
        try:
            records = wl.read_log(store, self.writer_id, claimed.acked)
        except wl.LogGap:  # an older-version writer's log: nothing tracked
            return
        for rec in records:
            if rec["kind"] != "shard" or rec["seq"] >= claimed.seq:
                continue
            try:
                self.publisher(self._event(rec["name"], rec["entry"]))
            except Exception as e:  # noqa: BLE001 - stays unacknowledged: the next start re-sends it
                log.warning("re-sending ShardPublished %s failed: %s", rec["name"], e)
                self._unacked[rec["name"]] = rec["seq"]

    def _acked_seq(self, own: wl.WriterState) -> int:
        """The outbox watermark: every shard record up to it had its event delivered."""
        return min(self._unacked.values()) - 1 if self._unacked else own.seq

    def _commit_remote(self, name: str, settled: list[OffsetRange], make: Callable[[], dict[str, Any]]) -> ShardPublished:
        """Commit the log record ``make()`` builds (called once the root is known to hold no replay)
        as this writer's next record, re-checking after every seq lost to another process."""
        store, root = self._store, self._root
        assert store is not None
        with self._lock:
            record: dict[str, Any] | None = None
            for attempt in range(storage.CAS_ATTEMPTS):
                with root.lock:
                    own = self._sync()
                    self._check_vocab({"vocab_version": root.vocab_version(self.writer_id)})
                    replay = name if name in own.names or name in own.side["settled_only"] else root.settled.replay_of(settled)
                    if replay is not None:
                        return self._event(replay, root.published_entry(replay))
                record = record or make()  # the upload: outside the root's lock
                with root.lock:
                    own = root.states[self.writer_id]
                    if not wl.append(store, own, {**record, "owner": self._owner, "name": name}):
                        storage.backoff(attempt)  # another process took this seq: re-read and check again
                        continue
                    self._check_slot(own, name)
                    root.settled.add(name, record["entry"])
                    if record["kind"] == "shard" and self.publisher is not None:
                        self._unacked[name] = own.seq
                faultpoints.reach("remote.after_commit")
                self._maybe_fold_remote(own)
                return self._event(name, record["entry"])
        raise storage.PreconditionFailed(f"{self.root}: committing {name} lost {storage.CAS_ATTEMPTS} times "
                                         f"to other processes with writer id {self.writer_id!r}")

    def _check_slot(self, own: wl.WriterState, name: str) -> None:
        """After a won create at seq s: the record before it still exists (one HEAD), or else the
        record must be in this writer's effective state. It is not when this process was stalled
        past a claim, fold and log GC of another process with this id, and created a seq that had
        been committed and deleted already: that record is void, deleted, and this process fenced."""
        store = self._store
        assert store is not None
        if own.seq <= 1 or store.head(wl.log_key(self.writer_id, own.seq - 1)) is not None:
            return
        current = wl.read_state(store, self.writer_id)
        if name in current.names or name in current.side["settled_only"]:
            return
        store.delete(wl.log_key(self.writer_id, own.seq))
        self._root.states.pop(self.writer_id, None)  # re-read in full by the next sync
        raise self._fenced(f"{store.url}/{wl.log_key(self.writer_id, own.seq)}", current.owner)

    def _publish_remote(self, src: str, info: dict[str, Any], name: str, domain: str,
                        settled: list[OffsetRange]) -> ShardPublished:
        """Upload the shard object under a fresh key, then commit it with one log record
        (:func:`streams.writer_log.append`). A failed publish deletes nothing: its upload's fate
        may be unknown, the start-up GC takes it."""
        store = self._store
        assert store is not None

        def make() -> dict[str, Any]:
            obj_info, size = store.upload_shard(store.writer_dir(self.writer_id), info, src)
            faultpoints.reach("remote.after_upload")
            return {"kind": "shard", "info": obj_info, "entry": self._entry(domain, settled, obj_info["samples"], size)}

        return self._commit_remote(name, settled, make)

    def _settle_only_remote(self, domain: str, settled: list[OffsetRange], name: str) -> ShardPublished:
        return self._commit_remote(name, settled, lambda: {"kind": "settled", "entry": self._entry(domain, settled, 0, 0)})

    def _maybe_fold_remote(self, own: wl.WriterState) -> None:
        """The fold policy; a fold due by size also merges, one due by time merges only when the
        merged index is ``fold_interval_s`` old (so W writers do not merge W times per interval)."""
        with self._root.lock:
            entries = self._root.entries()
        if time.monotonic() >= self._fold_after and wl.fold_due(own, self.fold_interval_s, entries):
            self._fold_remote(merge=wl.fold_due(own, float("inf"), entries))

    def _fold_remote(self, *, merge: bool = True) -> None:
        """Fold this writer's log into its base (with the outbox watermark), re-derive the merged
        index (with ``merge``, or when it is ``fold_interval_s`` old), delete records both cover
        and the outbox acknowledged. A failure costs nothing committed (the log stays the truth):
        logged, backed off; a fence shows at the next publish."""
        store = self._store
        assert store is not None
        own = self._root.states[self.writer_id]
        try:
            state = wl.fold(store, self.writer_id, self._owner, acked=self._acked_seq(own))
            head = None if merge else store.head(mf.INDEX)
            if merge or head is None or time.time() - head[1] >= self.fold_interval_s:
                wl.merge_index(store)
                wl.gc_log(store, self.writer_id, min(state.seq, state.acked))
            self._fold_failures = 0
        except (OSError, ValueError, storage.PreconditionFailed, BotoCoreError) as e:
            self._fold_failures += 1
            self._fold_after = time.monotonic() + min(300.0, 2.0 ** self._fold_failures)
            log.warning("fold of %s/%s failed (%d in a row), its log keeps the records: %s",
                        self.root, store.writer_dir(self.writer_id), self._fold_failures, e)
            return
        own.folded_at, own.unfolded, own.base_entries = state.folded_at, 0, state.base_entries

    def _remove_orphans(self) -> None:
        """Delete shard objects of this writer's prefix that its index does not list and that are
        older than ``orphan_grace_s`` (uploads of publishes that never committed). Runs after the
        claim, so no older process with this id can commit them any more."""
        store = self._store
        assert store is not None
        wdir = store.writer_dir(self.writer_id)
        listed = set()
        for info in wl.read_state(store, self.writer_id).index["shards"]:
            listed.update(f"{wdir}/{info[k]['basename']}" for k in ("raw_data", "zip_data") if info.get(k))
        cutoff = time.time() - self.orphan_grace_s
        for obj in store.find(wdir):
            if (".mds" in obj["name"].rsplit("/", 1)[-1] and obj["name"] not in listed
                    and obj["LastModified"].timestamp() <= cutoff):
                store.delete(obj["name"])

    def _clean_own_staging(self) -> None:
        for d in os.listdir(self._staging):
            if d.startswith(f"{self.writer_id}-"):
                shutil.rmtree(os.path.join(self._staging, d), ignore_errors=True)
