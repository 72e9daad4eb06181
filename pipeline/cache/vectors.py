"""The vector cache: vectors by (model, dimensions, options, final text), kept across runs.

One SQLite file in WAL mode inside the cache folder: readers never wait for
writers, writers from several shards take turns, and a killed writer leaves
whole transactions only. The key is a BLAKE2b digest of the model, the
dimensions and the text, so a hit is the vector that was paid for, for
exactly that text. Lookups go by key in batches; the file is never loaded
whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("pipeline")

CACHE_FILE = "vectors.sqlite3"
FORMAT_VERSION = 1
KEY_BYTES = 16  # 128-bit digests: a collision is out of reach at any table size
LOOKUP_BATCH = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit
PAGE_BYTES = 16384  # a 1536-float vector (6 KiB) fits a page instead of spilling over two
MMAP_BYTES = 2**30  # reads through the page cache without a copy per page
BUSY_TIMEOUT_MS = 60_000  # shards' writes are one short transaction each; a minute means trouble

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def text_keys(texts: Iterable[str], model: str, dimensions: int | None,
              options: Mapping[str, Any] | None = None) -> list[bytes]:
    """The cache key of each text for this model, these dimensions and the
    providers' `options` that change the vectors (extra_body's input_type, a
    local model's text_prefix: JobConfig.vector_options). Without options a
    key is what it always was, so existing caches stay valid."""
    base = hashlib.blake2b(digest_size=KEY_BYTES)
    base.update(f"{model}\x00{dimensions}\x00".encode())
    if options:
        base.update(json.dumps(options, sort_keys=True, separators=(",", ":")).encode() + b"\x00")
    keys = []
    for text in texts:
        h = base.copy()
        h.update(text.encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys


class Cache(Protocol):
    """What the run and `estimate` use of a cache: a local `VectorCache` or a
    `SegmentedCache` on an object store (segments.py)."""

    folder: Path | str

    def get(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]: ...
    def contains(self, keys: Sequence[bytes]) -> set[bytes]: ...
    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None: ...
    def close(self) -> None: ...


class VectorCache:
    """A folder holding the SQLite store. Thread-safe: the runner calls it
    from worker threads so the event loop never waits on the disk.

    `file_name` and `immutable` serve the segments of a cache on an object
    store (segments.py): a downloaded segment is never written again, so it is
    opened without locks or change checks."""

    def __init__(self, folder: Path, *, readonly: bool = False, file_name: str = CACHE_FILE,
                 immutable: bool = False) -> None:
        self.folder: Path | str = folder
        self._lock = threading.Lock()
        path = folder / file_name
        try:
            if readonly or immutable:
                flags = "mode=ro&immutable=1" if immutable else "mode=ro"
                self._db = sqlite3.connect(f"{path.resolve().as_uri()}?{flags}", uri=True, check_same_thread=False,
                                           timeout=BUSY_TIMEOUT_MS / 1000)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000,
                                           isolation_level=None)
                self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")  # takes effect on a new file only
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed write
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
            self._db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            row = self._db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        except (sqlite3.Error, OSError) as err:
            raise ConfigError(f"cache: {folder} cannot be used as a vector cache ({err})") from None
        if row is None or row[0] != str(FORMAT_VERSION):
            raise ConfigError(f"cache: {folder} holds a cache of another format ({row[0] if row else 'none'})")

    @classmethod
    def open_if_present(cls, folder: Path) -> VectorCache | None:
        """Read-only, for `estimate`: None when there is no cache yet."""
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"cache: {folder} is a file, not a cache folder")
        return cls(folder, readonly=True) if (folder / CACHE_FILE).exists() else None

    def get(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """The cached vectors among `keys`. A stored vector of another length
        (a cache shared by jobs with other dimensions) is a miss."""
        found: dict[bytes, np.ndarray] = {}
        want = dim * 4
        for rows in self._select("key, vector", keys):
            rows = [row for row in rows if len(row[1]) == want]
            block = np.frombuffer(b"".join(blob for _, blob in rows), dtype="<f4").reshape(-1, dim)
            found.update(zip((key for key, _ in rows), block))  # one buffer, a view per row
        return found

    def contains(self, keys: Sequence[bytes]) -> set[bytes]:
        return {key for rows in self._select("key", keys) for (key,) in rows}

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store vectors in one transaction; a key already there keeps its vector."""
        blobs = np.ascontiguousarray(vectors, dtype="<f4")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                                     zip(keys, (row.tobytes() for row in blobs)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM vectors").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def seal(self) -> None:
        """Close, leaving one self-contained file (no -wal beside it, rollback
        journal mode in its header) that any reader can open: a segment to upload."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.close()

    def merge_from(self, path: Path) -> None:
        """Copy in every entry of another cache file (a segment being compacted);
        a key already here keeps its vector."""
        with self._lock:
            self._db.execute("ATTACH DATABASE ? AS other", (str(path),))
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT OR IGNORE INTO main.vectors SELECT key, vector FROM other.vectors")
                self._db.execute("COMMIT")
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._db.execute("DETACH DATABASE other")

    def _select(self, columns: str, keys: Sequence[bytes]) -> Iterable[list[tuple]]:
        keys = sorted(keys)  # neighbouring keys share index pages: ~1.5x faster than random order
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            with self._lock:
                yield self._db.execute(f"SELECT {columns} FROM vectors WHERE key IN ({marks})", batch).fetchall()
