"""Where a stream root lives: a local directory, or an object store (``s3://``, ``gs://``) via fsspec.

Local roots keep the protocol of :mod:`streams.manifest` (one index.json and sidecar, ``flock``
and ``os.replace``). Object stores have neither locks nor renames, so an object-store root is
laid out so that no two writers ever write the same object, and every commit is a conditional put:

* ``writers/<writer_id>/<attempt>/<name>.mds[.zstd]``: immutable shard objects, uploaded first,
  each under a fresh random ``<attempt>`` prefix and with ``If-None-Match: *``, so a committed
  object is never overwritten (the index entry's basename names the object; ``<name>`` stays the
  dedup key);
* ``writers/<writer_id>/index.json`` and ``headwater.json``: that writer's MDS index and sidecar
  (its *base*), followed by ``writers/<writer_id>/log/<seq>.json``: one immutable record per
  commit. A commit is one conditional create of the next sequence number; a writer that starts
  claims its id with a ``claim`` record, which fences an older process with that id
  (:class:`WriterFenced`). The log, folds and the claim are :mod:`streams.writer_log`;
* ``index.json``: the merged MDS index of all writers (basenames keep their ``writers/<id>/``
  prefix, as ``streaming``'s ``merge_index`` writes them), derived by a compare-and-swap put
  (:func:`streams.writer_log.merge_index`) whenever a writer folds, starts or closes. It is the
  same for every reader: ``StreamingDataset(remote=ROOT)`` reads it (lagging by at most one fold);
  :class:`streams.writer_log.RemoteView` adds every writer's newer records.

A shard uploaded by a writer that died before its commit is invisible (no index lists it). A
writer never deletes an upload whose commit failed (its outcome may be unknown); when it starts
again, after its claim, it deletes unlisted objects of its own prefix older than a grace period.

Conditional puts are single PUTs (S3's limit: 5 GiB); a larger conditional body is refused, since
a multipart upload would drop ``If-Match``. A 409 ``ConditionalRequestConflict`` (a concurrent
conditional write to the same key) is a lost compare-and-swap (:class:`ConditionalConflict`).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import threading
import time
import uuid
from typing import Any

__all__ = ["CAS_ATTEMPTS", "SINGLE_PUT_LIMIT", "WRITERS", "ConditionalConflict", "ObjectRoot",
           "PreconditionFailed", "StoreUnavailable", "WriterFenced", "backoff", "is_remote", "json_bytes",
           "normalize_root", "object_root", "prefixed", "writer_lock"]

WRITERS = "writers"
INDEX = "index.json"
SIDECAR = "headwater.json"
#: Attempts of a compare-and-swap lost to other writers (or to a 409) before giving up.
CAS_ATTEMPTS = 50
#: Largest body of a conditional put: S3's single-PUT limit (multipart would drop ``If-Match``).
SINGLE_PUT_LIMIT = 5 * 2**30
#: botocore client settings: a bounded connect timeout and retry count, so a poll of an
#: unreachable store fails in seconds instead of blocking for tens of seconds.
_CLIENT_CONFIG = {"connect_timeout": 5, "retries": {"max_attempts": 3}}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class PreconditionFailed(RuntimeError):
    """A conditional put lost: the object changed (or appeared) since it was read."""


class ConditionalConflict(PreconditionFailed):
    """409 ConditionalRequestConflict: another conditional write to the key was in flight; the
    object may be unchanged, so re-read and retry."""


class WriterFenced(PreconditionFailed):
    """Another process claimed this writer id after this writer started; this one may not commit."""


class StoreUnavailable(OSError):
    """The object store or bucket of a stream root cannot be reached or does not exist."""


def is_remote(root: str | os.PathLike) -> bool:
    """True for an object-store URL (``s3://…``, ``gs://…``); ``file://`` counts as local."""
    s = os.fspath(root)
    return bool(_SCHEME.match(s)) and not s.startswith("file://")


def backoff(attempt: int) -> None:
    """Sleep a jittered, capped exponential backoff before retry ``attempt`` (from 0)."""
    time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))


def writer_lock(url: str, writer_id: str) -> threading.Lock:
    """The in-process lock of one writer id of one object-store root (threads sharing a writer,
    or two writer objects with one id, take turns: a publish is read-modify-write)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((url, writer_id), threading.Lock())


def normalize_root(root: str | os.PathLike) -> str:
    """A local root as an absolute path; an object-store URL as given, without a trailing slash."""
    s = os.fspath(root)
    if is_remote(s):
        return s.rstrip("/")
    return os.path.abspath(s.removeprefix("file://"))


def object_root(url: str) -> ObjectRoot:
    """The :class:`ObjectRoot` of ``url``, cached per process (a forked child, e.g. a DataLoader
    worker, must not reuse its parent's event loop and connections)."""
    return _object_root(url, os.getpid())


@functools.cache
def _object_root(url: str, pid: int) -> ObjectRoot:
    store = ObjectRoot(url)
    store.check()  # fail fast on a missing bucket or unreachable endpoint (not cached on failure)
    return store


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` (sorted keys)."""
    return json.dumps(obj, sort_keys=True).encode()


def _parse(rel: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{rel} is corrupt: {e}") from None


class ObjectRoot:
    """One object-store stream root: object I/O through fsspec plus the per-writer layout above.

    Credentials and endpoint come from the store's standard settings (for S3: ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
    """

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, config_kwargs=_CLIENT_CONFIG)
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        if self.protocol not in ("s3", "s3a"):
            # gcsfs has generation preconditions, but they are not wired or tested here.
            raise NotImplementedError(f"stream root {url}: conditional puts are implemented for s3:// "
                                      f"only (protocol {self.protocol!r})")

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` unless the bucket exists and is reachable (HEAD bucket)."""
        from botocore.exceptions import BotoCoreError

        bucket = self.base.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError as e:
            raise StoreUnavailable(f"stream root {self.url}: bucket {bucket!r} does not exist") from e
        except PermissionError as e:
            raise StoreUnavailable(f"stream root {self.url}: access to bucket {bucket!r} denied") from e
        except (OSError, BotoCoreError) as e:
            raise StoreUnavailable(f"stream root {self.url}: object store unreachable: {e}") from e

    # --- objects ---------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def head(self, rel: str) -> tuple[str, float] | None:
        """The object's current version tag (its ETag) and modification time; ``None`` if it does
        not exist (one HEAD request)."""
        try:
            info = self.fs.info(self.path(rel), refresh=True)
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        modified = info.get("LastModified")
        return info.get("ETag"), modified.timestamp() if modified is not None else 0.0

    def version(self, rel: str) -> str | None:
        """The object's current version tag (its ETag), ``None`` if it does not exist."""
        head = self.head(rel)
        return head[0] if head else None

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str, default: Any) -> tuple[Any, str | None]:
        """``(object, version)``; the version is taken BEFORE the read, so a put conditioned on it
        fails if the object changed in between (never the other way round)."""
        version = self.version(rel)
        if version is None:
            return default, None
        data = self.read(rel)
        if data is None:  # deleted in between
            return default, None
        return _parse(f"{self.url}/{rel}", data), version

    def put(self, rel: str, data: bytes, *, if_version: str | None | bool = False) -> None:
        """Upload ``data``. ``if_version``: ``False`` unconditional, ``None`` only if absent,
        a version tag only if the object still has it (else :class:`PreconditionFailed`;
        :class:`ConditionalConflict` on a 409). A conditional body must stay under
        :data:`SINGLE_PUT_LIMIT` (one PUT; a multipart upload would drop the precondition)."""
        kwargs: dict[str, Any] = {}
        if if_version is None:
            kwargs["mode"] = "create"
        elif if_version is not False:
            kwargs["IfMatch"] = if_version
        if kwargs and len(data) >= SINGLE_PUT_LIMIT:
            raise ValueError(f"{self.url}/{rel}: a conditional put of {len(data)} bytes exceeds the "
                             f"single-PUT limit of {SINGLE_PUT_LIMIT} bytes")
        try:
            # chunksize: s3fs goes multipart at 2*chunksize; this keeps every put under the limit single
            self.fs.pipe_file(self.path(rel), data, chunksize=SINGLE_PUT_LIMIT, **kwargs)
        except FileExistsError as e:
            raise PreconditionFailed(f"{self.url}/{rel} already exists") from e
        except OSError as e:
            cause = f"{e!r} {e.__cause__!r}"
            if "ConditionalRequestConflict" in cause:
                raise ConditionalConflict(f"{self.url}/{rel}: concurrent conditional write") from e
            if "PreconditionFailed" in cause:
                raise PreconditionFailed(f"{self.url}/{rel} changed since it was read") from e
            raise

    def upload_shard(self, writer_dir: str, info: dict[str, Any], src: str) -> tuple[dict[str, Any], int]:
        """Upload sealed shard file ``src`` (index entry ``info``, writer-relative basenames) as an
        immutable object under a fresh random attempt prefix of ``writer_dir``, ``If-None-Match: *``;
        returns the entry with the attempt-prefixed basenames and the object's size."""
        info = prefixed(info, f"{uuid.uuid4().hex[:16]}/")  # a key no attempt reuses
        key = f"{writer_dir}/{(info.get('zip_data') or info['raw_data'])['basename']}"
        with open(src, "rb") as f:
            data = f.read()
        try:
            self.put(key, data, if_version=None)  # never overwrite an object
        except PreconditionFailed:
            if self.read(key) != data:  # not our own retried upload: should never happen
                raise
        return info, len(data)

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str) -> list[dict[str, Any]]:
        """Entries directly under ``rel`` (fresh listing), each with ``name`` relative to the root."""
        self.fs.invalidate_cache(self.path(rel))
        try:
            found = self.fs.ls(self.path(rel), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        cut = len(self.base) + 1
        return [{**e, "name": e["name"][cut:]} for e in found]

    def find(self, rel: str) -> list[dict[str, Any]]:
        """Every object under ``rel`` at any depth (fresh listing), ``name`` relative to the root."""
        self.fs.invalidate_cache(self.path(rel))
        cut = len(self.base) + 1
        found = self.fs.find(self.path(rel), detail=True)
        return [{**e, "name": e["name"][cut:]} for e in found.values()]

    # --- the per-writer layout -----------------------------------------------------------------
    @staticmethod
    def writer_dir(writer_id: str) -> str:
        return f"{WRITERS}/{writer_id}"

    def writers(self) -> list[str]:
        """Writer ids that have a sub-root here (sorted)."""
        return sorted(e["name"].rsplit("/", 1)[-1] for e in self.listdir(WRITERS) if e["type"] == "directory")

    def writer_index(self, writer_id: str) -> tuple[dict[str, Any], str | None]:
        obj, version = self.read_json(f"{self.writer_dir(writer_id)}/{INDEX}", {"version": 2, "shards": []})
        if obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
            raise ValueError(f"{self.url}/{self.writer_dir(writer_id)}/{INDEX}: not an MDS version-2 index")
        return obj, version

    def writer_sidecar(self, writer_id: str, empty: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        return self.read_json(f"{self.writer_dir(writer_id)}/{SIDECAR}", empty)

    def root_index(self) -> tuple[dict[str, Any], str | None]:
        """The merged index (an empty one if no writer has merged yet) and its version."""
        obj, version = self.read_json(INDEX, {"version": 2, "shards": []})
        if obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
            raise ValueError(f"{self.url}/{INDEX}: not an MDS version-2 index")
        return obj, version


def prefixed(info: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of MDS index entry ``info`` whose file basenames start with ``prefix``."""
    out = json.loads(json.dumps(info))
    for key in ("raw_data", "zip_data"):
        if out.get(key):
            out[key]["basename"] = prefix + out[key]["basename"]
    return out
