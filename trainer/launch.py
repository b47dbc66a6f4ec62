"""``headwater train``: launch the torchtitan trainer on live streams with torchrun.

Re-running the same command resumes from the newest checkpoint in RUN/checkpoints
(torchtitan's CheckpointManager finds it); the run id is kept in RUN/run.json.
Unrecognised ``--section.key value`` flags are passed through to torchtitan's config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid

__all__ = ["build_command", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater train", description=__doc__)
    p.add_argument("--config", default="debug_cpu", help="debug_cpu | 1b | 10b")
    p.add_argument("--stream-root", action="append", required=True, help="MDS stream root (repeatable)")
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, alerts.jsonl go here")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint interval in steps")
    p.add_argument("--bootstrap", default="", help="Kafka bootstrap HOST:PORT (checkpoints, alerts, metrics, control)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--mixing", help="static | temperature | odm | learnability")
    p.add_argument("--vocab-size", type=int, help="override the unified vocabulary size (synthetic streams)")
    p.add_argument("--no-wandb", action="store_true", help="disable the wandb logger")
    return p


def _run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["run_id"]
    os.makedirs(run_dir, exist_ok=True)
    run_id = f"{os.path.basename(os.path.abspath(run_dir))}-{uuid.uuid4().hex[:6]}"
    with open(path, "w") as f:
        json.dump({"run_id": run_id}, f)
    return run_id


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The torchrun command line for parsed ``headwater train`` arguments."""
    run_dir = os.path.abspath(args.run_dir)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "trainer.entry", "--module", "trainer", "--config", args.config,
        "--dump_folder", run_dir,
        "--dataloader.stream_roots", *[os.path.abspath(r) for r in args.stream_root],
        "--headwater.run_id", _run_id(run_dir),
        "--headwater.config_name", args.config,
    ]
    if args.steps is not None:
        cmd += ["--training.steps", str(args.steps)]
    if args.checkpoint_every is not None:
        cmd += ["--checkpoint.interval", str(args.checkpoint_every)]
    if args.bootstrap:
        cmd += ["--headwater.bootstrap", args.bootstrap]
    if args.tp > 1:
        cmd += ["--parallelism.tensor_parallel_degree", str(args.tp)]
    if args.mixing:
        cmd += ["--dataloader.mixing.policy", args.mixing]
    if args.vocab_size:
        cmd += ["--headwater.vocab_size", str(args.vocab_size)]
    if args.no_wandb:
        cmd += ["--headwater.metrics.no-wandb"]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    cmd = build_command(args, extra)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.call(cmd, env=env)
