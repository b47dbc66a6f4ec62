"""Resume from the newest checkpoint that is intact, never from a corrupt one, never silently from scratch.

torchtitan's CheckpointManager resumes from the highest ``step-N`` holding a ``.metadata``;
a truncated or garbled file there either crashes every restart or, worse, loads garbage
weights. Here rank 0 checks each candidate, newest first, against its signed manifest
(streams/checkpoint_manifest.py: every file's size and sha256; a checkpoint without one, e.g.
killed before the manifest was written, is checked by loading it), every rank tries the load,
and all ranks agree on the outcome. File errors are retried (``LOAD_ATTEMPTS``) before they
count as damage. A checkpoint that fails is tried no further and the next older one is tried;
once one loads, the failed ones are moved to ``checkpoints/corrupt/`` (so no later restart picks
them again) and one Alert ``trainer.checkpoint_corrupt`` names every corrupt step and the step
resumed from.

A configuration mistake (another ``--vocab-size``, model config or parallelism) makes *every*
checkpoint fail to load; moving them all aside would make the next restart, with the right
configuration, train from scratch. So nothing is moved unless an older checkpoint loads; a
checkpoint whose signed manifest verifies is never moved (its load failure is the environment's:
the trainer stops at once, naming the error); if checkpoints exist but none loads, the trainer
stops with every error and nothing moved. And with no checkpoint left but something in
``corrupt/``, it refuses to start from scratch unless told to (``headwater train
--allow-fresh-start``, which sets ``HEADWATER_ALLOW_FRESH_START=1``).
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

from trainer.launch import FRESH_START_ENV

__all__ = ["ALERT_RULE", "CORRUPT_DIR", "NoIntactCheckpoint", "candidate_steps", "load_latest_intact"]

ALERT_RULE = "trainer.checkpoint_corrupt"
CORRUPT_DIR = "corrupt"
LOAD_ATTEMPTS = 3
RETRY_S = 1.0
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


def _verify(folder: str, step: int, run_id: str) -> tuple[str | None, bool]:
    """(why ``step-N`` is corrupt, None if no damage found; whether its signed manifest verified).
    Rank 0 only; reads every file once per attempt; file errors are retried."""
    error: OSError | None = None
    for attempt in range(LOAD_ATTEMPTS):
        if attempt:
            logger.warning(f"[resume] step-{step}: {type(error).__name__}: {error}; retrying in {RETRY_S:.0f}s")
            time.sleep(RETRY_S)
        try:
            return _verify_once(folder, step, run_id)
        except OSError as e:
            error = e
    return f"unreadable: {type(error).__name__}: {error}", False


def _verify_once(folder: str, step: int, run_id: str) -> tuple[str | None, bool]:
    from streams.checkpoint_manifest import CheckpointRejected, verify_checkpoint
    from streams.signing import Keyring

    step_dir = os.path.join(folder, f"step-{step}")
    info = os.path.join(step_dir, "headwater.json")
    if os.path.exists(info):
        try:
            with open(info) as f:
                json.load(f)
        except ValueError as e:
            return f"headwater.json unreadable: {type(e).__name__}: {e}", False
    keyring = Keyring.from_env()
    if keyring is None:
        logger.warning(f"[resume] no keyring: step-{step}'s manifest not verified; relying on the load")
        return None, False
    try:
        verify_checkpoint(step_dir, roots=[folder], keyring=keyring, run_id=run_id or None, step=step)
    except CheckpointRejected as e:
        if e.reason in ("no_manifest", "unsigned"):  # not damage: killed before it was written, or no key
            logger.warning(f"[resume] step-{step} has no signed manifest ({e.reason}); relying on the load")
            return None, False
        return f"manifest check failed: {e}", False
    return None, True


def _file_error(e: BaseException) -> bool:
    """True if ``e`` (or a rank's root error inside a CheckpointException) is an ``OSError``."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        return any(isinstance(w[0] if isinstance(w, tuple) else w, OSError) for w in failures.values())
    return isinstance(e, OSError)


def _load(checkpointer, step: int) -> str | None:
    """Load ``step-N`` on every rank; the agreed failure (None: loaded). File errors are retried."""
    attempt = 1
    while True:
        failure: tuple[str, bool] | None = None
        try:
            checkpointer.load(step=step)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any load failure: unusable
            # (DCP raises CheckpointException, a BaseException, on every rank when one rank failed)
            failure = (f"load failed: {_why(e)}", _file_error(e))
        failure = _agree(failure, src_only=False)
        if failure is None:
            return None
        if not failure[1] or attempt >= LOAD_ATTEMPTS:
            return failure[0]
        logger.warning(f"[resume] step-{step}: {failure[0]}; retrying in {RETRY_S:.0f}s")
        time.sleep(RETRY_S)
        attempt += 1


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


def _set_aside(folder: str) -> list[str]:
    aside = os.path.join(folder, CORRUPT_DIR)
    return sorted(os.listdir(aside)) if os.path.isdir(aside) else []


def load_latest_intact(checkpointer, *, run_id: str, events=None, allow_fresh_start: bool | None = None) -> int:
    """Load the newest intact checkpoint of ``checkpointer.folder``; returns its step, or -1 for a
    fresh start (no checkpoint at all: torchtitan's own ``load()`` then handles initial loads).

    ``events``: rank 0's :class:`trainer.events_out.EventSink` (None on other ranks).
    ``allow_fresh_start`` (default: ``HEADWATER_ALLOW_FRESH_START=1``): start from scratch even
    though checkpoints were set aside in ``corrupt/``. Raises :class:`NoIntactCheckpoint`."""
    if not checkpointer.enable:
        return -1
    folder = checkpointer.folder
    rank = dist.get_rank() if dist.is_initialized() else 0
    steps = _agree(candidate_steps(folder) if rank == 0 else None, src_only=True)  # rank 0 chooses for all
    if not steps:
        aside = _agree(_set_aside(folder) if rank == 0 else None, src_only=True)
        if allow_fresh_start is None:
            allow_fresh_start = os.environ.get(FRESH_START_ENV) == "1"
        if aside and not allow_fresh_start:
            raise NoIntactCheckpoint(
                f"no checkpoint to resume from in {folder}, but {CORRUPT_DIR}/ holds {aside[:5]}: refusing to "
                f"train from scratch. If they were set aside by mistake, move one back to {folder}/step-N; to "
                f"start from scratch on purpose, run `headwater train --allow-fresh-start` ({FRESH_START_ENV}=1)")
        checkpointer.load(step=-1)
        return -1
    failed: list[dict[str, Any]] = []
    for step in steps:
        problem, verified = _agree(_verify(folder, step, run_id) if rank == 0 else None, src_only=True)
        if problem is None:
            problem = _load(checkpointer, step)
            if problem is not None and verified:
                raise NoIntactCheckpoint(
                    f"checkpoint step-{step} in {folder} matches its signed manifest but does not load: {problem}. "
                    "It is intact: the configuration or environment differs from the run that wrote it (model "
                    "config, --vocab-size, parallelism, library versions). Nothing was moved; fix that and restart")
        if problem is None:
            for f in failed:  # an older one loads here: the newer ones, not the setup, are broken
                f["moved_to"] = _move_aside(folder, f["step"], rank)
            if failed:
                _report(events, failed, resumed=step, run_id=run_id)
            return step
        if rank == 0:
            logger.error(f"[resume] checkpoint step-{step} in {folder} is unusable: {problem}")
        failed.append({"step": step, "problem": problem})
    _report(events, failed, resumed=None, run_id=run_id)
    problems = "; ".join(f"step-{c['step']}: {c['problem']}" for c in failed)
    raise NoIntactCheckpoint(
        f"none of the {len(steps)} checkpoints in {folder} loads: {problems}. Nothing was moved (if they all fail "
        "alike, the configuration is the likelier cause). Refusing to start from scratch: fix the configuration, "
        "restore a checkpoint, or start a new run directory")


def _report(events, corrupt: list[dict[str, Any]], *, resumed: int | None, run_id: str) -> None:
    if events is None:  # not rank 0
        return
    names = ", ".join(f"step-{c['step']}" for c in corrupt)
    if resumed is not None:
        outcome = f"moved aside; resumed from step-{resumed}"
    else:
        outcome = "nothing moved; no checkpoint loads, the trainer stops"
    logger.warning(f"[resume] corrupt checkpoint(s) {names}: {outcome}")
    events.alert(ALERT_RULE, f"corrupt checkpoint {names} ({corrupt[0]['problem'][:200]}); {outcome}",
                 severity="critical", evidence={"corrupt": corrupt, "resumed_step": resumed, "run_id": run_id})
