"""The `headwater` CLI: up/topics/down through the installed console script, clear errors."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from streams.broker import free_port
from streams.events import Control
from streams.signing import ControlVerifier
from streams.topics import TOPICS

HEADWATER = str(Path(sys.executable).parent / "headwater")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([HEADWATER, *args], capture_output=True, text=True, timeout=60, check=False, env=env)


def test_up_then_independent_client_lists_topics_then_down(tmp_path):
    port = str(free_port())
    up = run("up", "--run-dir", str(tmp_path), "--port", port)
    assert up.returncode == 0, up.stderr
    # `up` made development keys (0600) and printed how to use them; the operator CLI signs with them
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                   if line.startswith("export "))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")} | exports
    try:
        assert (tmp_path / "broker.pid").exists()
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert set(TOPICS) <= set(md.topics)
        listed = run("topics", "--run-dir", str(tmp_path))
        assert set(TOPICS) <= set(listed.stdout.split())
        again = run("up", "--run-dir", str(tmp_path), "--port", port)
        assert again.returncode == 1 and "already running" in again.stderr
        assert set(exports) == {"HEADWATER_KEYRING_FILE", "HEADWATER_OPERATOR_KEY_FILE",
                                "HEADWATER_SENTINEL_KEY_FILE", "HEADWATER_TRAINER_KEY_FILE"}
        assert all(Path(p).parent == tmp_path / "keys" for p in exports.values())
        assert (Path(exports["HEADWATER_OPERATOR_KEY_FILE"]).stat().st_mode & 0o777) == 0o600
        sent = run("control", "quarantine-source", "--bootstrap", f"127.0.0.1:{port}", "--source", "spam",
                   "--reason", "cli test", env=env)
        assert sent.returncode == 0, sent.stderr
        control = Control.from_json(sent.stdout)
        assert ControlVerifier.from_env(exports).verify(control).role == "operator"
        assert control.args == {"source": "spam"} and control.reason == "cli test"
        no_run = run("control", "rollback", "--bootstrap", f"127.0.0.1:{port}", "--step", "3", "--reason", "x", env=env)
        assert no_run.returncode == 2 and "--run-id" in no_run.stderr
    finally:
        down = run("down", "--run-dir", str(tmp_path))
    assert down.returncode == 0
    lost = run("control", "pause-source", "--bootstrap", f"127.0.0.1:{port}", "--source", "spam", "--reason", "x",
               "--timeout-s", "2", env=env)
    assert lost.returncode == 1 and "NOT delivered" in lost.stderr
    no_key = run("control", "pause-source", "--bootstrap", f"127.0.0.1:{port}", "--source", "s", "--reason", "x",
                 env={k: v for k, v in env.items() if "OPERATOR" not in k})
    assert no_key.returncode == 2 and "no operator key" in no_key.stderr
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
