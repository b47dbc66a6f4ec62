"""Process hygiene of a training rank: die with the launcher, and one writer per run directory.

torchrun starts each rank in its own session, so ``kill -9`` of ``headwater train``'s process
group does not reach the ranks: orphaned, they would keep training and writing checkpoints
while the re-run command resumes in the same directory. Each rank therefore asks the kernel
for ``SIGKILL`` when its parent (torchrun's agent) dies (:func:`die_with_parent`), and global
rank 0 holds an exclusive ``flock`` on ``RUN/.lock`` for the whole run (:class:`RunLock`): a
second trainer on the same run directory waits a few seconds for a holder that is exiting,
then refuses, naming the holder's pid, host and command.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time

from streams.manifest import flock_within

__all__ = ["EXIT_RUN_DIR_BUSY", "RunDirBusy", "RunLock", "die_with_parent"]

EXIT_RUN_DIR_BUSY = 3
"""exit status of ``headwater train`` (and of rank 0) refused a busy run directory"""

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux); exit now if
    the parent died before the request landed (this process was re-parented meanwhile)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)


class RunDirBusy(RuntimeError):
    """Another trainer holds the run directory."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, held until :meth:`release` or process exit."""

    NAME = ".lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 15.0) -> RunLock:
        """Take the lock, waiting up to ``wait_s`` for a holder that is exiting; else :class:`RunDirBusy`."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not flock_within(fd, wait_s):
            holder = self.holder()
            os.close(fd)
            raise RunDirBusy(self._busy_message(holder, wait_s))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "argv": sys.argv[:12]}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> dict:
        """What the holder wrote into the lock file (empty if unreadable)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _busy_message(self, holder: dict, wait_s: float) -> str:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
               + (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
                  if "since" in holder else ""))
        return (f"run directory {os.path.dirname(self.path)} is in use by another trainer ({who}; "
                f"lock {self.path}, still held after {wait_s:.0f}s). Stop that trainer first, "
                f"or use another --run-dir")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
