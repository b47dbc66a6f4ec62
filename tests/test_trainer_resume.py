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


# -- which checkpoint to resume from (issue 14 review finding 2), on real DCP files ----------------
class DcpCheckpointer:
    """The part of torchtitan's CheckpointManager that trainer/resume.py uses (``enable``,
    ``folder``, ``load(step=)``), loading real DCP checkpoints into a model of ``width`` weights
    (another width: the configuration mistake of a changed ``--vocab-size``)."""

    enable = True

    def __init__(self, folder: str, width: int):
        self.folder, self.width, self.loaded = folder, width, None

    def load(self, step: int) -> None:
        import torch
        import torch.distributed.checkpoint as dcp

        if step != -1:
            dcp.load({"w": torch.zeros(self.width)}, checkpoint_id=os.path.join(self.folder, f"step-{step}"))
        self.loaded = step


def _checkpoints(folder: str, steps: tuple[int, ...], *, signed: bool) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from streams.checkpoint_manifest import write_manifest
    from streams.signing import load_signing_key

    for step in steps:
        path = os.path.join(folder, f"step-{step}")
        dcp.save({"w": torch.arange(4.0) + step}, checkpoint_id=path)
        if signed:
            write_manifest(path, run_id="r", step=step, key=load_signing_key("trainer"))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_config_mistake_moves_no_checkpoint_and_the_right_config_resumes(tmp_path, signed):
    """Every checkpoint fails to load under a wrong configuration: none may be moved aside (the
    old behaviour moved all of them, and the next restart trained from scratch)."""
    from trainer.resume import NoIntactCheckpoint, load_latest_intact

    folder = str(tmp_path / "checkpoints")
    _checkpoints(folder, (2, 4), signed=signed)
    wrong = DcpCheckpointer(folder, width=8)
    match = "matches its signed manifest" if signed else "Nothing was moved"
    with pytest.raises(NoIntactCheckpoint, match=match):
        load_latest_intact(wrong, run_id="r")
    assert sorted(os.listdir(folder)) == ["step-2", "step-4"]  # nothing set aside
    right = DcpCheckpointer(folder, width=4)
    assert load_latest_intact(right, run_id="r") == 4 and right.loaded == 4


def test_a_broken_latest_checkpoint_is_set_aside_once_an_older_one_loads(tmp_path):
    from trainer.resume import load_latest_intact

    folder = str(tmp_path / "checkpoints")
    _checkpoints(folder, (2, 4), signed=False)
    latest = os.path.join(folder, "step-4")
    for name in os.listdir(latest):
        if name.endswith(".distcp"):
            with open(os.path.join(latest, name), "r+b") as f:
                f.truncate(8)
    assert load_latest_intact(DcpCheckpointer(folder, width=4), run_id="r") == 2
    assert [n.split(".")[0] for n in os.listdir(os.path.join(folder, "corrupt"))] == ["step-4"]


def test_no_fresh_start_over_set_aside_checkpoints_unless_allowed(tmp_path):
    from trainer.resume import NoIntactCheckpoint, load_latest_intact

    folder = tmp_path / "checkpoints"
    (folder / "corrupt" / "step-4.1700000000").mkdir(parents=True)
    with pytest.raises(NoIntactCheckpoint, match="refusing to train from scratch.*--allow-fresh-start"):
        load_latest_intact(DcpCheckpointer(str(folder), width=4), run_id="r")
    ckpt = DcpCheckpointer(str(folder), width=4)
    assert load_latest_intact(ckpt, run_id="r", allow_fresh_start=True) == -1 and ckpt.loaded == -1
