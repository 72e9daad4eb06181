"""Process settings for the CLI's own process, applied by `main()` only.

Importing the package changes nothing: a program that imports it (an Airflow
worker, a notebook) keeps its allocators, its environment and pyarrow's view
of pandas. The CLI, which owns its process, applies three settings, each
with an opt-out (README, "Memory"):

- Arrow's default memory pool becomes the system allocator. A run allocates
  and frees vectors by the megabyte from several threads (answers decoded,
  row groups written); Arrow's mimalloc keeps freed pages mapped, which
  raises the peak RSS at 3,072 dimensions by a hundred MB or more without
  holding any more data (bench/README.md, memory). Set in-process with
  `pyarrow.set_memory_pool`, so no child process inherits it. Kept: a
  user's own `ARROW_DEFAULT_MEMORY_POOL`.
- glibc: two arenas (the event loop's, and one the worker threads share)
  instead of one per thread, and an mmap threshold fixed at 4 MiB. glibc
  raises that threshold to the largest block freed (up to 32 MiB), after
  which blocks of many megabytes (a part's texts, Arrow's buffers) come from
  a heap that small long-lived objects pin; fixed, each such block is
  unmapped when freed: about 100 MB less at the peak for ~10 us a row in
  page faults. Smaller blocks (answers, their decoded vectors: a few hundred
  KB each) are kept for reuse when freed, up to TRIM_THRESHOLD_BYTES at the
  top of a heap, instead of going back to the kernel past 128 KB and coming
  back as fresh zeroed pages: 5% of the client's CPU on a long run, the same
  peak (bench/README.md). Kept: a user's own `MALLOC_ARENA_MAX` /
  `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`; other libcs are left
  alone.
- pyarrow without pandas at start-up. At its first array pyarrow asks once
  per process whether pandas can be imported, by importing all of it: 0.45 s
  of CPU at the start of every run, shard and scheduler task, for a library
  the pipeline never uses. The CLI lets that one question find no pandas;
  pyarrow keeps the answer, and a later `import pandas` or `to_pandas()`
  works as usual.
- numpy's OpenBLAS with one thread. As it loads, OpenBLAS starts a thread
  per core, and they spin waiting for work: about 0.1 s of CPU at the start
  of every run, for matrix routines the pipeline never calls (its numpy work
  is copies, casts and element-wise sums). The variable is set only while
  numpy loads, so no child process inherits it. Kept: a user's own
  `OPENBLAS_NUM_THREADS` / `GOTO_NUM_THREADS` / `OMP_NUM_THREADS`; nothing is
  done when numpy is already loaded. (torch brings its own BLAS.)
- The garbage collector's youngest generation is collected every
  GC_YOUNG_THRESHOLD container allocations instead of 700: a run makes
  lists and tuples by the million (requests, answers, slices) and few
  cycles; at 700 the collector took about 5% of the client's CPU.

`EMBEDDING_PIPELINE_PROCESS_SETTINGS=off` leaves all of them alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.abc
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

OPT_OUT_ENV = "EMBEDDING_PIPELINE_PROCESS_SETTINGS"  # "off": the CLI changes nothing in its process
M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
GLIBC_ARENAS = 2  # the event loop's, and one the worker threads share
MMAP_THRESHOLD_BYTES = 4 * 2**20  # blocks from this size up are mapped alone
TRIM_THRESHOLD_BYTES = 128 * 2**20  # free memory a heap keeps at its top before handing it back
BLAS_THREADS_ENV = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # what OpenBLAS reads
GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (Python's: 700)


def apply_process_settings() -> list[str]:
    """Apply the CLI's process settings; returns the names of those applied."""
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return []
    applied = ["blas_threads"] if quiet_blas() else []  # before anything imports numpy (pyarrow does)
    applied += settle_allocators()
    if skip_pandas_probe():
        applied.append("pandas_probe")
    young, *older = gc.get_threshold()
    if young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *older)
        applied.append("gc_threshold")
    return applied


def quiet_blas() -> bool:
    if "numpy" in sys.modules or any(name in os.environ for name in BLAS_THREADS_ENV):
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401 - OpenBLAS reads its thread count once, as it loads
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]
    return True


def settle_allocators() -> list[str]:
    import pyarrow as pa

    applied = []
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())
        applied.append("arrow_pool")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return applied
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return applied  # other libcs have their own defaults: left alone
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, GLIBC_ARENAS)
        applied.append("malloc_arenas")
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        applied.append("malloc_mmap_threshold")
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        applied.append("malloc_trim_threshold")
    return applied


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.split(".")[0] == "pandas":
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def skip_pandas_probe() -> bool:
    if "pandas" in sys.modules:
        return False  # already imported: pyarrow's question costs nothing
    import pyarrow as pa

    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])  # the first array asks the question
    finally:
        sys.meta_path.remove(finder)
    return True
