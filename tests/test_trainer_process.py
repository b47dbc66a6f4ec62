"""The trainer's process side: command-line stream roots, one writer per run directory, ranks
that die with their launcher, async checkpoints announced only once complete, and gradient
accumulation inside torchtitan's own loop (real torchrun, CPU/gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.launch import _parser, build_command
from trainer.run_guard import EXIT_RUN_DIR_BUSY, RunDirBusy, RunLock
from trainer.runs import read_metrics, train_argv
from trainer.synthetic import write_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def test_repeated_stream_roots_reach_torchtitan_as_one_list(tmp_path):
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    args, extra = _parser().parse_known_args(["--stream-root", a, "--stream-root", b, "--run-dir", str(tmp_path / "r")])
    cmd = build_command(args, extra)
    argv = cmd[cmd.index("trainer.entry") + 1:]
    probe = textwrap.dedent("""
        import json, sys
        from trainer import cpu_compat
        cpu_compat.install()
        from torchtitan.config import ConfigManager
        print(json.dumps(ConfigManager().parse_args(sys.argv[1:]).dataloader.stream_roots))
    """)
    out = subprocess.run([sys.executable, "-c", probe, *argv], check=False, env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [a, b]


def test_a_stream_root_with_a_comma_is_refused_by_the_launcher(tmp_path, capsys):
    from trainer.launch import main

    with pytest.raises(SystemExit) as e:
        main(["--stream-root", str(tmp_path / "a,b"), "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "comma" in capsys.readouterr().err


def test_a_second_lock_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    first = RunLock(str(tmp_path)).acquire(wait_s=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            RunLock(str(tmp_path)).acquire(wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5  # waited for a holder that might be exiting
    finally:
        first.release()
    RunLock(str(tmp_path)).acquire(wait_s=0).release()  # free again once released


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    code = ("import sys, time; from trainer.run_guard import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid} "):
        RunLock(str(tmp_path)).acquire(wait_s=0)
    holder.kill()
    holder.wait()
    RunLock(str(tmp_path)).acquire(wait_s=2).release()


def test_a_rank_dies_with_its_parent(tmp_path):
    """``die_with_parent`` in a child; SIGKILL to the parent; the child is gone within seconds."""
    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from trainer.run_guard import die_with_parent; die_with_parent(); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    code = ("import subprocess, sys, time; "
            f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _train(streams: list[str], run: str, *extra: str) -> None:
    cmd = train_argv(streams, run, "--nproc", "1", "--vocab-size", "512", "--no-wandb", "--mixing", "static", *extra)
    out = subprocess.run(cmd, check=False, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_gradient_accumulation_and_async_checkpoints_in_torchtitans_loop(tmp_path):
    """Two roots on the command line; 2 micro-batches of 4 rows train like one batch of 8; async
    DCP saves get headwater.json, manifest and CheckpointSaved only after their .metadata."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_stream(a, domains={"markov": "markov", "counting": "counting"}, shards=2, per_shard=40, vocab=512, seed=3)
    write_stream(b, domains={"noise": "noise"}, shards=2, per_shard=40, vocab=512, seed=4)
    steps = ["--steps", "4", "--checkpoint-every", "2"]
    accum, whole = str(tmp_path / "accum"), str(tmp_path / "whole")
    _train([a, b], accum, *steps, "--training.local_batch_size", "4", "--training.global_batch_size", "8",
           "--checkpoint.async_mode", "async")
    _train([a, b], whole, *steps, "--training.local_batch_size", "8")

    got, ref = ([r for r in read_metrics(run) if "loss" in r] for run in (accum, whole))
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    assert set(got[0]["domain_tokens"]) == {"markov", "counting", "noise"}  # both roots trained
    for g, r in zip(got, ref, strict=True):
        assert g["tokens"] == r["tokens"] == 8 * 128
        assert g["domain_tokens"] == r["domain_tokens"]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)

    with open(os.path.join(accum, "checkpoints.jsonl")) as f:
        events = [json.loads(line) for line in f]
    assert [e["step"] for e in events] == [2, 4]
    for e in events:
        step_dir = e["path"]
        metadata = os.stat(os.path.join(step_dir, ".metadata")).st_mtime_ns
        assert os.stat(os.path.join(step_dir, "headwater.json")).st_mtime_ns >= metadata
        assert os.stat(os.path.join(step_dir, "manifest.json")).st_mtime_ns >= metadata
        with open(os.path.join(step_dir, "manifest.json")) as f:
            assert ".metadata" in json.load(f)["files"]


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_run_dir_is_refused(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=2, per_shard=40, vocab=512, seed=3)
    first = subprocess.Popen(train_argv([stream], run, "--nproc", "1", "--vocab-size", "512", "--no-wandb",
                                        "--steps", "400"), env=env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(run, "metrics.jsonl")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        holder = RunLock(run).holder()
        second = subprocess.run(train_argv([stream], run, "--nproc", "1", "--vocab-size", "512", "--no-wandb",
                                           "--lock-wait-s", "1"), check=False, env=env(), cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_RUN_DIR_BUSY
        assert f"in use by another trainer (pid {holder['pid']} " in second.stderr
        assert first.poll() is None  # the first one is untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_step_vector_sums_domains_gates_on_the_device_and_reads_one_step_late():
    import torch

    from trainer.data.loader import BatchMeta
    from trainer.step_stats import StepStats

    stats = StepStats(torch.device("cpu"))
    stats.begin(["a", "b", "c"])
    labels = torch.tensor([[1, 2, -100, 4]])
    losses = torch.tensor([[1.0, 2.0, 50.0, 4.0]])
    meta = BatchMeta(domains=["b", "a"], domain_idx=torch.tensor([[0, 0, 1, 1]]), doc_ids=["x", "y"],
                     doc_domains=["b", "a"], doc_sources=["s", "s"], shards=[], produced_at=[0, 0], wait_s=0.0,
                     starved=[])
    assert stats.add_microbatch(meta, labels, losses)
    assert stats.add_microbatch(meta, labels, losses)  # a second micro-batch of the same step
    w = torch.nn.Linear(3, 1, bias=False)
    w.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    pending = stats.finish(step=7, params=list(w.parameters()), available={"a": 5, "zzz": 1},
                           control_pending=True, unknown_domains=True, facts={"k": 1})
    ok = pending.gate(limit=2.0)  # loss (2*(1+2) + 2*4) / 6 = 2.33 > 2.0: refused
    assert isinstance(ok, torch.Tensor) and not bool(ok)
    r = pending.read()
    assert r.loss_sum == {"a": 8.0, "b": 6.0, "c": 0.0} and r.tokens == {"a": 2, "b": 4, "c": 0}
    assert r.docs == {"a": 2, "b": 2, "c": 0} and r.available == {"a": 5, "b": 0, "c": 0}
    assert r.grad_norm == pytest.approx(5.0) and not r.ok and r.control_pending and r.new_domains
    assert r.domains_agree and r.loss == pytest.approx(14 / 6)
    assert bool(pending.gate(limit=3.0)) and pending.read().ok
    w.weight.grad = torch.tensor([[float("nan"), 0.0, 0.0]])
    stats.begin(["a", "b", "c"])
    stats.add_microbatch(meta, labels, losses)
    nan_grad = stats.finish(step=8, params=list(w.parameters()), available={}, control_pending=False,
                            unknown_domains=False, facts={})
    assert not bool(nan_grad.gate(limit=float("inf")))  # a non-finite gradient is refused whatever the loss


def test_an_async_save_is_finished_only_after_its_metadata_even_before_its_directory_exists(tmp_path):
    from streams.events import CheckpointSaved
    from trainer.checkpoint_out import CheckpointFinisher
    from trainer.events_out import EventSink

    run = str(tmp_path)
    step_dir = os.path.join(run, "checkpoints", "step-2")
    finisher = CheckpointFinisher(EventSink(run), key=None)
    finisher.add(step_dir, {"step": 2}, CheckpointSaved(run_id="r1", path=step_dir, step=2, tokens=1,
                                                         vocab_version="v", tokenizer_version="v", data_cursor={},
                                                         wall_time=0.0))
    assert finisher.poll() == [] and finisher.pending  # DCP has not created the directory yet: still pending
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "__0_0.distcp"), "w") as f:
        f.write("data")
    assert finisher.poll() == [] and not os.path.exists(os.path.join(step_dir, "headwater.json"))
    with open(os.path.join(step_dir, ".metadata"), "w") as f:
        f.write("meta")
    assert finisher.poll() == [2]
    assert os.path.exists(os.path.join(step_dir, "headwater.json"))
    with open(os.path.join(run, "checkpoints.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2]
