"""kill -9 mid-run, re-run the same command: per-step losses identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from trainer.runs import step_losses as losses
from trainer.runs import train_argv
from trainer.synthetic import write_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = {"noise": "noise", "markov": "markov", "counting": "counting"}


def train_cmd(stream: str, run_dir: str, *extra: str) -> list[str]:
    return train_argv([stream], run_dir, "--nproc", "2", "--vocab-size", "512", "--no-wandb", *extra)


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def wait_for(pred, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill9_resume_reproduces_losses(tmp_path):
    stream = str(tmp_path / "stream")
    write_stream(stream, domains=DOMAINS, shards=4, per_shard=40, vocab=512, seed=3)
    steps = ["--steps", "14", "--checkpoint-every", "4", "--mixing", "odm"]

    ref = str(tmp_path / "ref")
    assert subprocess.run(train_cmd(stream, ref, *steps), check=False, env=env(), cwd=ROOT).returncode == 0

    run = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(stream, run, *steps), env=env(), cwd=ROOT, start_new_session=True)
    ckpt = os.path.join(run, "checkpoints", "step-8", "headwater.json")
    try:
        wait_for(lambda: os.path.exists(ckpt) and max(losses(run), default=0) >= 10, 240, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(losses(run)) < 14, "the run finished before it could be killed"
    assert subprocess.run(train_cmd(stream, run, *steps), check=False, env=env(), cwd=ROOT).returncode == 0

    expected, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, 15))
    assert got == expected  # bit-for-bit: same floats from the JSON records
