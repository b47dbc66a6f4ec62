"""Resume from the newest checkpoint that is intact, never from a corrupt one, never silently from scratch.

torchtitan's CheckpointManager resumes from the highest ``step-N`` holding a ``.metadata``;
a truncated or garbled file there either crashes every restart or, worse, loads garbage
weights. Here rank 0 checks each candidate, newest first, against its signed manifest
(streams/checkpoint_manifest.py: every file's size and sha256; a checkpoint without one, e.g.
killed before the manifest was written, is checked by loading it), every rank tries the load,
and all ranks agree on the outcome. A corrupt checkpoint is moved to ``checkpoints/corrupt/``
(so no later restart picks it again) and the next older one is tried; one Alert
``trainer.checkpoint_corrupt`` names every corrupt step and the step resumed from. If
checkpoints exist but none is intact, the trainer stops with that error instead of starting
from scratch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torchtitan.tools.logging import logger

__all__ = ["ALERT_RULE", "CORRUPT_DIR", "NoIntactCheckpoint", "candidate_steps", "load_latest_intact"]

ALERT_RULE = "trainer.checkpoint_corrupt"
CORRUPT_DIR = "corrupt"
_STEP = re.compile(r"^step-(\d+)$")


class NoIntactCheckpoint(RuntimeError):
    """Checkpoints exist, but none verified and loaded."""


def candidate_steps(folder: str) -> list[int]:
    """Steps of ``folder/step-N`` directories holding a DCP ``.metadata``, newest first."""
    if not os.path.isdir(folder):
        return []
    steps = [int(m.group(1)) for name in os.listdir(folder) if (m := _STEP.match(name))
             and os.path.isfile(os.path.join(folder, name, ".metadata"))]
    return sorted(steps, reverse=True)


def _verify(folder: str, step: int, run_id: str) -> str | None:
    """Why ``step-N`` is corrupt (None: no damage found). Rank 0 only; reads every file once."""
    from streams.checkpoint_manifest import CheckpointRejected, verify_checkpoint
    from streams.signing import Keyring

    step_dir = os.path.join(folder, f"step-{step}")
    info = os.path.join(step_dir, "headwater.json")
    if os.path.exists(info):
        try:
            with open(info) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"headwater.json unreadable: {type(e).__name__}: {e}"
    keyring = Keyring.from_env()
    if keyring is None:
        logger.warning(f"[resume] no keyring: step-{step}'s manifest not verified; relying on the load")
        return None
    try:
        verify_checkpoint(step_dir, roots=[folder], keyring=keyring, run_id=run_id or None, step=step)
    except CheckpointRejected as e:
        if e.reason in ("no_manifest", "unsigned"):  # not damage: killed before it was written, or no key
            logger.warning(f"[resume] step-{step} has no signed manifest ({e.reason}); relying on the load")
            return None
        return f"manifest check failed: {e}"
    return None


def _why(e: BaseException) -> str:
    """One line: the first rank's root error of a CheckpointException, else the error itself."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        rank, wrapped = min(failures.items())
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped  # (exception, traceback frames)
        return f"rank {rank}: {type(inner).__name__}: {str(inner)[:300]}"
    return f"{type(e).__name__}: {str(e)[:300]}"


def _agree(value: Any, *, src_only: bool) -> Any:
    """Rank 0's ``value`` (src_only) or the first non-None value over all ranks."""
    if not dist.is_initialized():
        return value
    if src_only:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return next((v for v in out if v is not None), None)


def _move_aside(folder: str, step: int, rank: int) -> str:
    dest = os.path.join(folder, CORRUPT_DIR, f"step-{step}.{int(time.time())}")
    if rank == 0:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(folder, f"step-{step}"), dest)
    if dist.is_initialized():
        dist.barrier()
    return dest


def load_latest_intact(checkpointer, *, run_id: str, events=None) -> int:
    """Load the newest intact checkpoint of ``checkpointer.folder``; returns its step, or -1 for a
    fresh start (no checkpoint at all: torchtitan's own ``load()`` then handles initial loads).

    ``events``: rank 0's :class:`trainer.events_out.EventSink` (None on other ranks)."""
    if not checkpointer.enable:
        return -1
    folder = checkpointer.folder
    rank = dist.get_rank() if dist.is_initialized() else 0
    steps = _agree(candidate_steps(folder) if rank == 0 else None, src_only=True)  # rank 0 chooses for all
    if not steps:
        checkpointer.load(step=-1)
        return -1
    corrupt: list[dict[str, Any]] = []
    for step in steps:
        problem = _agree(_verify(folder, step, run_id) if rank == 0 else None, src_only=True)
        if problem is None:
            try:
                checkpointer.load(step=step)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - any load failure: unusable
                # (DCP raises CheckpointException, a BaseException, on every rank when one rank failed)
                problem = f"load failed: {_why(e)}"
            problem = _agree(problem, src_only=False)
        if problem is None:
            if corrupt:
                _report(events, corrupt, resumed=step, run_id=run_id)
            return step
        if rank == 0:
            logger.error(f"[resume] checkpoint step-{step} in {folder} is corrupt: {problem}")
        corrupt.append({"step": step, "problem": problem, "moved_to": _move_aside(folder, step, rank)})
    _report(events, corrupt, resumed=None, run_id=run_id)
    problems = "; ".join(f"step-{c['step']}: {c['problem']}" for c in corrupt)
    raise NoIntactCheckpoint(
        f"none of the {len(steps)} checkpoints in {folder} is intact (moved to {CORRUPT_DIR}/): {problems}. "
        "Refusing to start from scratch: restore a checkpoint, or start a new run directory")


def _report(events, corrupt: list[dict[str, Any]], *, resumed: int | None, run_id: str) -> None:
    if events is None:  # not rank 0
        return
    names = ", ".join(f"step-{c['step']}" for c in corrupt)
    outcome = f"resumed from step-{resumed}" if resumed is not None else "no intact checkpoint left"
    logger.warning(f"[resume] corrupt checkpoint(s) {names} moved aside; {outcome}")
    events.alert(ALERT_RULE, f"corrupt checkpoint {names} ({corrupt[0]['problem'][:200]}); {outcome}",
                 severity="critical", evidence={"corrupt": corrupt, "resumed_step": resumed, "run_id": run_id})
