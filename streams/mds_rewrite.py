"""Remove samples from a live MDS stream root: rewrite affected shards, publish them atomically.

Used by takedown. Every shard holding a sample that ``drop(sample)`` selects is re-sealed without
it as a new immutable shard (named like the writer's shards: ``{domain}.{writer_id}.{hash}``). The
sidecar entry of the new shard keeps the old one's settled offset ranges (so an ingest replay of
those offsets stays a no-op) and records ``replaces`` (old name) and ``removed`` (old sample
indices). A shard left empty becomes a "settled only" entry. Each new shard takes its
predecessor's position in the index. A stock ``StreamingDataset`` opened on any snapshot sees
either the old or the new set, never a mix.

* Local root: under the root lock (writers wait), one fold (:func:`streams.manifest.write_root`)
  publishes every replacement; only then are the old shard files deleted.
* Object-store root (``s3://…``, no lock): per writer prefix, the replacements are uploaded as new
  immutable objects (fresh attempt prefix, ``If-None-Match``), then that writer's sidecar (new
  entries added, replaced ones kept) and index (the commit) are put ``If-Match`` with the writer's
  ``owner`` token kept and the writer's log folded in (:mod:`streams.writer_log`; records the live
  writer commits meanwhile stay in its log after the new base), retried from a fresh read when the
  writer folded in between; then
  the merged root index is re-derived (:meth:`streams.storage.ObjectRoot.refresh_index`), the
  replaced entries leave the sidecar, and after ``delete_grace_s`` the old objects, which no index
  lists any more, are deleted (also those an interrupted takedown left: every entry keeps the
  ``rewrites`` history). A writer prefix that fails is skipped and reported
  (:attr:`RewriteResult.failed`); a root whose merged index lists shards outside ``writers/`` is
  refused (:class:`ForeignEntries`). See docs/ARCHITECTURE.md, "Takedown on object-store roots".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams import manifest as mf
from streams import storage
from streams import writer_log as wl
from streams.mds_reader import ShardOpener
from streams.mds_writer import COLUMNS, seal_rows

__all__ = ["ForeignEntries", "Removed", "RewriteResult", "foreign_entries", "remove_samples"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Removed:
    """One sample taken out of a shard (kept only for the caller's audit and report)."""

    shard: str
    index: int
    id: str
    source: str
    license: str
    tokens: int
    sha256: str  # of the sample's token bytes


@dataclass(slots=True)
class RewriteResult:
    """What :func:`remove_samples` changed."""

    replaced: dict[str, str | None] = field(default_factory=dict)  # old shard -> new (None: emptied)
    removed: list[Removed] = field(default_factory=list)
    kept: int = 0  # samples re-written into new shards
    deleted: list[str] = field(default_factory=list)  # old shard files/objects deleted (root-relative)
    failed: dict[str, str] = field(default_factory=dict)  # object store: writer id -> why it was skipped

    def add(self, rw: _Rewrite) -> None:
        self.replaced[rw.old] = rw.new
        self.removed += rw.removed
        self.kept += rw.kept


@dataclass(slots=True)
class _Rewrite:
    """One shard re-sealed without some of its samples, not yet published."""

    old: str  # the shard's name
    new: str | None  # the replacement's name (None: every sample removed)
    entry: dict[str, Any]  # sidecar entry of the replacement (or the settled-only entry)
    info: dict[str, Any] | None  # index entry of the replacement
    src: str | None  # its sealed file in staging
    removed: list[Removed]
    kept: int
    garbage: list[str]  # the old shard's files (basenames as in the ``info`` given to _rewrite)


def _row(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: sample[k] for k in COLUMNS}


def _seal(stage: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    hashes = sorted(info["raw_data"].get("hashes", {}))
    shards = seal_rows(stage, rows, compression=info.get("compression"), hashes=hashes)
    if len(shards) != 1:
        raise RuntimeError(f"could not seal a replacement shard in {stage}")
    return json.loads(json.dumps(shards[0]))


def _basenames(info: dict[str, Any]) -> list[str]:
    names = [info["raw_data"]["basename"]]
    if info.get("zip_data"):
        names.append(info["zip_data"]["basename"])
    return names


def _data_basename(info: dict[str, Any]) -> str:
    return (info.get("zip_data") or info["raw_data"])["basename"]


def _old_entry(side: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(side["shards"].get(name) or {"domain": name.split(".", 1)[0], "settled": []})


def _rewrite(opener: ShardOpener, name: str, info: dict[str, Any], old_entry: dict[str, Any],
             drop: Callable[[dict[str, Any]], bool], stage: str) -> _Rewrite | None:
    """Read shard ``name`` (index entry ``info``, as ``opener`` finds it) and, if ``drop`` selects
    any of its samples, re-seal the others in ``stage``; None if it keeps every sample."""
    reader = opener.open(name, info)
    try:
        samples = [opener.read(reader, i) for i in range(int(info["samples"]))]
    finally:
        opener.release(name)
    gone = [i for i, s in enumerate(samples) if drop(s)]
    if not gone:
        return None
    removed = [Removed(shard=name, index=i, id=str(s["id"]), source=str(s["source"]), license=str(s["license"]),
                       tokens=len(s["tokens"]), sha256=hashlib.sha256(s["tokens"].tobytes()).hexdigest())
               for i, s in ((i, samples[i]) for i in gone)]
    gone_set = set(gone)
    keep = [_row(s) for i, s in enumerate(samples) if i not in gone_set]
    rewrites = [*old_entry.get("rewrites", []), [name, gone]]  # every takedown since the original
    entry = {**old_entry, "replaces": name, "removed": gone, "rewrites": rewrites}
    if not keep:
        entry.update(samples=0, bytes=0)
        return _Rewrite(old=name, new=None, entry=entry, info=None, src=None, removed=removed, kept=0,
                        garbage=_basenames(info))
    new_info = _seal(stage, keep, info)
    digest = hashlib.sha256(json.dumps([name, gone]).encode()).hexdigest()[:16]
    new_name = f"{old_entry['domain']}.{old_entry.get('writer_id') or 'rewrite'}.{digest}"
    src = os.path.join(stage, _data_basename(new_info))
    new_info["raw_data"]["basename"] = f"{new_name}.mds"
    if new_info.get("zip_data"):
        ext = new_info["zip_data"]["basename"].rsplit(".", 1)[1]
        new_info["zip_data"]["basename"] = f"{new_name}.mds.{ext}"
    entry.update(samples=len(keep), bytes=os.path.getsize(src))
    return _Rewrite(old=name, new=new_name, entry=entry, info=new_info, src=src, removed=removed, kept=len(keep),
                    garbage=_basenames(info))


def remove_samples(root: str, drop: Callable[[dict[str, Any]], bool], *, durable: bool = True,
                   delete_grace_s: float = 30.0) -> RewriteResult:
    """Rewrite every shard of stream ``root`` (local or object store) without the samples ``drop``
    selects. ``delete_grace_s``: object-store roots wait this long between the index commits and
    deleting the replaced objects, so that a reader that fetched the previous index can still
    download them (local roots delete at once: an open file stays readable)."""
    if storage.is_remote(root):
        return _remove_remote(storage.normalize_root(root), drop, delete_grace_s=delete_grace_s)
    root = os.path.abspath(root)
    result = RewriteResult()
    staging = os.path.join(root, mf.STAGING, f"rewrite-{uuid.uuid4().hex}")
    opener = ShardOpener(root)
    try:
        with mf.root_lock(root):
            index, side = mf.read_index(root), mf.read_sidecar(root)
            new_infos: list[dict[str, Any]] = []
            garbage: list[str] = []
            for info in index["shards"]:
                name = mf.shard_name_of(info)
                rw = _rewrite(opener, name, info, _old_entry(side, name), drop, os.path.join(staging, name))
                if rw is None:
                    new_infos.append(info)
                    continue
                garbage += _basenames(info)
                side["shards"].pop(name, None)
                result.add(rw)
                if rw.info is None:
                    side["settled_only"][name] = rw.entry
                    continue
                assert rw.src is not None and rw.new is not None
                if durable:
                    with open(rw.src, "rb+") as f:
                        os.fdatasync(f.fileno())
                os.replace(rw.src, os.path.join(root, _data_basename(rw.info)))
                side["shards"][rw.new] = rw.entry
                new_infos.append(rw.info)
            if result.replaced:
                mf.write_root(root, {"shards": new_infos}, side, durable=durable)
                for basename in garbage:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, basename))
                result.deleted = sorted(garbage)
    finally:
        opener.close()
        shutil.rmtree(staging, ignore_errors=True)
    return result


# --- object-store roots ------------------------------------------------------------------------
class ForeignEntries(RuntimeError):
    """The merged index of an object-store root lists shards outside ``writers/``: a takedown
    rewrites writer prefixes only, so it refuses the root rather than leave those readable."""


def foreign_entries(store: storage.ObjectRoot) -> list[str]:
    """Data basenames of the merged-index entries of ``store`` outside ``writers/<id>/``."""
    return [b for b in map(_data_basename, store.root_index()[0]["shards"])
            if not b.startswith(f"{storage.WRITERS}/")]


def _chain(entry: dict[str, Any]) -> set[str]:
    """Every shard name a sidecar entry replaced, since the original (its ``rewrites`` history)."""
    names = {str(r[0]) for r in entry.get("rewrites") or ()}
    return names | ({entry["replaces"]} if entry.get("replaces") else set())


def _remove_remote(url: str, drop: Callable[[dict[str, Any]], bool], *, delete_grace_s: float) -> RewriteResult:
    store = storage.object_root(url)
    started = time.time()
    served = {b for i in store.root_index()[0]["shards"] for b in _basenames(i)}  # readers may hold these
    wl.merge_index(store)  # a merge a crash left pending first, so replacements keep their positions
    foreign = foreign_entries(store)
    if foreign:
        raise ForeignEntries(f"{url}: the merged index lists {len(foreign)} shards outside {storage.WRITERS}/ "
                             f"(a takedown rewrites writer prefixes only; re-publish them with a writer or "
                             f"remove them from index.json first): {', '.join(foreign[:20])}")
    result = RewriteResult()
    exact: set[str] = set()  # objects this run's commits unlisted
    staging = tempfile.mkdtemp(prefix="headwater-rewrite-")
    opener = ShardOpener(url)
    try:
        for writer_id in store.writers():
            try:  # one broken writer prefix must not stop the takedown of the others
                rewrites = _rewrite_writer(store, writer_id, opener, drop, os.path.join(staging, writer_id))
            except Exception as e:  # noqa: BLE001 - reported in result.failed, the takedown exits 1
                log.error("%s: takedown of writer %s failed, continuing with the others: %s", url, writer_id, e)
                result.failed[writer_id] = f"{type(e).__name__}: {e}"
                continue
            finally:
                shutil.rmtree(os.path.join(staging, writer_id), ignore_errors=True)
            for rw in rewrites:
                result.add(rw)
                exact.update(rw.garbage)
    finally:
        opener.close()
        shutil.rmtree(staging, ignore_errors=True)
    doomed = _replaced_objects(store, exact=exact, before=started, failed=result.failed)
    if doomed and delete_grace_s > 0 and (result.replaced or doomed & served):
        time.sleep(delete_grace_s)  # also on a re-run: a crashed run may not have waited
        doomed = _replaced_objects(store, exact=exact, before=started, failed=result.failed)
    for key in sorted(doomed):
        store.delete(key)
    result.deleted = sorted(doomed)
    return result


def _rewrite_writer(store: storage.ObjectRoot, writer_id: str, opener: ShardOpener,
                    drop: Callable[[dict[str, Any]], bool], staging: str) -> list[_Rewrite]:
    """Rewrite and commit the affected shards of one writer prefix; the rewrites committed.

    A replacement is sealed once per old shard (shards are immutable) and its upload reused by a
    retry only while the writer's ``owner`` tokens are those read before the upload: a writer that
    starts with this id claims it (new tokens) and then sweeps unlisted objects older than its
    grace from the prefix, which may take the upload; under new tokens it is uploaded again (the
    sweep's cutoff precedes the claim, so it never takes a re-upload), and the superseded one is
    deleted (never listed: the commit it was meant for lost its ``If-Match``). The live writer's
    records committed after the base read stay in its log after the new base; up to
    :data:`LIVE_ROUNDS` more rounds check those too."""
    wdir = store.writer_dir(writer_id)
    done: dict[str, _Rewrite | None] = {}  # old data basename -> its rewrite (None: keeps every sample)
    uploads: dict[str, tuple[Any, dict[str, Any]]] = {}  # old data basename -> (owner, entry)
    committed: list[_Rewrite] = []
    rounds = 0
    for attempt in range(storage.CAS_ATTEMPTS):
        state = wl.read_state(store, writer_id)  # base + log: everything the writer committed
        index, side, owners = state.index, state.side, state.owner
        infos: list[dict[str, Any]] = []
        rewrites: list[_Rewrite] = []
        for info in index["shards"]:
            key = _data_basename(info)
            if key not in done:
                name = mf.shard_name_of(info)
                done[key] = _rewrite(opener, name, storage.prefixed(info, f"{wdir}/"), _old_entry(side, name), drop,
                                     os.path.join(staging, name))
            rw = done[key]
            if rw is None:
                infos.append(info)
                continue
            rewrites.append(rw)
            if rw.info is None:
                continue
            if key in uploads and uploads[key][0] != owners:  # claimed since: the sweep may have taken it
                _drop_upload(store, wdir, uploads.pop(key)[1])
            if key not in uploads:
                assert rw.src is not None
                uploads[key] = (owners, store.upload_shard(wdir, rw.info, rw.src)[0])
            infos.append(uploads[key][1])
        if not rewrites:
            _forget_replaced(store, writer_id)  # what an interrupted takedown left in the sidecar
            return committed
        for rw in rewrites:  # the replaced entries stay: settled ranges never shrink
            if rw.new is None:
                side["settled_only"][rw.old] = rw.entry
            else:
                side["shards"][rw.new] = rw.entry
        stamp = _base_stamp(state)
        try:  # owner token kept: a takedown is not a new owner; the log after state.seq stays
            store.put(f"{wdir}/{mf.SIDECAR}", storage.json_bytes({**side, **stamp, "version": wl.BASE_SIDECAR_VERSION}),
                      if_version=state.side_v)
            store.put(f"{wdir}/{mf.INDEX}", storage.json_bytes({**index, **stamp, "shards": infos}),
                      if_version=state.index_v)  # the commit
        except storage.PreconditionFailed:  # the live writer published (or started) in between
            storage.backoff(attempt)
            continue
        used = {_data_basename(i) for i in infos}
        for _, entry in uploads.values():  # uploads of shards another takedown replaced first
            if _data_basename(entry) not in used:
                _drop_upload(store, wdir, entry)
        wl.merge_index(store)
        committed += rewrites
        done.update({_data_basename(entry): None for _, entry in uploads.values()})  # replacements: already clean
        if rounds < LIVE_ROUNDS and _shards_after(store, writer_id, state.seq):
            rounds += 1  # the live writer committed shards meanwhile (after the base read): check those too
            continue
        _forget_replaced(store, writer_id)
        return committed
    raise storage.PreconditionFailed(f"{store.url}/{wdir}: takedown commit lost {storage.CAS_ATTEMPTS} times "
                                     "to the live writer")


#: Extra rounds of a writer's takedown for shards its live writer committed during the previous one.
LIVE_ROUNDS = 3


def _shards_after(store: storage.ObjectRoot, writer_id: str, seq: int) -> bool:
    """Whether ``writer_id`` committed a shard record after ``seq`` (a gap counts: it folded)."""
    try:
        return any(rec["kind"] == "shard" for rec in wl.read_log(store, writer_id, seq))
    except wl.LogGap:
        return True


def _base_stamp(state: wl.WriterState) -> dict[str, Any]:
    """What a base written from ``state`` records: its owner and the last log record it holds."""
    return {"owner": state.owner, wl.LOG_KEY: state.seq}


def _drop_upload(store: storage.ObjectRoot, wdir: str, entry: dict[str, Any]) -> None:
    """Delete an upload of this takedown that no index lists (its commit never happened)."""
    for basename in _basenames(entry):
        store.delete(f"{wdir}/{basename}")


def _forget_replaced(store: storage.ObjectRoot, writer_id: str) -> None:
    """Drop from a writer's sidecar the entries of shards that its index no longer lists and that
    another entry replaced (its ``rewrites`` chain names them; compare-and-swap, retried). A reader
    that read the index before the commit finds their ranges on the replacement
    (:func:`streams.manifest.listed_entries`)."""
    wdir = store.writer_dir(writer_id)
    for attempt in range(storage.CAS_ATTEMPTS):
        state = wl.read_state(store, writer_id)
        names, side = state.names, state.side
        replaced = set().union(*map(_chain, [*side["shards"].values(), *side["settled_only"].values()]))
        stale = [n for n in side["shards"] if n in replaced and n not in names]
        if not stale:
            return
        for n in stale:
            del side["shards"][n]
        try:
            store.put(f"{wdir}/{mf.SIDECAR}",
                      storage.json_bytes({**side, **_base_stamp(state), "version": wl.BASE_SIDECAR_VERSION}),
                      if_version=state.side_v)
            return
        except storage.PreconditionFailed:
            storage.backoff(attempt)
    log.warning("%s/%s: replaced sidecar entries left in place (lost every CAS); the next takedown "
                "removes them", store.url, wdir)


def _replaced_objects(store: storage.ObjectRoot, *, exact: set[str], before: float,
                      failed: dict[str, str]) -> set[str]:
    """Objects to delete: those neither their writer's index nor the merged index lists that are
    either in ``exact`` (the objects this run's commits unlisted) or named like a shard that some
    sidecar entry's ``rewrites`` chain replaced and older than ``before`` (what an interrupted
    takedown left; a later object with that name would be a new upload). A writer prefix that
    cannot be read is added to ``failed``."""
    wl.merge_index(store)
    merged = {b for i in store.root_index()[0]["shards"] for b in _basenames(i)}
    out: set[str] = set()
    for writer_id in store.writers():
        wdir = store.writer_dir(writer_id)
        try:
            state = wl.read_state(store, writer_id)
            side = state.side
            replaced = set().union(*map(_chain, [*side["shards"].values(), *side["settled_only"].values()]))
            mine = {k for k in exact if k.startswith(f"{wdir}/")}
            if not replaced and not mine:
                continue
            listed = {f"{wdir}/{b}" for i in state.index["shards"] for b in _basenames(i)}
            for obj in store.find(wdir):
                key = obj["name"]
                base = key.rsplit("/", 1)[-1]
                if ".mds" not in base or key in listed or key in merged:
                    continue
                if key in mine or (base.split(".mds", 1)[0] in replaced
                                   and obj["LastModified"].timestamp() <= before):
                    out.add(key)
        except Exception as e:  # noqa: BLE001 - reported in failed, the takedown exits 1
            log.error("%s: cannot collect the replaced objects of writer %s: %s", store.url, writer_id, e)
            failed.setdefault(writer_id, f"{type(e).__name__}: {e}")
    return out
