"""Process memory as the benchmarks measure it: the kernel's counters, not Python's or torch's.

Shared by the benchmark scripts (each runs as ``python benchmarks/NAME.py``, so this folder is on sys.path).
"""

from __future__ import annotations

import contextlib

import psutil


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a child may exit between listing and reading
            total += proc.memory_info().rss
    return total
