"""Signed checkpoint manifests: the evaluator reads a checkpoint only under its roots, signed by a
trainer key, with every file as listed. Real DCP checkpoints of the debug model; a `.metadata`
pickle that would run code shows what the check prevents."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from evaluators.checkpoint import CheckpointTrust, load_checkpoint
from streams.checkpoint_manifest import (
    MANIFEST_NAME,
    CheckpointRejected,
    verify_checkpoint,
    write_manifest,
)
from streams.signing import Keyring, generate_keypair, load_signing_key
from streams.vocab import Vocab


@pytest.fixture(scope="module")
def model():
    from trainer.models import build_model

    torch.manual_seed(0)
    return build_model("debug_cpu", vocab_size=512)


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.from_env()  # tests/conftest.py exports the development keyring and keys


def save(root: Path, step: int, model, *, run_id: str = "r1", sign: bool = True) -> Path:
    """A checkpoint as the trainer completes it: DCP, headwater.json, then the signed manifest."""
    path = root / f"step-{step}"
    dcp.save(model.state_dict(), checkpoint_id=str(path))
    meta = {"config": "debug_cpu", "step": step, "run_id": run_id, "vocab_size": 512,
            "vocab_version": Vocab.default().version, "seq_len": 64}
    (path / "headwater.json").write_text(json.dumps(meta))
    write_manifest(path, run_id=run_id, step=step, key=load_signing_key("trainer") if sign else None)
    return path


def rejected(path, roots, keyring, **kw) -> str:
    with pytest.raises(CheckpointRejected) as e:
        verify_checkpoint(path, roots=[str(r) for r in roots], keyring=keyring, **kw)
    return e.value.reason


def test_signed_checkpoint_loads_and_manifest_lists_every_file(tmp_path, model, keyring):
    root = tmp_path / "checkpoints"
    path = save(root, 10, model)
    ok = verify_checkpoint(path, roots=[str(root)], keyring=keyring, run_id="r1", step=10)
    assert set(ok.manifest["files"]) == {p.name for p in path.iterdir() if p.name != MANIFEST_NAME}
    assert {".metadata", "headwater.json"} <= set(ok.manifest["files"])
    loaded = load_checkpoint(path, trust=CheckpointTrust(roots=[str(root)], keyring=keyring), run_id="r1", step=10)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_tampered_missing_unsigned_forged_and_wrong_checkpoints_are_rejected(tmp_path, model, keyring):
    root = tmp_path / "checkpoints"
    tampered = save(root, 10, model)
    distcp = next(p for p in tampered.iterdir() if p.suffix == ".distcp")
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF
    distcp.write_bytes(bytes(data))
    assert rejected(tampered, [root], keyring) == "hash_mismatch"

    truncated = save(root, 15, model)
    (truncated / "headwater.json").write_text("{}")
    assert rejected(truncated, [root], keyring) == "size_mismatch"

    missing = save(root, 20, model)
    (missing / MANIFEST_NAME).unlink()
    assert rejected(missing, [root], keyring) == "no_manifest"

    unsigned = save(root, 30, model, sign=False)
    assert rejected(unsigned, [root], keyring) == "unsigned"

    # forged: signed by a key the keyring does not hold, claiming the real trainer key's id
    forged = save(root, 40, model)
    body = json.loads((forged / MANIFEST_NAME).read_text())
    (forged / MANIFEST_NAME).unlink()
    rogue = generate_keypair(body["key_id"], "trainer")
    write_manifest(forged, run_id="r1", step=40, key=rogue)
    assert rejected(forged, [root], keyring) == "bad_signature"

    # a genuine key of another role (the sentinel's) may not vouch for checkpoints
    other_role = save(root, 50, model)
    (other_role / MANIFEST_NAME).unlink()
    write_manifest(other_role, run_id="r1", step=50, key=load_signing_key("sentinel"))
    assert rejected(other_role, [root], keyring) == "bad_signature"

    # a valid manifest edited after signing (hash of the tampered file pasted in)
    edited = save(root, 60, model)
    body = json.loads((edited / MANIFEST_NAME).read_text())
    body["files"][".metadata"]["sha256"] = "0" * 64
    (edited / MANIFEST_NAME).write_text(json.dumps(body))
    assert rejected(edited, [root], keyring) == "bad_signature"

    extra = save(root, 70, model)
    (extra / "payload.pkl").write_bytes(b"x")
    assert rejected(extra, [root], keyring) == "files_differ"

    good = save(root, 80, model)
    assert rejected(good, [root], keyring, run_id="r1", step=10) == "wrong_checkpoint"
    assert rejected(good, [root], keyring, run_id="other", step=80) == "wrong_checkpoint"


def test_paths_outside_the_roots_and_symlink_escapes_are_rejected(tmp_path, model, keyring):
    root, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    outside = save(elsewhere, 10, model)  # validly signed, but not under the evaluator's roots
    assert rejected(outside, [root], keyring) == "outside_roots"
    assert rejected(root / ".." / "elsewhere" / "step-10", [root], keyring) == "outside_roots"
    root.mkdir(exist_ok=True)
    link = root / "step-10"
    link.symlink_to(outside, target_is_directory=True)  # inside by name, outside by real path
    assert rejected(link, [root], keyring) == "outside_roots"
    assert rejected(root, [root], keyring) == "outside_roots"  # the root itself is no checkpoint
    assert rejected(outside, [], keyring) == "outside_roots"

    inner = save(root, 20, model)  # a listed file swapped for a symlink to an identical copy
    target = tmp_path / "copy.json"
    target.write_bytes((inner / "headwater.json").read_bytes())
    (inner / "headwater.json").unlink()
    (inner / "headwater.json").symlink_to(target)
    assert rejected(inner, [root], keyring) == "not_regular"


class _Marker:
    """Unpickling this creates a file: what a hostile `.metadata` could do, harmlessly."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_hostile_metadata_pickle_never_runs(tmp_path, model, keyring):
    root = tmp_path / "checkpoints"
    path = save(root, 10, model)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Marker(str(marker))))
    trust = CheckpointTrust(roots=[str(root)], keyring=keyring)
    with pytest.raises(CheckpointRejected, match="size_mismatch|hash_mismatch"):
        load_checkpoint(path, trust=trust, run_id="r1", step=10)
    assert not marker.exists()
    # the control: DCP itself unpickles `.metadata`, so without the check the code would have run
    with pytest.raises(CheckpointException):  # DCP fails after unpickling; what matters is the marker
        dcp.load(model.state_dict(), checkpoint_id=str(path))
    assert marker.exists()
    os.unlink(marker)


def test_a_metadata_swapped_after_the_check_is_never_unpickled(tmp_path, model, keyring, monkeypatch):
    """Time of check vs time of use: whoever can write the directory swaps `.metadata` right after
    verification; the load unpickles the bytes that were hashed, not the file on disk."""
    import evaluators.checkpoint as ec

    root = tmp_path / "checkpoints"
    path = save(root, 10, model)
    marker = tmp_path / "pwned"

    def verify_then_swap(*args, **kw):
        verified = verify_checkpoint(*args, **kw)
        (path / ".metadata").write_bytes(pickle.dumps(_Marker(str(marker))))  # the race, won
        return verified

    monkeypatch.setattr(ec, "verify_checkpoint", verify_then_swap)
    loaded = load_checkpoint(path, trust=CheckpointTrust(roots=[str(root)], keyring=keyring), run_id="r1", step=10)
    assert not marker.exists()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
