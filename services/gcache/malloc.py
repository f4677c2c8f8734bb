"""glibc allocator settings for a node process, where MiB-sized values are allocated and freed all
the time.

By default glibc serves allocations above a (self-adjusting) threshold with their own mmap and
returns them with munmap, and trims freed memory at the top of the heap: every received value then
lands on pages the kernel must fault in and zero, and a node spends most of its CPU in the kernel
(measured here: 0.3-0.5 s of system time per 640 MiB put). Serving values up to 32 MiB (glibc's
maximum threshold) from the heap and keeping freed memory for reuse removes that; the node's RSS
then stays near its peak, which for a cache that runs at its memory budget is where it is anyway.
Only the node process calls this (main.py), never a library user of the client.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_glibc_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Set glibc's mmap and trim thresholds; False (and nothing changed) when not on glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("gcache: mallopt refused the thresholds; the default allocator behaviour stays")
    return ok
