"""Keep freed memory in the process for the next batch (glibc's malloc), instead of handing it
back to the OS.

By default glibc gives memory back when a large block is freed (blocks from 128 KiB on are
mapped and unmapped one by one, and a heap's free top past its trim threshold is released),
adjusting those limits as it goes. The loop's steps allocate and free tensors of megabytes
every batch, with sizes that change with the load: after a quiet spell the next burst's
batches found their pages handed back and faulted them in again, thousands per step. On a 2-core
VM that was 3,000-3,700 page faults and 40 ms of kernel time in a 4,096-reading step that takes
13 ms otherwise, in the bursts that set the latency's tail.

`retain_freed_memory(keep_mb)` sets both limits once for the process: blocks up to
MMAP_THRESHOLD_MAX come from the heap, and a heap keeps up to ``keep_mb`` of free memory at its
top. The process's resident memory then stays near its peak working set, give or take
``keep_mb``. Elsewhere than glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); bigger blocks stay mapped
MMAP_THRESHOLD_MAX = 32 << 20

_applied: int | None = None


def retain_freed_memory(keep_mb: int) -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring); ``keep_mb``
    0 leaves its defaults. True when the limits were set, in this call or an earlier one with
    the same value (they are process-wide, and glibc's own adjustment, once off, stays off)."""
    global _applied
    if keep_mb <= 0:
        return False
    if _applied == keep_mb:
        return True
    libc = _glibc()
    if libc is None:
        log.debug("not glibc's malloc: freed memory is left to the C library's own policy")
        return False
    # Both, or neither helps: either one alone turns glibc's adjustment off, and the other limit
    # then stays at its small default (every large block mapped and unmapped, or every free top
    # trimmed), more page faults than before.
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, keep_mb << 20)):
        log.warning("malloc did not take the limits to keep freed memory; page faults may slow large steps")
        return False
    _applied = keep_mb
    log.debug("malloc keeps freed blocks up to %d MiB and up to %d MiB free at a heap's top",
              MMAP_THRESHOLD_MAX >> 20, keep_mb)
    return True


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc
