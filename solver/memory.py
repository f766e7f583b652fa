"""Keep freed memory in the process: a solve's large arrays then reuse pages instead of faulting in fresh ones.

A solve allocates its arrays afresh for every truncation size (the SMDP build, the banded LU's storage,
the Hankel products): at B = 128 they are megabytes each, above glibc's default mmap threshold, so each
is mapped on allocation and unmapped on free, and every page is faulted in again on first touch. About
a third of a warm B = 128, CV 1 solve is those page faults (issue 18's notes: 73-81 ms against 51-54 ms
with freed memory kept, same code). Raising glibc's mmap threshold (large arrays come from the heap)
and its trim threshold (freed heap memory is kept, up to ``keep_bytes`` above what is in use) removes
them. The setting is process-wide, so it is applied where solving is the process's job: the solver
service (``smdp solver-serve --keep-freed-memory-mb``) and the solve benchmark on request. The cost is
resident memory: the process keeps up to ``keep_bytes`` of freed memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_FALLBACK = 32 * 2**20
"""glibc's largest mmap threshold before 2.35-era heaps (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)."""


def keep_freed_memory(keep_bytes: int) -> bool:
    """Ask glibc to serve arrays below ``keep_bytes`` from the heap and keep up to ``keep_bytes`` freed.

    Returns True when both settings took effect, False where the C library is not glibc (musl, macOS)
    or refused them; nothing else changes then. ``keep_bytes`` must be a positive int (at most 2 GiB - 1,
    glibc's setting is a C int).
    """
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int) or not 0 < keep_bytes < 2**31:
        raise ValueError(f"keep_bytes must be an int in (0, 2**31), got {keep_bytes!r}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, keep_bytes) != 1 and mallopt(M_MMAP_THRESHOLD, min(keep_bytes, MMAP_THRESHOLD_FALLBACK)) != 1:
        return False
    return mallopt(M_TRIM_THRESHOLD, keep_bytes) == 1
