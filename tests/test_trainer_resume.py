"""kill -9 of the launcher's process group mid-run, the same command at once: the ranks die with
their launcher, the re-run waits for their lock, resumes, and its per-step losses are identical
to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from trainer.runs import read_metrics, train_argv
from trainer.runs import step_losses as losses
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
        ranks = rank_pids(run)
        assert len(ranks) == 2 and all(os.getsid(p) != proc.pid for p in ranks)  # torchrun's own sessions
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group: launcher and torchrun's agent
        proc.wait()
    # the same command at once: it waits for the dying ranks' lock, then resumes
    rerun = subprocess.Popen(train_cmd(stream, run, *steps), env=env(), cwd=ROOT)
    wait_for(lambda: not any(alive(p) for p in ranks), 15)  # the ranks died with their launcher
    assert rerun.wait(timeout=600) == 0

    expected, got = losses(ref), losses(run)
    assert got == expected  # bit-for-bit: same floats from the JSON records
    trained = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert len(trained) > 14, "the rerun did not resume from a checkpoint (no step was trained twice)"


def rank_pids(run_dir: str) -> list[int]:
    """Processes running ``trainer.entry`` for ``run_dir`` (the torchrun ranks)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (b"trainer.entry" in argv and b"torch.distributed.run" not in argv  # not torchrun's agent
                and os.fsencode(os.path.abspath(run_dir)) in argv):
            found.append(int(pid))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
