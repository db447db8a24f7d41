"""Keep freed memory in the process for the next batch (glibc's malloc), instead of handing it
back to the OS.

By default glibc maps blocks from 128 KiB on one by one and unmaps them when freed, and gives a
heap's free top back to the OS once it passes its trim threshold, raising both limits as it sees
larger blocks freed. The loop's steps allocate and free tensors of megabytes every batch, with
sizes that change with the load: when a burst came after a quieter spell, its steps found their
pages handed back and faulted them in again, hundreds to thousands per step (bench/latency.py's
minor_page_faults and steps_faulting; README, Latency).

`retain_freed_memory(keep_mb)` sets both limits once: blocks up to MMAP_THRESHOLD come from the
heap, and a heap's free top is given back only once it reaches ``keep_mb`` (then all of it but
glibc's small pad). Each arena (the main one, one per thread that allocates) keeps what its peak
needed, up to ``keep_mb`` more, so the process's resident memory stays near its peak working set
rather than falling after it. The limits hold for the rest of the process: glibc's own
adjustment, once off, stays off. Elsewhere than glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The ceiling of glibc's own adjustment on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), which every
# glibc takes (older ones refuse more); blocks larger than this stay mapped one by one.
MMAP_THRESHOLD = 32 << 20
# Below this a heap's free top is given back after a step's temporaries (several MiB) are freed:
# more page faults than glibc's defaults. Above MAX_KEEP_MB the bytes overflow mallopt's int.
MIN_KEEP_MB = 64
MAX_KEEP_MB = 2047

_applied: int | None = None


def check_keep_mb(keep_mb: int) -> int:
    """``keep_mb`` if it is 0 or within [MIN_KEEP_MB, MAX_KEEP_MB]; ValueError naming it if not."""
    if keep_mb != 0 and not MIN_KEEP_MB <= keep_mb <= MAX_KEEP_MB:
        raise ValueError(f"must be 0 (glibc's defaults) or {MIN_KEEP_MB}-{MAX_KEEP_MB} MiB, not {keep_mb} (less keeps"
                         " too little for a step's temporaries: more page faults than glibc's defaults)")
    return keep_mb


def retain_freed_memory(keep_mb: int) -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring); ``keep_mb``
    0 changes nothing. True when the limits are set, by this call or an earlier one with the
    same value; they cannot be taken back within the process."""
    global _applied
    if check_keep_mb(keep_mb) == 0:
        return False
    if _applied == keep_mb:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        log.debug("not glibc's malloc: freed memory is left to the C library's own policy")
        return False
    # Both: setting either one turns glibc's adjustment off, and the other then stays where the
    # adjustment had left it. The mmap threshold alone (the trim threshold a few MiB) had a
    # dozen 1 MiB temporaries fault in again every time they were allocated.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, keep_mb << 20)):
        log.warning("malloc did not take the limits to keep freed memory (run.malloc_keep_mb);"
                    " page faults may slow large steps")
        return False
    _applied = keep_mb
    log.debug("malloc keeps blocks up to %d MiB in its heaps and gives a heap's free top back from %d MiB on",
              MMAP_THRESHOLD >> 20, keep_mb)
    return True


def _glibc_mallopt():
    """glibc's mallopt, or None under another C library."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # set by glibc alone
            return None
    except (ValueError, OSError, AttributeError):  # not a name this platform knows
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
