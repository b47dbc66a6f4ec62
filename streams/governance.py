"""Governance state of a stream root: the source denylist and the takedown audit log.

Both live under ``<stream-root>/_governance/`` (a folder of a local root, a key prefix of an
object-store root):

* ``denylist.json``: ``{"sources": {name: {"at", "by", "reason", "takedown_id"}}}``. Ingest drops
  every record of a listed source (reason ``source_taken_down``) before anything is written.
* ``takedowns.jsonl``: two audit records per takedown, ``phase`` ``started`` (written before
  anything changes) and ``finished`` (hashes and counts of what was removed, never the removed
  content itself; ``error`` if it failed): a started record without a finished one is a takedown
  that was killed. An object store cannot append: there each record is its own object,
  ``takedowns/<ms>-<takedown_id>-<phase>.json``, put ``If-None-Match``. Not tamper-evident: whoever
  can write the root can delete or replace records (see docs/OPERATIONS.md for the IAM split).
* ``takedown-<id>.json`` and ``.txt``: the report of one takedown.

On an object-store root the denylist is updated by compare-and-swap (``If-Match`` of the version
read), so two takedowns at once both land.

Source names are compared in their canonical form (streams/source_names.py: NFKC, case folded,
zero-width and look-alike characters folded), so a variant spelling is taken down too.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from streams import manifest as mf
from streams import storage
from streams.events import DeadLetter
from streams.source_names import canonical_source

__all__ = ["DENYLIST", "GOVERNANCE_DIR", "TAKEDOWNS", "TAKEDOWN_REASON", "append_audit", "dead_letter_source",
           "deny", "denylist", "save_report"]

GOVERNANCE_DIR = "_governance"
DENYLIST = "denylist.json"
TAKEDOWNS = "takedowns.jsonl"
TAKEDOWN_REASON = "source_taken_down"


def _dir(stream_root: str) -> str:
    return os.path.join(stream_root, GOVERNANCE_DIR)


def _store(stream_root: str) -> storage.ObjectRoot | None:
    return storage.object_root(storage.normalize_root(stream_root)) if storage.is_remote(stream_root) else None


def _sources(where: str, obj: Any) -> dict[str, dict[str, Any]]:
    sources = obj.get("sources") if isinstance(obj, dict) else None
    if not isinstance(sources, dict):
        raise TypeError(f"{where}: expected {{'sources': {{...}}}}")
    return sources


def denylist(stream_root: str) -> dict[str, dict[str, Any]]:
    """Denylisted sources of ``stream_root`` (canonical name -> who/when/why); empty when there is none."""
    store = _store(stream_root)
    if store is not None:
        return _sources(f"{store.url}/{GOVERNANCE_DIR}/{DENYLIST}",
                        store.read_json(f"{GOVERNANCE_DIR}/{DENYLIST}", {"sources": {}})[0])
    path = os.path.join(_dir(stream_root), DENYLIST)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        return {}
    return _sources(path, obj)


def deny(stream_root: str, source: str, *, by: str, reason: str, takedown_id: str) -> None:
    """Add ``source`` (its canonical form) to the denylist (atomic rewrite, or a compare-and-swap
    put on an object store; an existing entry keeps its first date)."""
    entry = {"at": time.time(), "by": by, "reason": reason, "takedown_id": takedown_id, "as_given": source}
    store = _store(stream_root)
    if store is not None:
        rel = f"{GOVERNANCE_DIR}/{DENYLIST}"
        for attempt in range(storage.CAS_ATTEMPTS):
            obj, version = store.read_json(rel, {"sources": {}})
            sources = _sources(f"{store.url}/{rel}", obj)
            if canonical_source(source) in sources:
                return
            sources[canonical_source(source)] = entry
            try:
                store.put(rel, storage.json_bytes({"sources": sources}), if_version=version)
                return
            except storage.PreconditionFailed:
                storage.backoff(attempt)
        raise storage.PreconditionFailed(f"{store.url}/{rel}: {storage.CAS_ATTEMPTS} updates lost")
    os.makedirs(_dir(stream_root), exist_ok=True)
    sources = denylist(stream_root)
    sources.setdefault(canonical_source(source), entry)
    mf.atomic_write_json(os.path.join(_dir(stream_root), DENYLIST), {"sources": sources})


def append_audit(stream_root: str, record: dict[str, Any]) -> None:
    """Append one takedown audit record (fsynced) to ``takedowns.jsonl`` (an object store: put it
    as ``takedowns/<ms>-<takedown_id>-<phase>.json``, ms of its ``finished_at`` or ``started_at``,
    never overwriting one). A takedown appends a ``started`` record first and a ``finished`` one
    last (with ``error`` if it failed)."""
    store = _store(stream_root)
    if store is not None:
        at = record.get("finished_at") or record["started_at"]
        key = f"{int(at * 1000):013d}-{record['takedown_id']}-{record['phase']}.json"
        store.put(f"{GOVERNANCE_DIR}/takedowns/{key}", storage.json_bytes(record), if_version=None)
        return
    os.makedirs(_dir(stream_root), exist_ok=True)
    with open(os.path.join(_dir(stream_root), TAKEDOWNS), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_report(stream_root: str, takedown_id: str, report: dict[str, Any], text: str) -> str:
    """Write a takedown's report as ``takedown-<id>.json`` and ``.txt``; the JSON's path or URL."""
    base = f"{GOVERNANCE_DIR}/takedown-{takedown_id}"
    store = _store(stream_root)
    if store is not None:
        store.put(f"{base}.txt", text.encode(), if_version=None)
        store.put(f"{base}.json", storage.json_bytes(report), if_version=None)
        return f"{store.url}/{base}.json"
    os.makedirs(_dir(stream_root), exist_ok=True)
    path = os.path.join(stream_root, base)
    with open(f"{path}.txt", "w") as f:
        f.write(text)
    mf.atomic_write_json(f"{path}.json", report)
    return f"{path}.json"


def dead_letter_source(dead: DeadLetter) -> str | None:
    """The ``source`` named in a dead letter's original bytes (a JSON record), if it can be read.

    A truncated, non-JSON (e.g. Parquet row bytes) or source-less original has none: such dead
    letters cannot be attributed to a source and are not removed by a takedown."""
    try:  # the bytes are hostile by definition: any parse failure means "no source"
        obj = json.loads(dead.original())
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
        return None
    source = obj.get("source") if isinstance(obj, dict) else None
    return source if isinstance(source, str) else None
