"""The output directory behind one interface: `Output`, and what its implementations share.

`Output` is the output seen as named files: write one atomically, stage a
large one (a part) and publish it, append to a log (a unit's journal), read,
list, delete, and take the run's writer lock. Callers (the checkpoint, the
sink, the locks, the cache's segments) call these methods and never ask
which kind of store they have.

- `LocalOutput` (local.py): a file is written under a temp name, fsynced,
  renamed and its folder fsynced; a log is a file appended with one writev
  (a SIGKILL keeps what the kernel has); the writer lock is a kernel flock.
- `ObjectOutput` (objectstore.py): whole-object PUTs, a renewed lease.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .fs import HOST, process_alive

TEMP_MARK = ".tmp."
WRITE_CHECK = "_write_check"  # written and deleted at start: a read-only bucket fails before any request
LOG_CHUNK_SUFFIX = ".chunk"
COPY_CHUNK_BYTES = 8 * 2**20  # uploads and downloads stream through this much memory


# -- local durable writes -----------------------------------------------------------


def temp_path(final: Path) -> Path:
    """A name no reader globs for, that tells which process wrote it."""
    return final.with_name(f".{final.name}{TEMP_MARK}{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_file(path)  # a folder is fsynced through a read-only descriptor too


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync `path` itself: a temp name, renamed into place by the caller."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # a full disk must not leave half a file behind
        raise


def write_atomic(final: Path, data: bytes) -> None:
    tmp = temp_path(final)
    write_durable(tmp, data)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def private_temp_dir(kind: str) -> Path:
    """A temp folder of this process (`pipeline-KIND-PID-...`); those of dead
    processes of this host are removed first (a killed run leaves its own)."""
    prefix = f"pipeline-{kind}-"
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


# -- staged files ---------------------------------------------------------------------


class Staged(ABC):
    """A file being written at `path` (a local path), that appears under its
    final name only at `publish`; `discard` leaves nothing behind."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def publish(self) -> None: ...

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


# -- the output directory -----------------------------------------------------------


def read_parquet(source: str | Path | pa.BufferReader, schema: pa.Schema | None = None) -> pa.Table:
    """One Parquet file as a table, read as `schema` when given. Read as a
    single file, without pyarrow's dataset layer (pyarrow.dataset and compute
    take 20 ms to import); that layer only where the file's own schema is
    not `schema` (an all-null column, say), to convert it."""
    table = pq.ParquetFile(source).read()
    if schema is None or table.schema.equals(schema):
        return table
    if isinstance(source, pa.BufferReader):
        source.seek(0)
    return pq.read_table(source, schema=schema)


class Output(ABC):
    """The output directory: files by name relative to it ("_rejects.d/part-00001.parquet")."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __str__(self) -> str:
        return self.root

    def display(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    @abstractmethod
    def prepare(self, folders: tuple[str, ...] = ()) -> None:
        """Create it (and `folders` in it) if need be; a ConfigError (exit 2) if it cannot be written."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Raises FileNotFoundError when absent."""

    def read_table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return read_parquet(pa.BufferReader(self.read_bytes(rel)), schema)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        return pq.read_metadata(pa.BufferReader(self.read_bytes(rel)))

    @abstractmethod
    def write(self, rel: str, data: bytes) -> None:
        """Atomically: the file is seen whole or not at all."""

    def write_once(self, rel: str, data: bytes) -> bool:
        """Write `rel` unless it exists: True when this call wrote it, False
        when it was there (the one there stays). Locally atomic (a hard link
        fails on an existing name); on an object store without conditional
        writes, a check then a write: two writers in the same instant may both
        write, and the last one's stays."""
        if self.exists(rel):
            return False
        self.write(rel, data)
        return True

    @abstractmethod
    def stage(self, rel: str) -> Staged:
        """A local file to write `rel` into; it appears at `publish`."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Gone afterwards; absent already is fine."""

    @abstractmethod
    def list(self, folder: str, pattern: str) -> list[str]:
        """Names (relative to the output) of the files in `folder` matching `pattern`, sorted."""

    # -- logs: append-only, read whole; what was appended before a kill stays ----

    @abstractmethod
    def append(self, rel: str, buffers: Sequence[bytes | memoryview]) -> None:
        """Add the buffers, in order, to the log `rel` as one piece: a kill mid-write
        can tear it (locally), so readers check each piece."""

    @abstractmethod
    def read_log(self, rel: str) -> bytes | mmap.mmap:
        """Everything appended to `rel`, b"" when there is no such log."""

    @abstractmethod
    def delete_log(self, rel: str) -> None: ...

    @abstractmethod
    def list_logs(self, folder: str) -> list[str]: ...

    # -- whole files to and from local disk (the cache's segments) -------------------

    @abstractmethod
    def put_file(self, local: Path, rel: str) -> None: ...

    @abstractmethod
    def get_file(self, rel: str, local: Path) -> None:
        """Raises FileNotFoundError when absent."""

    # -- housekeeping and the writer lock --------------------------------------------

    def clean_temp_files(self, folders: tuple[str, ...] = ()) -> list[str]:
        """Remove temp files that dead processes of this host left; the removed paths."""
        return []

    @abstractmethod
    def writer_lock(self, shard: tuple[int, int] | None) -> contextlib.AbstractContextManager[object]:
        """One writer per output, or per shard of it; OutputLockedError when taken."""

    @abstractmethod
    def running_shards(self) -> tuple[bool | None, list[tuple[int, int]]]:
        """Whether a run holds the output now (None: cannot tell), and which shards run."""

    def close(self) -> None:
        """Release what this process holds locally for the output (an object store's spool)."""
