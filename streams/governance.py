"""Governance state of a stream root: the source denylist and the takedown audit log.

Both live under ``<stream-root>/_governance/``:

* ``denylist.json``: ``{"sources": {name: {"at", "by", "reason", "takedown_id"}}}``. Ingest drops
  every record of a listed source (reason ``source_taken_down``) before anything is written.
* ``takedowns.jsonl``: one audit record per takedown (hashes and counts of what was removed,
  never the removed content itself).

Source names are compared in their canonical form (streams/source_names.py: NFKC, case folded,
zero-width and look-alike characters folded), so a variant spelling is taken down too.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from streams import manifest as mf
from streams.events import DeadLetter
from streams.source_names import canonical_source

__all__ = ["DENYLIST", "GOVERNANCE_DIR", "TAKEDOWNS", "TAKEDOWN_REASON", "append_audit", "dead_letter_source",
           "deny", "denylist"]

GOVERNANCE_DIR = "_governance"
DENYLIST = "denylist.json"
TAKEDOWNS = "takedowns.jsonl"
TAKEDOWN_REASON = "source_taken_down"


def _dir(stream_root: str) -> str:
    return os.path.join(stream_root, GOVERNANCE_DIR)


def denylist(stream_root: str) -> dict[str, dict[str, Any]]:
    """Denylisted sources of ``stream_root`` (canonical name -> who/when/why); empty when there is none."""
    path = os.path.join(_dir(stream_root), DENYLIST)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        return {}
    sources = obj.get("sources") if isinstance(obj, dict) else None
    if not isinstance(sources, dict):
        raise TypeError(f"{path}: expected {{'sources': {{...}}}}")
    return sources


def deny(stream_root: str, source: str, *, by: str, reason: str, takedown_id: str) -> None:
    """Add ``source`` (its canonical form) to the denylist (atomic rewrite; an existing entry keeps
    its first date)."""
    os.makedirs(_dir(stream_root), exist_ok=True)
    sources = denylist(stream_root)
    sources.setdefault(canonical_source(source), {"at": time.time(), "by": by, "reason": reason,
                                                  "takedown_id": takedown_id, "as_given": source})
    mf.atomic_write_json(os.path.join(_dir(stream_root), DENYLIST), {"sources": sources})


def append_audit(stream_root: str, record: dict[str, Any]) -> None:
    """Append one takedown audit record (fsynced) to ``takedowns.jsonl``."""
    os.makedirs(_dir(stream_root), exist_ok=True)
    with open(os.path.join(_dir(stream_root), TAKEDOWNS), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
