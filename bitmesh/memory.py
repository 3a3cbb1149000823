"""The service's resident memory: keep the C allocator from sitting on what Python freed.

The service's own objects barely grow with clients (a Channel, a few small records each); what
grew its RSS under load (bench/soak.py, 200 clients: 29 MB idle -> 41 MB) was glibc's malloc.
Each thread that allocates while another holds the main arena's lock gets an arena of its own
(up to 8 per CPU; the portal alone runs 18 threads), and buffers a burst frees there (request
and answer bodies, `nft -j` output and its parse) stay mapped for that thread. Python allocates
under the GIL anyway, so one arena costs no parallelism; large buffers are mmapped and unmapped
when freed, and free heap pages are returned. Measured with bench/soak.py (200 clients, 60 s):
peak 40-41 MB with an arena per thread, 35 MB with this (the figures `service.rss_mb_*`).

Only glibc has these knobs (found by symbol, never assumed): on OpenWrt's musl the calls are
absent and this is a no-op (musl has no per-thread arenas and returns freed pages itself).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@dataclass(frozen=True)
class AllocatorTuning:
    arena_max: int = 1  # one arena: Python's allocations are serialised by the GIL anyway
    mmap_threshold: int = 64 * 1024  # larger blocks (bodies, nft output) get their own mapping
    trim_threshold: int = 128 * 1024  # free memory at the heap's top beyond this goes back


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already in the process: its C library
    except OSError:
        return None
    # gnu_get_libc_version only exists in glibc; musl has no mallopt/malloc_trim at all
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def tune_allocator(tuning: AllocatorTuning = AllocatorTuning()) -> bool:
    """Set the C allocator for a long-running service with many mostly idle threads. Call it
    before the threads start (an arena, once made, stays). False when the C library has no
    such knobs (musl) or refused one."""
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, tuning.arena_max),
        (M_MMAP_THRESHOLD, tuning.mmap_threshold),  # also stops glibc raising it by itself
        (M_TRIM_THRESHOLD, tuning.trim_threshold),
    ))
    if not ok:
        log.warning("malloc tuning refused by the C library; memory use may grow under load")
    return ok


def release_free_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim: also the free
    pages inside the heap, not only at its top). Cheap with one arena; a no-op on musl."""
    libc = _glibc_cached()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC: list[ctypes.CDLL | None] = []


def _glibc_cached() -> ctypes.CDLL | None:
    if not _LIBC:
        _LIBC.append(_glibc())
    return _LIBC[0]
