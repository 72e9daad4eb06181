"""Allocator settings that keep a long run's memory flat, applied by the CLI
before anything imports pyarrow (Arrow reads its choice once, at load).

A run allocates and frees vectors by the megabyte from several threads
(answers decoded, row groups written). Arrow's default allocator (mimalloc)
keeps freed pages mapped, and glibc gives each thread an arena of its own:
both raise the peak RSS at 3,072 dimensions by a hundred MB or more without
holding any more data (bench/README.md, memory). Arrow on the system
allocator and two glibc arenas keep RSS near what the run holds, at no
measurable CPU cost. glibc also raises its mmap threshold to the largest
block freed (up to 32 MiB), after which blocks of many megabytes (a part's
texts, Arrow's buffers) come from a heap that small long-lived objects pin:
fixed at 4 MiB, each such block is unmapped when freed: about 100 MB less at
the peak for ~10 us a row in page faults (1 MiB saves 30 MB more for twice
that, 8 MiB 20 MB less for a third).
A user's own ARROW_DEFAULT_MEMORY_POOL, MALLOC_ARENA_MAX or
MALLOC_MMAP_THRESHOLD_ is kept.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ARROW_POOL = "system"
M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
GLIBC_ARENAS = 2  # the event loop's, and one the worker threads share
MMAP_THRESHOLD_BYTES = 4 * 2**20  # blocks from this size up are mapped alone


def settle_allocators() -> None:
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return  # other libcs have their own defaults: left alone
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, GLIBC_ARENAS)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
