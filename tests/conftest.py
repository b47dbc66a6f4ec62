"""Shared fixtures: a real tansu Kafka-protocol broker on 127.0.0.1 with all topics; a local S3
server (moto) for object-store stream roots."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from infra.local_s3 import start_local_s3
from streams.broker import EmbeddedBroker
from streams.signing import write_dev_keys


@pytest.fixture(scope="session", autouse=True)
def control_keys(tmp_path_factory):
    """A development keyring + operator/sentinel/trainer keys, exported (child processes inherit)."""
    env = write_dev_keys(str(tmp_path_factory.mktemp("keys")))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded broker for the whole session (topics are created on start)."""
    with EmbeddedBroker(run_dir=tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture()
def fresh_broker(tmp_path):
    """A broker of its own, for tests that stop or restart it."""
    with EmbeddedBroker(run_dir=tmp_path / "broker") as b:
        yield b


S3_BUCKET = "headwater-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1; the standard AWS variables point every client at it."""
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "w") as out:
        proc, env = start_local_s3(S3_BUCKET, log=out)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_root(s3_server) -> str:
    """A fresh object-store stream root URL in the local S3 server's bucket."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}/stream"


def stock_ids(root: str) -> list[str]:
    """Sorted sample ids a stock ``StreamingDataset`` reads from local ``root`` once its journal is
    folded (what a job's end does; a stock reader sees folded shards only)."""
    from streaming import StreamingDataset

    from streams.manifest import fold_root

    fold_root(root, force=True)
    ds = StreamingDataset(local=root, batch_size=1, shuffle=False)
    return sorted(ds[i]["id"] for i in range(len(ds)))
