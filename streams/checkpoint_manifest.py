"""Signed checkpoint manifests: the trainer lists every file of a checkpoint, evaluators verify it.

torch DCP unpickles a checkpoint's ``.metadata`` when it loads it, so loading a checkpoint an
event merely names would run whatever code the file holds. A checkpoint is therefore loaded only
after :func:`verify_checkpoint` has checked that

1. its directory resolves (``realpath``, so no symlink escapes) under a configured root;
2. it holds :data:`MANIFEST_NAME`, signed (Ed25519, ``streams.signing``) by a keyring key of
   role ``trainer``, naming the expected run and step;
3. the files on disk are exactly the manifest's files, regular files (no symlinks), each with
   the listed size and sha256.

``.metadata`` is the one file DCP unpickles (tensor data goes through ``torch.load(...,
weights_only=True)``): its bytes are read once, hashed, and returned in
:class:`VerifiedCheckpoint`, so a loader unpickles exactly what was verified, not whatever a
writer of the directory swapped in after the check.

The signature covers :data:`MANIFEST_CONTEXT` + the canonical JSON (sorted keys, no whitespace)
of every field but ``signature``. The manifest is written last, after the DCP save completed
(``.metadata`` exists) and after ``headwater.json``; it is what makes a checkpoint complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from streams.signing import Keyring, SigningKey, sign_bytes

__all__ = [
    "DCP_METADATA",
    "MANIFEST_CONTEXT",
    "MANIFEST_NAME",
    "CheckpointRejected",
    "VerifiedCheckpoint",
    "build_manifest",
    "dcp_complete",
    "under_roots",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_CONTEXT = b"headwater.checkpoint-manifest.v1\n"
DCP_METADATA = ".metadata"
_MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 1 << 20


class CheckpointRejected(Exception):
    """A checkpoint failed verification; ``reason`` is a short code, the message says why."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    """A checkpoint that passed :func:`verify_checkpoint`: its real path, the signer's key id, and
    the verified bytes of its DCP ``.metadata`` (load those, never the file again)."""

    path: str
    key_id: str
    manifest: dict[str, Any]
    dcp_metadata: bytes = b""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk(step_dir: str) -> dict[str, os.stat_result]:
    """Every entry below ``step_dir`` except the manifest, by relative path (lstat: links not followed)."""
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(step_dir, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, step_dir).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode) or rel == MANIFEST_NAME:
                continue
            out[rel] = st
    return out


def _canonical(body: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return MANIFEST_CONTEXT + text.encode("ascii")


def dcp_complete(step_dir: str | os.PathLike) -> bool:
    """True once DCP finished writing ``step_dir`` (its coordinator writes ``.metadata`` last)."""
    return os.path.isfile(os.path.join(os.fspath(step_dir), DCP_METADATA))


def build_manifest(step_dir: str | os.PathLike, *, run_id: str, step: int) -> dict[str, Any]:
    """The unsigned manifest of ``step_dir``: every regular file with its size and sha256."""
    step_dir = os.fspath(step_dir)
    files: dict[str, dict[str, Any]] = {}
    for rel, st in sorted(_walk(step_dir).items()):
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{step_dir}/{rel}: not a regular file; a checkpoint holds regular files only")
        files[rel] = {"size": st.st_size, "sha256": _sha256(os.path.join(step_dir, rel))}
    return {"version": 1, "run_id": run_id, "step": int(step), "created_at": time.time(), "files": files,
            "key_id": "", "signature": ""}


def write_manifest(step_dir: str | os.PathLike, *, run_id: str, step: int, key: SigningKey | None) -> dict[str, Any]:
    """Hash ``step_dir``, sign the manifest with ``key`` (role trainer) and write it atomically.

    ``key=None`` writes an unsigned manifest, which :func:`verify_checkpoint` rejects: a run
    without a trainer key produces checkpoints that no evaluator will load."""
    if not dcp_complete(step_dir):
        raise FileNotFoundError(f"{step_dir}: no {DCP_METADATA}; the DCP save is not complete")
    body = build_manifest(step_dir, run_id=run_id, step=step)
    if key is not None:
        body["key_id"] = key.key_id
        body["signature"] = sign_bytes(key, _canonical(body))
    path = os.path.join(os.fspath(step_dir), MANIFEST_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return body


def under_roots(path: str | os.PathLike, roots: list[str]) -> str | None:
    """``path``'s realpath if it lies strictly inside one of ``roots`` (their realpaths), else None."""
    real = os.path.realpath(os.fspath(path))
    for root in roots:
        base = os.path.realpath(root)
        if real != base and os.path.commonpath([real, base]) == base:
            return real
    return None


def _read_manifest(step_dir: str) -> dict[str, Any]:
    path = os.path.join(step_dir, MANIFEST_NAME)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointRejected("no_manifest", f"{path} missing (unsigned or incomplete checkpoint)") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
        raise CheckpointRejected("bad_manifest", f"{path}: not a regular file under {_MAX_MANIFEST_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointRejected("bad_manifest", f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not (isinstance(body, dict) and body.get("version") == 1 and isinstance(body.get("files"), dict)
            and all(isinstance(v, dict) for v in body["files"].values())):
        raise CheckpointRejected("bad_manifest", f"{path}: expected a version 1 manifest with files")
    return body


def verify_checkpoint(path: str | os.PathLike, *, roots: list[str], keyring: Keyring,
                      run_id: str | None = None, step: int | None = None) -> VerifiedCheckpoint:
    """Check ``path`` as the module docstring says, before anything reads its DCP files.

    Raises :class:`CheckpointRejected` with reasons ``outside_roots``, ``not_a_directory``,
    ``no_manifest``, ``bad_manifest``, ``unsigned``, ``bad_signature``, ``wrong_checkpoint``,
    ``files_differ``, ``not_regular``, ``size_mismatch`` or ``hash_mismatch``."""
    if not roots:
        raise CheckpointRejected("outside_roots", "no checkpoint roots configured")
    real = under_roots(path, roots)
    if real is None:
        raise CheckpointRejected("outside_roots",
                                 f"{path} (real path {os.path.realpath(os.fspath(path))}) is not under {roots}")
    if not os.path.isdir(real):
        raise CheckpointRejected("not_a_directory", f"{path} is not a checkpoint directory")
    body = _read_manifest(real)
    key_id, signature = body.get("key_id"), body.get("signature")
    if not key_id or not signature or not isinstance(key_id, str) or not isinstance(signature, str):
        raise CheckpointRejected("unsigned", f"{path}: manifest has no signature")
    try:
        signed = _canonical(body)
    except (TypeError, ValueError) as e:
        raise CheckpointRejected("bad_manifest", f"{path}: manifest not canonical JSON ({e})") from None
    if not keyring.verify_bytes(key_id, signed, signature, role="trainer"):
        raise CheckpointRejected("bad_signature",
                                 f"{path}: manifest signature does not verify with a trainer key {key_id!r}")
    if (run_id is not None and body.get("run_id") != run_id) or (step is not None and body.get("step") != step):
        raise CheckpointRejected("wrong_checkpoint", f"{path}: manifest is for run {body.get('run_id')!r} step "
                                                     f"{body.get('step')!r}, expected {run_id!r} step {step!r}")
    on_disk = _walk(real)
    listed = body["files"]
    if set(on_disk) != set(listed):
        extra, missing = sorted(set(on_disk) - set(listed)), sorted(set(listed) - set(on_disk))
        raise CheckpointRejected("files_differ", f"{path}: unlisted files {extra[:5]}, missing files {missing[:5]}")
    metadata = b""
    for rel, want in sorted(listed.items()):
        st = on_disk[rel]
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointRejected("not_regular", f"{path}/{rel} is not a regular file (symlink or device)")
        if st.st_size != want.get("size"):
            raise CheckpointRejected("size_mismatch", f"{path}/{rel}: {st.st_size} bytes, manifest says "
                                                      f"{want.get('size')}")
        if rel == DCP_METADATA:  # kept: what is unpickled must be what was hashed
            with open(os.path.join(real, rel), "rb") as f:
                metadata = f.read(int(want["size"]) + 1)
            digest = hashlib.sha256(metadata).hexdigest()
        else:
            digest = _sha256(os.path.join(real, rel))
        if digest != want.get("sha256"):
            raise CheckpointRejected("hash_mismatch", f"{path}/{rel}: sha256 differs from the manifest")
    return VerifiedCheckpoint(path=real, key_id=key_id, manifest=body, dcp_metadata=metadata)
