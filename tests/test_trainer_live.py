"""torchrun 2-process CPU/gloo training on a stream that another process appends to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streams.checkpoint_manifest import verify_checkpoint
from streams.signing import Keyring
from trainer.runs import read_metrics, train_argv
from trainer.runs import step_losses as losses
from trainer.synthetic import write_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = {"noise": "noise", "markov": "markov", "counting": "counting"}



def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def train_cmd(stream: str, run_dir: str, *extra: str) -> list[str]:
    return train_argv([stream], run_dir, "--nproc", "2", "--vocab-size", "512", "--no-wandb", *extra)


APPEND = (
    "import sys; from trainer.synthetic import write_stream; "
    "write_stream(sys.argv[1], domains={'noise': 'noise', 'markov': 'markov', 'counting': 'counting'}, "
    "shards=3, per_shard=40, vocab=512, seed=5, start_shard=1, interval_s=1.0)"
)


def run_on_growing_stream(tmp_path, *extra: str) -> tuple[str, dict]:
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    initial = write_stream(stream, domains=DOMAINS, shards=1, per_shard=40, vocab=512, seed=5)
    appender = subprocess.Popen([sys.executable, "-c", APPEND, stream], env=env(), cwd=ROOT)
    try:
        rc = subprocess.run(train_cmd(stream, run, "--steps", "16", "--checkpoint-every", "8", *extra),
                            check=False, env=env(), cwd=ROOT, timeout=400).returncode
    finally:
        appender.wait(timeout=60)
    assert rc == 0
    with open(os.path.join(run, "checkpoints", "step-16", "headwater.json")) as f:
        info = json.load(f)
    trained = {s for rec in read_metrics(run) for s in rec.get("shards", ())}
    assert trained - set(initial), "trainer never trained the appended shards"
    for step in (8, 16):  # each checkpoint is complete and signed: an evaluator accepts it
        ok = verify_checkpoint(os.path.join(run, "checkpoints", f"step-{step}"), roots=[run],
                               keyring=Keyring.from_env(), step=step, run_id=info["run_id"])
        assert {".metadata", "headwater.json"} <= set(ok.manifest["files"])
    return run, info


def test_fsdp2_two_ranks_trains_on_appended_stream(tmp_path):
    run, info = run_on_growing_stream(tmp_path, "--mixing", "learnability")
    got = losses(run)
    assert sorted(got) == list(range(1, 17))
    tail = sum(got[s] for s in range(13, 17)) / 4  # one step's loss depends on which domains it drew
    assert tail < got[1] - 0.3, f"loss did not fall: {got[1]:.3f} -> {tail:.3f} (mean of steps 13-16)"
    last = read_metrics(run)[-1]
    for key in ("domain_loss", "weights", "tokens", "tokens_per_s", "data_stall", "freshness_s", "grad_norm"):
        assert key in last, key
    assert set(last["weights"]) == set(DOMAINS)
    assert abs(sum(last["weights"].values()) - 1) < 1e-9
    assert info["config"] == "debug_cpu" and info["vocab_size"] == 512


@pytest.mark.slow
def test_tp2_trains_on_appended_stream(tmp_path):
    run, _ = run_on_growing_stream(tmp_path, "--tp", "2")
    got = losses(run)
    assert sorted(got) == list(range(1, 17))
    assert got[16] < got[1] - 0.2  # dp=1 under TP=2: half the tokens per step
