"""Remove samples from a live MDS stream root: rewrite affected shards, publish them atomically.

Used by takedown. Under the root lock (writers wait), every shard holding a sample that
``drop(sample)`` selects is re-sealed without it as a new immutable shard (named like the
writer's shards: ``{domain}.{writer_id}.{hash}``). The sidecar entry of the new shard keeps the
old one's settled offset ranges (so an ingest replay of those offsets stays a no-op) and
records ``replaces`` (old name) and ``removed`` (old sample indices). A shard left empty
becomes a "settled only" entry. Then index.json is rewritten ONCE with each new shard at its
predecessor's position, and only after that are the old shard files deleted. A stock
``StreamingDataset`` opened on any snapshot sees either the old or the new set, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams import manifest as mf
from streams.mds_reader import ShardOpener
from streams.mds_writer import COLUMNS, seal_rows

__all__ = ["Removed", "RewriteResult", "remove_samples"]


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


def remove_samples(root: str, drop: Callable[[dict[str, Any]], bool], *,
                   durable: bool = True) -> RewriteResult:
    """Rewrite every shard of local stream ``root`` without the samples ``drop`` selects."""
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
                reader = opener.open(name, info)
                samples = [opener.read(reader, i) for i in range(int(info["samples"]))]
                opener.release(name)
                gone = [i for i, s in enumerate(samples) if drop(s)]
                if not gone:
                    new_infos.append(info)
                    continue
                for i in gone:
                    s = samples[i]
                    result.removed.append(Removed(
                        shard=name, index=i, id=str(s["id"]), source=str(s["source"]), license=str(s["license"]),
                        tokens=len(s["tokens"]), sha256=hashlib.sha256(s["tokens"].tobytes()).hexdigest()))
                old_entry = dict(side["shards"].get(name) or {"domain": name.split(".", 1)[0], "settled": []})
                garbage += _basenames(info)
                side["shards"].pop(name, None)
                gone_set = set(gone)
                keep = [_row(s) for i, s in enumerate(samples) if i not in gone_set]
                entry = {**old_entry, "replaces": name, "removed": gone}
                if not keep:
                    entry.update(samples=0, bytes=0)
                    side["settled_only"][name] = entry
                    result.replaced[name] = None
                    continue
                stage = os.path.join(staging, name)
                new_info = _seal(stage, keep, info)
                digest = hashlib.sha256(json.dumps([name, gone]).encode()).hexdigest()[:16]
                writer_id = old_entry.get("writer_id") or "rewrite"
                new_name = f"{old_entry['domain']}.{writer_id}.{digest}"
                src = os.path.join(stage, (new_info.get("zip_data") or new_info["raw_data"])["basename"])
                new_info["raw_data"]["basename"] = f"{new_name}.mds"
                if new_info.get("zip_data"):
                    ext = new_info["zip_data"]["basename"].rsplit(".", 1)[1]
                    new_info["zip_data"]["basename"] = f"{new_name}.mds.{ext}"
                dest = os.path.join(root, (new_info.get("zip_data") or new_info["raw_data"])["basename"])
                if durable:
                    with open(src, "rb+") as f:
                        os.fdatasync(f.fileno())
                os.replace(src, dest)
                entry.update(samples=len(keep), bytes=os.path.getsize(dest))
                side["shards"][new_name] = entry
                new_infos.append(new_info)
                result.replaced[name] = new_name
                result.kept += len(keep)
            if result.replaced:
                mf.atomic_write_json(os.path.join(root, mf.SIDECAR), side, durable=durable, sync_dir=False)
                mf.atomic_write_json(os.path.join(root, mf.INDEX), {**index, "shards": new_infos}, durable=durable)
                for basename in garbage:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, basename))
    finally:
        opener.close()
        shutil.rmtree(staging, ignore_errors=True)
    return result
