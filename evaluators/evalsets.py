"""Eval suites: versioned, held-out MDS stream roots built by the ingest transforms.

``EVAL_ROOT/<suite>/`` is a live-stream root (index.json + headwater.json sidecar) written by
:class:`streams.mds.LiveStreamWriter`, so its tokens come from the same tokenizers as the
training streams. The suite version is a hash of its published shards' content hashes: any
change to the items changes the version, and reports of different versions are never compared.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streams.mds import TailReader, read_index, read_sidecar

__all__ = ["EvalItem", "EvalSuite", "SuiteError", "load_suite"]


class SuiteError(ValueError):
    """The eval suite is missing, empty, or inconsistent."""


@dataclass(kw_only=True, slots=True)
class EvalItem:
    """One held-out item and the normalisers its metrics need."""

    id: str
    modality: str
    domain: str
    language: str
    source: str
    tokens: np.ndarray
    seconds: float = 0.0   # audio/video duration (0 if unknown)
    images: int = 0        # images in the item


@dataclass(kw_only=True, slots=True)
class EvalSuite:
    name: str
    root: str
    version: str
    vocab_version: str
    items: list[EvalItem]


def _seconds(lineage: dict[str, Any]) -> float:
    for value in (lineage.get("duration_s"), (lineage.get("qa") or {}).get("duration_s")):
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value)
    return 0.0


def _item(sample: dict[str, Any], img_open: int) -> EvalItem:
    lineage = sample.get("lineage") or {}
    if isinstance(lineage, str):
        lineage = json.loads(lineage)
    tokens = np.asarray(sample["tokens"], dtype=np.int64)
    modality = sample["modality"]
    images = int(np.count_nonzero(tokens == img_open)) if modality == "image" else 0
    return EvalItem(id=sample["id"], modality=modality, domain=sample.get("domain", ""),
                    language=sample.get("language", ""), source=sample.get("source", ""), tokens=tokens,
                    seconds=_seconds(lineage) if modality in ("audio", "video") else 0.0,
                    images=max(images, 1) if modality == "image" else 0)


def load_suite(eval_root: str | Path, name: str, *, img_open_id: int) -> EvalSuite:
    """Read every published item of suite ``name`` (stock MDS reader, hashes verified)."""
    root = Path(eval_root) / name
    index = read_index(str(root))
    if not index["shards"]:
        raise SuiteError(f"eval suite {name!r}: no published shards under {root}")
    side = read_sidecar(str(root))
    vocab_version = side.get("vocab_version") or ""
    if not vocab_version:
        raise SuiteError(f"eval suite {name!r}: {root}/headwater.json names no vocab_version")
    digest = hashlib.sha256()
    for info in index["shards"]:
        digest.update(json.dumps(sorted((info.get("raw_data") or {}).get("hashes", {}).items())).encode())
        digest.update(str(info["samples"]).encode())
    corrupt: list[str] = []
    with TailReader(root, on_corrupt=lambda shard, why: corrupt.append(f"{shard}: {why}")) as reader:
        items = [_item(s, img_open_id) for s in reader.samples(timeout_s=0)]
    if corrupt:
        raise SuiteError(f"eval suite {name!r}: corrupt shards: {corrupt}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"eval suite {name!r}: duplicate item ids")
    return EvalSuite(name=name, root=str(root), version=f"{name}-{digest.hexdigest()[:12]}",
                     vocab_version=vocab_version, items=items)
