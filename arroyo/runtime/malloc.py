"""glibc malloc thresholds for stage processes (issue 14, docs/operations.md).

glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB to start with) with their own
mmap and unmaps them on free; it normally raises the threshold as large blocks are
freed, but in a stage process that stops happening, so every frame-sized numpy
temporary is mapped, faulted in page by page and unmapped again: thousands of minor
page faults per event and a third of the speed of the same code in a plain script.
Fixed thresholds keep such blocks on the heap, and a high trim threshold keeps the
heap from being handed back between events. The cost: RSS stays at its high-water
mark instead of shrinking when the work does.

The same values go into each supervised program's environment (``MALLOC_*_`` variables,
read by glibc at the first malloc), so code that runs before the stage sets them, or in
a subprocess, gets them too. A value the user put in the environment wins.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("arroyo.stage")

MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 128 << 20
# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


def is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # not glibc (musl, macOS): nothing to tune
        return False


def tune() -> dict[str, int]:
    """Set the thresholds in this process with ``mallopt``; those whose environment
    variable is set are left as glibc read them. Returns what was set (empty off glibc)."""
    if not is_glibc():
        return {}
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        log.debug("malloc not tuned: %s", e)
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = {}
    for param, value, var in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
    ):
        if var in os.environ:
            continue
        if mallopt(param, value) == 1:  # 1 is success, 0 a refused value
            done[var] = value
    return done
