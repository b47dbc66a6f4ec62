"""The `headwater` CLI: up/topics/down through the installed console script, clear errors."""

import socket
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from streams.broker import free_port
from streams.topics import TOPICS

HEADWATER = str(Path(sys.executable).parent / "headwater")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HEADWATER, *args], capture_output=True, text=True, timeout=60, check=False)


def test_up_then_independent_client_lists_topics_then_down(tmp_path):
    port = str(free_port())
    up = run("up", "--run-dir", str(tmp_path), "--port", port)
    assert up.returncode == 0, up.stderr
    try:
        assert (tmp_path / "broker.pid").exists()
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert set(TOPICS) <= set(md.topics)
        listed = run("topics", "--run-dir", str(tmp_path))
        assert set(TOPICS) <= set(listed.stdout.split())
        again = run("up", "--run-dir", str(tmp_path), "--port", port)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = run("down", "--run-dir", str(tmp_path))
    assert down.returncode == 0
    assert not (tmp_path / "broker.pid").exists()
    assert run("down", "--run-dir", str(tmp_path)).returncode == 1


def test_up_on_a_taken_port_says_so(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("up", "--run-dir", str(tmp_path), "--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and "already in use" in r.stderr


def test_missing_broker_binary_is_a_clear_error(tmp_path):
    import os
    env = dict(os.environ, CALF_TANSU_BIN=str(tmp_path / "nope"))
    r = subprocess.run([HEADWATER, "up", "--run-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    assert r.returncode == 1 and "binary not found" in r.stderr


def test_help_and_unknown_command():
    assert "ingest" in run("--help").stdout
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
