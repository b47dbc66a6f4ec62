"""Load a trainer DCP checkpoint for evaluation (CPU here, GPU when one is present).

The trainer's contract (docs/TEAM_CONTRACTS.md, "trainer checkpoints"): ``step-N/`` holds a
torch DCP checkpoint whose model parameters sit under plain FQNs at the top level, and
``headwater.json`` (written last) with the model config name, vocab size/version and seq_len.
The model is built with ``trainer.models.build_model`` and filled by
``torch.distributed.checkpoint.load`` (no process group needed).

DCP unpickles ``.metadata``: nothing here reads a checkpoint before
``streams.checkpoint_manifest.verify_checkpoint`` accepted it (under a configured root, manifest
signed by a trainer key, every file's hash as listed); otherwise ``CheckpointRejected`` is raised.
The load unpickles the ``.metadata`` bytes that were hashed, never the file a second time.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from streams.checkpoint_manifest import CheckpointRejected, verify_checkpoint
from streams.signing import Keyring

__all__ = ["CheckpointError", "CheckpointRejected", "CheckpointTrust", "LoadedCheckpoint", "load_checkpoint"]

META = "headwater.json"


class CheckpointError(RuntimeError):
    """The checkpoint is incomplete, unreadable, or does not match its metadata."""


@dataclass(kw_only=True, slots=True)
class CheckpointTrust:
    """What a checkpoint must satisfy before it is read: a root it lies under, a trainer key."""

    roots: list[str]
    keyring: Keyring


@dataclass(slots=True)
class LoadedCheckpoint:
    model: torch.nn.Module
    meta: dict[str, Any]


class _VerifiedReader(dcp.FileSystemReader):
    """DCP's file reader, but ``.metadata`` comes from the bytes the manifest check hashed."""

    def __init__(self, path: str, metadata: bytes):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = pickle.loads(self._metadata)  # the verified, trainer-signed bytes
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_checkpoint(path: str | Path, *, trust: CheckpointTrust, run_id: str | None = None,
                    step: int | None = None, device: str = "cpu") -> LoadedCheckpoint:
    """Verify the checkpoint (raises CheckpointRejected), then build its model and load its weights."""
    from trainer.models import build_model

    verified = verify_checkpoint(path, roots=trust.roots, keyring=trust.keyring, run_id=run_id, step=step)
    path = Path(verified.path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META} (checkpoint incomplete or not a headwater checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
        model = build_model(meta["config"], vocab_size=int(meta["vocab_size"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: bad {META}: {type(e).__name__}: {e}") from None
    state = model.state_dict()
    try:
        dcp.load(state, storage_reader=_VerifiedReader(str(path), verified.dcp_metadata))
        model.load_state_dict(state)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any DCP failure becomes an EvalReport error
        # (DCP raises CheckpointException, a BaseException, e.g. when a tensor's shape differs)
        raise CheckpointError(f"{path}: DCP load failed: {type(e).__name__}: {str(e)[:500]}") from None
    return LoadedCheckpoint(model=model.to(device).eval(), meta=meta)
