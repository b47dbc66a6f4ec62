"""Read media payloads: inline base64, or a URI under an allowed scheme and prefix.

The allow-list is checked on the normalised URI *before* any filesystem is
touched, so ``file:///etc/passwd`` or ``../`` tricks never reach a read.
Local files are read without following symlinks or opening FIFOs/devices; remote ones go
through ``apache_beam.io.filesystems.FileSystems`` (gs://, s3://). Transient read errors are
retried before a record is dead-lettered (as ``uri_unavailable``, distinct from ``uri_unreadable``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from streams.events import EventError, RawRecord

from .errors import MediaRejected

__all__ = ["UriPolicy", "check_uri", "read_payload"]


@dataclass(kw_only=True, slots=True)
class UriPolicy:
    """Which media URIs may be read, and how many bytes at most."""

    allowed_schemes: tuple[str, ...] = ("file", "gs", "s3")
    allowed_prefixes: tuple[str, ...] = ()  # e.g. ("file:///data/media/", "gs://bucket/raw/")
    max_bytes: int = 256 * 1024 * 1024
    read_attempts: int = 3  # transient read errors are retried (exponential backoff) this often
    retry_backoff_s: float = 0.2


def _normalise(uri: str) -> tuple[str, str]:
    """Return (scheme, normalised uri); plain paths are treated as file:// URIs."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if not scheme:
        scheme, path, netloc = "file", uri, ""
    else:
        path, netloc = unquote(parts.path), parts.netloc
    if parts.query or parts.fragment:
        raise MediaRejected("uri_not_allowed", f"query/fragment not allowed in {uri!r}")
    if scheme == "file":
        if netloc not in ("", "localhost") or not path.startswith("/"):
            raise MediaRejected("uri_not_allowed", f"file URIs must be absolute local paths: {uri!r}")
        return scheme, "file://" + posixpath.normpath("/" + path.lstrip("/"))
    norm = posixpath.normpath("/" + path.lstrip("/")) if path else ""
    return scheme, f"{scheme}://{netloc}{norm}"


def _prefixes(policy: UriPolicy) -> list[str]:
    return [_normalise(p)[1].rstrip("/") + "/" for p in policy.allowed_prefixes]


def _prefix_of(path: str, policy: UriPolicy) -> str:
    """The allowed prefix ``path`` (as returned by :func:`check_uri`) lies under, as a path for files."""
    for p in sorted(_prefixes(policy), key=len, reverse=True):
        local = p.removeprefix("file://")
        if path.startswith(local):
            return local
    raise MediaRejected("uri_not_allowed", f"{path!r} is under no allowed prefix")


def check_uri(uri: str, policy: UriPolicy) -> str:
    """Return the filesystem path to read for ``uri``; raise MediaRejected if it is not allowed."""
    if not uri or "\x00" in uri:
        raise MediaRejected("uri_not_allowed", "empty URI or NUL byte")
    scheme, norm = _normalise(uri)
    if scheme not in policy.allowed_schemes:
        raise MediaRejected("uri_not_allowed", f"scheme {scheme!r} not in {policy.allowed_schemes}")
    if not any(norm.startswith(p) for p in _prefixes(policy)):
        raise MediaRejected("uri_not_allowed", f"{norm!r} is under no allowed prefix")
    return norm[len("file://"):] if scheme == "file" else norm


_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                               errno.ENAMETOOLONG, errno.ENXIO})
_PERMANENT_WORDS = ("not found", "nosuchkey", "no such", "404", "403", "forbidden", "access denied")


def _permanent(e: BaseException) -> bool:
    """Whether a read error will recur (missing, forbidden, a symlink...) rather than pass (throttling, I/O)."""
    if isinstance(e, MediaRejected):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in _PERMANENT_ERRNOS
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in _PERMANENT_WORDS)


def _read_local(path: str, prefix: str, max_bytes: int) -> bytes:
    """Read a regular file below ``prefix`` without following symlinks or blocking on FIFOs/devices.

    Every component below the (operator-configured) prefix is ``lstat``-ed; the file itself is
    opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file by ``fstat``.
    """
    rel = path[len(prefix):].split("/") if path.startswith(prefix) else []
    at = prefix.rstrip("/")
    for part in rel[:-1]:
        at = f"{at}/{part}"
        if stat.S_ISLNK(os.lstat(at).st_mode):
            raise MediaRejected("uri_symlink", f"{at} is a symlink")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MediaRejected("uri_symlink", f"{path} is a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise MediaRejected("uri_not_regular", f"{path} is not a regular file (mode {stat.filemode(mode)})")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_remote(path: str, max_bytes: int) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read(max_bytes + 1)


def _read(path: str, prefix: str, policy: UriPolicy) -> bytes:
    """Read with bounded retries: permanent failures -> ``uri_unreadable`` (or a specific reason)
    at once; transient ones (I/O errors, throttling) are retried with backoff, then -> ``uri_unavailable``."""
    error: BaseException | None = None
    for attempt in range(policy.read_attempts):
        if attempt:
            time.sleep(policy.retry_backoff_s * 2 ** (attempt - 1))
        try:
            data = (_read_local(path, prefix, policy.max_bytes) if prefix.startswith("/")
                    else _read_remote(path, policy.max_bytes))
            break
        except MediaRejected:
            raise
        except Exception as e:  # noqa: BLE001 - classified below: every read failure is this record's
            error = e
            if _permanent(e):
                raise MediaRejected("uri_unreadable", f"{path}: {type(e).__name__}: {e}") from None
    else:
        raise MediaRejected("uri_unavailable", f"{path}: still failing after {policy.read_attempts} attempts: "
                            f"{type(error).__name__}: {error}")
    if len(data) > policy.max_bytes:
        raise MediaRejected("too_large", f"{path} exceeds {policy.max_bytes} bytes")
    return data


def read_payload(record: RawRecord, policy: UriPolicy) -> bytes:
    """The record's media bytes (inline or by allowed URI); empty payloads are rejected."""
    if record.uri is not None:
        path = check_uri(record.uri, policy)
        data = _read(path, _prefix_of(path, policy), policy)
    else:
        try:
            data = record.payload_bytes()
        except EventError as e:
            raise MediaRejected("bad_payload", str(e)) from None
        if len(data) > policy.max_bytes:
            raise MediaRejected("too_large", f"inline payload exceeds {policy.max_bytes} bytes")
    if not data:
        raise MediaRejected("empty", "zero-length payload")
    return data
