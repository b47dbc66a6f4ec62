"""Shared fixtures: a real tansu Kafka-protocol broker on 127.0.0.1 with all topics."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
