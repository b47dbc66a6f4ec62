"""Trainer rollbacks converge: idempotent by control id, unique abandoned-checkpoint folders, only the
regressed domain's shards quarantined, and a rollback killed halfway (kill -9) completed on restart.

The rollback code of :class:`HeadwaterTrainer` runs on real files (checkpoint folders, the
journal, the quarantine, metrics.jsonl) and a real live-stream loader; only the DCP load is left
out (the torchrun test in test_trainer_control.py restores real checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from streams.events import Control
from streams.signing import ControlRejected, ControlVerifier
from trainer.control_state import ControlState
from trainer.data.loader import LiveStreamDataLoader
from trainer.metrics_log import MetricsLog
from trainer.quarantine import Quarantine
from trainer.rollback_journal import RollbackJournal
from trainer.synthetic import write_stream
from trainer.train import HeadwaterTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FolderCheckpointer:
    """The part of torchtitan's checkpointer a rollback touches: the folder of step-N checkpoints."""

    def __init__(self, folder: str):
        self.folder = folder
        self.loaded: list[int] = []
        self.in_flight: int | None = None  # step of an async save not on disk yet
        self.waited: list[list[str]] = []  # checkpoint dirs present whenever a rollback waited

    def maybe_wait_for_saving(self) -> None:
        """Like torchtitan: block until the async save in flight is written (here: write it)."""
        self.waited.append(sorted(os.listdir(self.folder)))
        if self.in_flight is not None:
            save(os.path.dirname(self.folder), self.in_flight)
            with open(os.path.join(self.folder, f"step-{self.in_flight}", ".metadata"), "w") as f:
                f.write("complete")
            self.in_flight = None

    def load(self, step: int = -1) -> bool:
        self.loaded.append(step)
        return True


def save(run: str, *steps: int) -> None:
    for step in steps:
        os.makedirs(os.path.join(run, "checkpoints", f"step-{step}"), exist_ok=True)
        with open(os.path.join(run, "checkpoints", f"step-{step}", ".metadata"), "w") as f:
            f.write("complete")  # DCP's last file: a checkpoint without it is not one to roll back to
        with open(os.path.join(run, "checkpoints", f"step-{step}", "headwater.json"), "w") as f:
            json.dump({"step": step, "good": True}, f)


def trainer_at(run: str, step: int, stream: str) -> HeadwaterTrainer:
    """A HeadwaterTrainer with its rollback state (journal, quarantine, shard log) on ``run``."""
    t = HeadwaterTrainer.__new__(HeadwaterTrainer)
    t.rank, t.step, t.run_dir, t.run_id, t.events, t.finisher = 0, step, run, "run1", None, None
    t.checkpointer = FolderCheckpointer(os.path.join(run, "checkpoints"))
    t.rollbacks = RollbackJournal(run, writer=True)
    t.quarantine = Quarantine(run, writer=True)
    t.control_state = ControlState(run, writer=True)
    t.metrics_log = MetricsLog(MetricsLog.Config(wandb=False), run_dir=run, run_id="run1")
    t.dataloader = LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[stream], starve_timeout_s=2),
                                        dp_world_size=1, dp_rank=0, seq_len=32, local_batch_size=2, vocab_size=64)
    # steps 11..30 trained shards of two domains (the shard log a checkpoint carries)
    t.shard_log = {5: {"m0": "markov", "n0": "noise"}, 15: {"m1": "markov", "n1": "noise", "p1": "poison"},
                   25: {"m2": "markov", "n2": "noise", "old": ""}}
    return t


def rollback_dirs(run: str) -> list[str]:
    abandoned = os.path.join(run, "checkpoints", "abandoned")
    return sorted(os.listdir(abandoned)) if os.path.isdir(abandoned) else []


def test_rollback_is_idempotent_scoped_to_the_regressed_domain_and_never_collides(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=10, vocab=64)
    save(run, 10, 20, 30)
    t = trainer_at(run, 30, stream)
    args = {"target": "last_good", "run_id": "run1", "step": 10, "quarantine": "since", "domains": ["markov"]}
    t._rollback(args, reason="eval_regression", control_id="c1")
    assert t.checkpointer.loaded == [10]
    # only the regressed domain's shards since step 10, those of a domain new since (it may be what
    # harmed markov) and those of unknown domain (older checkpoints); noise keeps n1, n2
    assert set(t.quarantine.shards) == {"m1", "m2", "p1", "old"}
    assert rollback_dirs(run) == ["rollback-30-to-10-c1"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints", "abandoned", "rollback-30-to-10-c1"))) == [
        "step-20", "step-30"]
    assert t._step_dirs_after(10) == []
    # the same control again (redelivered): nothing happens
    t._rollback(args, reason="eval_regression", control_id="c1")
    t.step = 10  # the DCP load restored step 10
    # another control to the step the run is at right after that rollback: a no-op too
    t._rollback(args, reason="eval_regression", control_id="c2")
    assert t.checkpointer.loaded == [10] and rollback_dirs(run) == ["rollback-30-to-10-c1"]
    # the run trains again to step 30, regresses again and is rolled back again: a folder of its own
    t.step = 30
    save(run, 20, 30)
    t._rollback({**args, "domains": ["noise"]}, reason="eval_regression", control_id="c3")
    assert rollback_dirs(run) == ["rollback-30-to-10-c1", "rollback-30-to-10-c3"]
    assert {"n1", "n2"} <= set(t.quarantine.shards) and "n0" not in t.quarantine.shards
    with open(os.path.join(run, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    assert [e["control_id"] for e in events if e.get("event") == "rollback"] == ["c1", "c3"]
    # the journal survives a restart: c1 and c3 stay applied
    assert RollbackJournal(run, writer=False).is_applied("c3")
    t.dataloader.close()


def test_a_rollback_waits_for_an_async_save_in_flight_before_moving_checkpoints(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=10, vocab=64)
    save(run, 10, 20)
    t = trainer_at(run, 30, stream)
    os.makedirs(os.path.join(run, "checkpoints", "step-30"))  # DCP is still writing step 30
    t.checkpointer.in_flight = 30
    t._rollback({"target": "step", "run_id": "run1", "step": 10, "quarantine": "none"}, reason="r", control_id="a1")
    assert t.checkpointer.waited and t.checkpointer.in_flight is None
    moved = os.path.join(run, "checkpoints", "abandoned", "rollback-30-to-10-a1", "step-30")
    assert os.path.exists(os.path.join(moved, ".metadata"))  # moved only once complete, not written half here
    assert not os.path.exists(os.path.join(run, "checkpoints", "step-30"))
    t.dataloader.close()


def test_pauses_and_applied_controls_survive_a_trainer_restart(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=10, vocab=64)
    t = trainer_at(run, 30, stream)
    pause = Control(command="pause_domain", args={"domain": "noise", "run_id": "run1"})
    other = Control(command="pause_domain", args={"domain": "markov", "run_id": "run1"})
    t._apply_control([pause.to_dict(), other.to_dict()])
    t._apply_control([Control(command="resume_domain", args={"domain": "markov", "run_id": "run1"}).to_dict()])
    assert t.dataloader.paused == {"noise"}
    t.dataloader.close()
    # restart: a fresh trainer on the same run dir, before its control listener starts
    t = trainer_at(run, 30, stream)
    verifier = ControlVerifier(None, insecure=True)
    t._restore_control_state(verifier)
    assert t.dataloader.paused == {"noise"}
    with pytest.raises(ControlRejected, match="replayed"):  # a replay of a control applied before the restart
        verifier.verify(pause)
    t.dataloader.close()


KILL_HALFWAY = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_trainer_rollback as h
real_rename, moved = os.rename, []
def rename(src, dst):
    real_rename(src, dst)
    moved.append(dst)
    if len(moved) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after the first checkpoint moved aside
os.rename = rename
t = h.trainer_at({run!r}, 30, {stream!r})
t._rollback({{"target": "step", "run_id": "run1", "step": 10, "quarantine": "since"}}, reason="r", control_id="k1")
"""


def test_a_rollback_killed_halfway_is_completed_when_the_run_restarts(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=10, vocab=64)
    save(run, 10, 20, 30)
    script = KILL_HALFWAY.format(tests=os.path.join(ROOT, "tests"), run=run, stream=stream)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    journal = RollbackJournal(run, writer=False)
    assert journal.intent is not None and journal.intent["control_id"] == "k1"
    assert [os.path.isdir(os.path.join(run, "checkpoints", f"step-{s}")) for s in (20, 30)] == [False, True]
    # restart: the interrupted rollback is finished before a checkpoint is chosen
    t = trainer_at(run, 0, stream)
    t._complete_rollback()
    assert t._step_dirs_after(10) == []  # the latest checkpoint is step 10 again: the run resumes there
    assert sorted(os.listdir(os.path.join(run, "checkpoints", "abandoned", "rollback-30-to-10-k1"))) == [
        "step-20", "step-30"]
    assert t.rollbacks.intent is None and t.rollbacks.is_applied("k1")
    assert {"m1", "m2", "n1", "n2"} <= set(t.quarantine.shards) and "m0" not in t.quarantine.shards
    t._complete_rollback()  # nothing left to do
    t._rollback({"target": "step", "run_id": "run1", "step": 10}, reason="r", control_id="k1")
    assert t.checkpointer.loaded == []  # the redelivered control stays a no-op after the restart
    t.dataloader.close()


def test_a_rollback_is_recorded_applied_only_after_its_renames_are_synced(tmp_path, monkeypatch):
    """Renames are durable only once their directory is fsynced: the checkpoint folder, abandoned/ and
    the rollback's folder before "applied" is written, and the run dir after the journal's own rename."""
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=10, vocab=64)
    save(run, 10, 20, 30)
    t = trainer_at(run, 30, stream)
    journal = os.path.join(run, "rollbacks.json")
    synced: list[tuple[int, bool]] = []  # (inode of a directory fsynced, journal says applied at that moment)
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            with open(journal) if os.path.exists(journal) else open(os.devnull) as f:
                applied = "c1" in (json.loads(f.read() or "{}").get("applied") or {})
            synced.append((st.st_ino, applied))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    t._rollback({"target": "last_good", "run_id": "run1", "step": 10, "quarantine": "none"},
                reason="eval_regression", control_id="c1")
    ino = {p: os.stat(os.path.join(run, p)).st_ino for p in
           ("checkpoints", "checkpoints/abandoned", "checkpoints/abandoned/rollback-30-to-10-c1", ".")}
    before = {i for i, applied in synced if not applied}
    assert {ino["checkpoints"], ino["checkpoints/abandoned"], ino["checkpoints/abandoned/rollback-30-to-10-c1"]} <= before
    assert (ino["."], True) in synced  # the journal's rename that recorded it applied
