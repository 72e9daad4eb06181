"""Vectors kept across runs, by (model, dimensions, text): one SQLite file
locally (vectors.py), immutable SQLite segments on an object store (segments.py).
`open_cache` picks by the path's scheme."""
from __future__ import annotations

from pathlib import Path

from ..config.job import StorageConfig
from ..storage.fs import is_remote
from .segments import SegmentedCache
from .vectors import Cache, VectorCache


def open_cache(path: str | None, options: StorageConfig, *, readonly: bool = False) -> Cache | None:
    """The job's cache: a local folder, or segments on an object store (segments.py).
    `readonly` (for `estimate`): nothing is created, and None when a local cache does not exist yet."""
    if not path:
        return None
    if is_remote(path):
        return SegmentedCache(path, options, readonly=readonly)
    folder = Path(path.removeprefix("file://"))
    return VectorCache.open_if_present(folder) if readonly else VectorCache(folder)
