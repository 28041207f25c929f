"""Process-level tuning for the hardware kiln runs on."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the kernel.

    Training allocates the same activation sizes every step; by default glibc serves each large
    block with a fresh mmap, so every step page-faults and zero-fills its activations again
    (~5% of a CPU step, seen as system time). Raising the mmap and trim thresholds lets the
    blocks be reused. A no-op outside glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
