"""Keep freed CPU memory for reuse: fewer page faults when the same tensors come and go.

PyTorch's CPU tensors come from ``malloc``. glibc serves a large request (above a threshold
that starts at 128 KiB) with fresh pages from the system and returns the top of its heap on
``free`` once more than a trim threshold sits unused, so a process that allocates and frees
the same activations every step or every request pays a page fault per 4 KiB page each time.
``retain_freed_memory`` raises both thresholds: requests up to ``mmap_threshold`` (32 MiB, the
most glibc allows on 64-bit) come from the heap and freed heap memory stays with the process,
while larger ones still get pages of their own, returned when freed (so one huge transient
buffer does not stay resident). The ``hashrec`` command sets it for its process
(``HASHREC_RETAIN_MEMORY=0`` opts out); a library user calls it, or not, for theirs.

Measured (``benchmarks/bench_inference.py [--retain-memory]``, one request of 1,000 candidates,
S = 128, D = 128, 2 threads, two runs each): fp32 p50 13.1 / 13.5 ms with it against 17.4 /
19.0 without (p99 16.0 / 17.3 against 21.6 / 24.0); a loop of 64 x 1 MiB tensors made and
freed 20 times: 1,792 minor page faults against 32,735.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def retain_freed_memory(mmap_threshold: int = _MAX_MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to ``mmap_threshold`` bytes and its trim threshold to the
    most it takes, for this process. Returns whether it applied: False (nothing changed) off
    Linux or on a C library without glibc's ``mallopt`` (musl).

    >>> retain_freed_memory(0)
    Traceback (most recent call last):
    ...
    ValueError: mmap_threshold must be in 1..33554432 bytes, got 0
    """
    if not 0 < mmap_threshold <= _MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold must be in 1..{_MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}"
        )
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    )
