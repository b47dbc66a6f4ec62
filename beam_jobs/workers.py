"""Ingest workers: one live process per writer id, and ``--workers N`` launching N of them.

A writer id owns its staging files and names its shards, so two live processes sharing one
would delete each other's staging. :class:`WriterLock` refuses the second at start: an
exclusive ``flock`` on ``<root>/.writers/<writer_id>.lock`` (held for the process's life and
released by the kernel when it dies, ``kill -9`` included). For object-store roots the lock
file is local (``$TMPDIR/headwater-writers/<root hash>/``): it guards one host only.

:func:`launch_workers` runs ``headwater ingest ... --group G`` N times with writer ids
``<writer-id>-<i>`` and run directories ``<run-dir>/<writer-id>-<i>``; Kafka's group assignment
shares the partitions among them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

from streams.manifest import file_lock, flock_within

__all__ = ["WriterBusy", "WriterLock", "launch_workers", "settlement_lock", "worker_argv"]


class WriterBusy(RuntimeError):
    """Another live process holds this writer id on this stream root."""


class WriterLock:
    """Exclusive hold of ``writer_id`` on ``stream_root`` for this process (see the module doc)."""

    def __init__(self, stream_root: str, writer_id: str):
        self.stream_root, self.writer_id = stream_root, writer_id
        self.path = self.path_of(stream_root, writer_id)
        self._fd: int | None = None

    @staticmethod
    def path_of(stream_root: str, writer_id: str) -> str:
        if "://" in stream_root:
            digest = hashlib.sha256(stream_root.encode()).hexdigest()[:16]
            return os.path.join(tempfile.gettempdir(), "headwater-writers", digest, f"{writer_id}.lock")
        return os.path.join(stream_root, ".writers", f"{writer_id}.lock")

    def acquire(self, wait_s: float = 0.0) -> Self:
        """Take the lock or raise :class:`WriterBusy` naming the holder, after retrying for up to
        ``wait_s`` (another worker may hold it briefly while it drains this id's outbox)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not flock_within(fd, wait_s):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WriterBusy(f"writer id {self.writer_id!r} is already in use on {self.stream_root} by a live "
                             f"process ({holder}); give each worker its own --writer-id (or use --workers N)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def try_acquire(self) -> bool:
        """Take the lock if it is free (no live holder); True if taken."""
        try:
            self.acquire()
        except WriterBusy:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def settlement_lock(stream_root: str) -> Iterator[None]:
    """Exclusive across the processes sharing a local ``stream_root`` while one builds a micro-batch
    (its settlement point folds the published tail into the root's dedup snapshots, which two
    writers must not do at once). Object-store roots: no lock here; their indexes live in each
    machine's cache folder, which every sync locks itself (beam_jobs/dedup/snapshot.py)."""
    if "://" in stream_root:
        yield
        return
    path = os.path.join(stream_root, ".writers", ".settlement.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with file_lock(path):
        yield


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--x V`` and ``--x=V`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(f"{n}=") for n in names):
            out.append(arg)
    return out


def worker_argv(argv: list[str], *, writer_id: str, run_dir: str, index: int) -> list[str]:
    """The ``headwater ingest`` arguments of worker ``index`` launched by ``--workers``."""
    wid = f"{writer_id}-{index}"
    rest = _strip(argv, ("--workers", "--writer-id", "--run-dir"))
    return [*rest, "--writer-id", wid, "--run-dir", os.path.join(run_dir, wid)]


def launch_workers(argv: list[str], n: int, *, writer_id: str, run_dir: str) -> int:
    """Run ``n`` ingest worker processes in one consumer group; forward SIGINT/SIGTERM to them;
    return 0 if every worker exited 0, else the first non-zero exit status."""
    procs = [subprocess.Popen([sys.executable, "-m", "infra.cli", "ingest",
                               *worker_argv(argv, writer_id=writer_id, run_dir=run_dir, index=i)])
             for i in range(n)]

    def forward(signum, _frame):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return next((c for c in codes if c), 0)
