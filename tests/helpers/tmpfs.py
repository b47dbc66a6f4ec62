"""A small tmpfs for disk-full tests: mounted as root (or under ``unshare -Urm``, where the
test process is root of its own user+mount namespace); a clear skip otherwise."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest

PAGE = 4096


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike, size: str) -> Iterator[str]:
    """Mount a tmpfs of ``size`` (e.g. ``"512k"``) at ``path`` for the block; skip if not permitted."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: run as root or under `unshare -Urm` "
                    "(a user+mount namespace), e.g. `unshare -Urm .venv/bin/pytest tests/test_faults.py`")
    done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def resize(path: str, size: str) -> None:
    """Grow (or shrink) a mounted tmpfs in place."""
    done = _mount("-o", f"remount,size={size}", path)
    assert done.returncode == 0, done.stderr


def fill(path: str, *, leave: int = 0, name: str = "ballast") -> str:
    """Write a ballast file until ``leave`` bytes stay free (0: until ENOSPC); returns its path."""
    ballast = os.path.join(path, name)
    with open(ballast, "ab", buffering=0) as f:
        while True:
            st = os.statvfs(path)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                f.write(b"\0" * min(room, 1 << 20))
            except OSError:
                break
    return ballast
