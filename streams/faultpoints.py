"""Named fault points: a test facility that lets a fault-injection test ``kill -9`` a process at
an exact step of a commit protocol instead of at a random moment.

Code calls :func:`reach` at the steps a crash could separate (after a shard's rename, after a
journal append, between a fold's sidecar and index writes, after each object-store put, after a
dead-letter send, inside a control poll, on a rebalance). It is a no-op unless the environment
variable ``HEADWATER_KILL_AT`` names that point, as ``name`` (the first hit) or ``name@N`` (the
N-th hit in this process); then the process writes one line to stderr and sends itself
``SIGKILL``, exactly what an OOM kill or a ``kill -9`` does: no ``finally``, no ``atexit``, no
flush of buffered files. Never set the variable outside tests; the names in use are listed in
:data:`POINTS` (tests/helpers/fault_trials.py drives them)."""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["ENV", "POINTS", "reach"]

ENV = "HEADWATER_KILL_AT"

#: Every fault point the code reaches, with where it is.
POINTS: dict[str, str] = {
    "local.after_rename": "local publish: shard renamed into the root, journal line not yet appended",
    "local.after_journal": "local publish: journal line appended (the commit), before fold/notify",
    "local.fold_between": "fold: new sidecar written, index.json not yet replaced",
    "remote.after_upload": "object-store publish: shard object uploaded, its log record not created yet",
    "remote.after_commit": "object-store publish: log record created (the commit), no fold or merge yet",
    "remote.fold_between": "object-store fold: the writer's base sidecar put, its base index not yet",
    "remote.before_merge": "object-store merge: about to put the merged root index.json",
    "sink.after_dlq": "sink: a group's dead letters sent, its offsets not yet settled",
    "control.poll": "ingest control poll: controls read and applied, state not yet saved",
    "group.revoke": "consumer-group rebalance: partitions being revoked from this worker",
    "group.assign": "consumer-group rebalance: partitions assigned to this worker",
}

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    return name, int(nth) if nth else 1


def reach(name: str) -> None:
    """Mark fault point ``name``; SIGKILL this process if ``HEADWATER_KILL_AT`` targets this hit."""
    target = _target()
    if target is None or target[0] != name:
        return
    with _lock:
        _hits[name] = hit = _hits.get(name, 0) + 1
        if hit != target[1]:
            return
        sys.stderr.write(f"faultpoint {name}@{hit}: SIGKILL pid {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
