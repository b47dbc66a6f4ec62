"""Read media payloads: inline base64, or a URI under an allowed scheme and prefix.

The allow-list is checked on the normalised URI *before* any filesystem is
touched, so ``file:///etc/passwd`` or ``../`` tricks never reach a read.
Reads go through ``apache_beam.io.filesystems.FileSystems`` (local, gs://, s3://).
"""

from __future__ import annotations

import posixpath
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


def check_uri(uri: str, policy: UriPolicy) -> str:
    """Return the filesystem path to read for ``uri``; raise MediaRejected if it is not allowed."""
    if not uri or "\x00" in uri:
        raise MediaRejected("uri_not_allowed", "empty URI or NUL byte")
    scheme, norm = _normalise(uri)
    if scheme not in policy.allowed_schemes:
        raise MediaRejected("uri_not_allowed", f"scheme {scheme!r} not in {policy.allowed_schemes}")
    prefixes = [_normalise(p)[1].rstrip("/") + "/" for p in policy.allowed_prefixes]
    if not any(norm.startswith(p) for p in prefixes):
        raise MediaRejected("uri_not_allowed", f"{norm!r} is under no allowed prefix")
    return norm[len("file://"):] if scheme == "file" else norm


def _read(path: str, max_bytes: int) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any IO failure is a per-record rejection
        raise MediaRejected("uri_unreadable", f"{path}: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise MediaRejected("too_large", f"{path} exceeds {max_bytes} bytes")
    return data


def read_payload(record: RawRecord, policy: UriPolicy) -> bytes:
    """The record's media bytes (inline or by allowed URI); empty payloads are rejected."""
    if record.uri is not None:
        data = _read(check_uri(record.uri, policy), policy.max_bytes)
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
