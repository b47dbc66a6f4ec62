"""``headwater train``: launch the torchtitan trainer on live streams with torchrun.

Re-running the same command resumes from the newest intact checkpoint in RUN/checkpoints
(rank 0 chooses it: trainer/resume.py); the run id is kept in RUN/run.json.
Unrecognised ``--section.key value`` flags are passed through to torchtitan's config.

One trainer per run directory: the launcher checks RUN/.lock before starting torchrun (and
rank 0 holds it for the run, trainer/run_guard.py); if another trainer holds it, this exits
with code 3 and names the holder. A holder that is still exiting (``kill -9`` of the previous
launcher: its ranks die with torchrun's agent) is waited for up to ``--lock-wait-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid

from streams import storage
from trainer.run_guard import EXIT_RUN_DIR_BUSY, RunDirBusy, RunLock

__all__ = ["FRESH_START_ENV", "build_command", "main"]

FRESH_START_ENV = "HEADWATER_ALLOW_FRESH_START"
"""Set to ``1`` by ``--allow-fresh-start``: trainer/resume.py may then start from scratch although
checkpoints were set aside in ``checkpoints/corrupt/``."""


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
    p.add_argument("--allow-fresh-start", action="store_true",
                   help="start from scratch even though checkpoints were set aside in checkpoints/corrupt/")
    p.add_argument("--lock-wait-s", type=float, default=15.0,
                   help="wait this long for a previous trainer on --run-dir to exit before refusing")
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
    roots = [storage.normalize_root(r) for r in args.stream_root]  # keeps s3://… URLs as URLs
    if any("," in r for r in roots):  # torchtitan parses list[str] options as one comma-separated value
        raise ValueError(f"stream root paths must not contain a comma: {[r for r in roots if ',' in r]}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "trainer.entry", "--module", "trainer", "--config", args.config,
        "--dump_folder", run_dir,
        "--dataloader.stream_roots", ",".join(roots),
        "--headwater.run_id", _run_id(run_dir),
        "--headwater.config_name", args.config,
        "--headwater.lock_wait_s", str(args.lock_wait_s),
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
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        cmd = build_command(args, extra)
    except ValueError as e:
        parser.error(str(e))
    try:  # refuse early, before torchrun starts, if another trainer holds the run directory
        RunLock(os.path.abspath(args.run_dir)).acquire(wait_s=args.lock_wait_s).release()
    except RunDirBusy as e:
        print(f"headwater train: {e}", file=sys.stderr)
        return EXIT_RUN_DIR_BUSY
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.allow_fresh_start:
        env[FRESH_START_ENV] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.call(cmd, env=env)
