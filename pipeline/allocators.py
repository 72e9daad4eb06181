"""Allocator settings that keep a long run's memory flat, applied by the CLI
before anything imports pyarrow (Arrow reads its choice once, at load).

A run allocates and frees vectors by the megabyte from several threads
(answers decoded, row groups written). Arrow's default allocator (mimalloc)
keeps freed pages mapped, and glibc gives each thread an arena of its own:
both raise the peak RSS at 3,072 dimensions by a hundred MB or more without
holding any more data (bench/README.md, memory). Arrow on the system
allocator and two glibc arenas keep RSS near what the run holds, at no
measurable CPU cost. A user's own ARROW_DEFAULT_MEMORY_POOL is kept.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ARROW_POOL = "system"
M_ARENA_MAX = -8  # glibc's mallopt parameter number
GLIBC_ARENAS = 2  # the event loop's, and one the worker threads share


def settle_allocators() -> None:
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, GLIBC_ARENAS)  # other libcs have their own defaults: left alone
