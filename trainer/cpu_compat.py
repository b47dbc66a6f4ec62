"""Make torchtitan 0.3.0 run on CPU hosts (gloo), as listed in shared/ENVIRONMENT.md.

torchtitan picks its device type at import time and falls back to "cuda", and its
memory monitor calls ``torch.cuda``-style functions that ``torch.cpu`` lacks. On a
host without an accelerator, :func:`install` (called before torchtitan is imported)
selects "cpu" and gives ``torch.cpu`` the handful of functions torchtitan calls.
On a CUDA host it changes nothing.
"""

from __future__ import annotations

import types

import torch

__all__ = ["install", "on_cpu"]


def on_cpu() -> bool:
    """True when no CUDA device is usable, so training runs on CPU with gloo."""
    return not torch.cuda.is_available()


def _cpu_properties(_device=None) -> types.SimpleNamespace:
    try:
        total = _mem_total_bytes()
    except OSError:
        total = 1 << 34
    return types.SimpleNamespace(name="cpu", total_memory=total, major=0, minor=0)


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal not in /proc/meminfo")


def install() -> None:
    """Idempotently patch torch so torchtitan selects and can monitor the CPU device."""
    if not on_cpu():
        return
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    shims = {
        "get_device_name": lambda _device=None: "cpu",
        "get_device_properties": _cpu_properties,
        "reset_peak_memory_stats": lambda _device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": lambda _device=None: {},
    }
    for name, fn in shims.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)
    # torch's returns "cpu"; torchtitan's set_pg_timeouts passes it to barrier(device_ids=[...]), which needs an int
    torch.cpu.current_device = lambda: 0
