"""The output on a local disk: the first implementation of output.Output.

A file is written under a temp name, fsynced, renamed and its folder
fsynced; a log is a file appended with one writev (a SIGKILL keeps what the
kernel has); the writer lock is a kernel flock (locks.py).
"""
from __future__ import annotations

import contextlib
import fnmatch
import mmap
import os
import shutil
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from .fs import HOST, process_alive
from .locks import FlockLock, flock_holders
from .output import (
    TEMP_MARK,
    Output,
    Staged,
    fsync_dir,
    fsync_file,
    read_parquet,
    temp_path,
    write_atomic,
    write_durable,
)


class _LocalStaged(Staged):
    def __init__(self, final: Path) -> None:
        super().__init__(temp_path(final))
        self._final = final

    def publish(self) -> None:
        try:
            fsync_file(self.path)
            os.replace(self.path, self._final)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self._final.parent)



class LocalOutput(Output):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.dir = Path(root)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def prepare(self, folders: tuple[str, ...] = ()) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for folder in folders:
                (self.dir / folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"output.path: cannot create {self.dir} ({err.strerror})") from None
        if not os.access(self.dir, os.W_OK):
            raise ConfigError(f"output.path: {self.dir} is not writable")

    def exists(self, rel: str) -> bool:
        return (self.dir / rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return (self.dir / rel).read_bytes()

    def read_table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return read_parquet(self.dir / rel, schema)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        return pq.read_metadata(self.dir / rel)

    def write(self, rel: str, data: bytes) -> None:
        write_atomic(self.dir / rel, data)

    def write_once(self, rel: str, data: bytes) -> bool:
        final = self.dir / rel
        tmp = temp_path(final)
        write_durable(tmp, data)
        try:
            os.link(tmp, final)  # atomic, and refused when the name exists: the first writer's file stays
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: an exclusive create (readers may see it half written)
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return True

    def stage(self, rel: str) -> Staged:
        return _LocalStaged(self.dir / rel)

    def delete(self, rel: str) -> None:
        (self.dir / rel).unlink(missing_ok=True)

    def list(self, folder: str, pattern: str) -> list[str]:
        base = self.dir / folder if folder else self.dir
        try:
            names = [entry.name for entry in os.scandir(base) if entry.is_file() and fnmatch.fnmatchcase(entry.name, pattern)]
        except FileNotFoundError:
            return []
        return sorted(f"{folder}/{name}" if folder else name for name in names)

    def append(self, rel: str, buffers: Sequence[bytes | memoryview]) -> None:
        fd = os.open(self.dir / rel, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            left = [memoryview(b).cast("B") for b in buffers if len(b)]
            while left:  # one writev; a short one (a full disk, a signal) continues where it stopped
                written = os.writev(fd, left)
                while left and written >= len(left[0]):
                    written -= len(left[0])
                    left.pop(0)
                if left:
                    left[0] = left[0][written:]
        finally:
            os.close(fd)

    def read_log(self, rel: str) -> bytes | mmap.mmap:
        """Mapped, not read: a reader touches only the pages it uses (a journal's keys
        and the vectors it takes), so a large log costs no memory up front."""
        try:
            with open(self.dir / rel, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            return b""

    def delete_log(self, rel: str) -> None:
        self.delete(rel)

    def list_logs(self, folder: str) -> list[str]:
        return self.list(folder, "*")

    def put_file(self, local: Path, rel: str) -> None:
        final = self.dir / rel
        tmp = temp_path(final)
        try:
            shutil.copyfile(local, tmp)
            fsync_file(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)

    def get_file(self, rel: str, local: Path) -> None:
        shutil.copyfile(self.dir / rel, local)

    def clean_temp_files(self, folders: tuple[str, ...] = ()) -> list[str]:
        """A live process's temp file may still be written: only dead ones' go."""
        removed = []
        for folder in (self.dir, *(self.dir / f for f in folders)):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                name = entry.name
                if not name.startswith(".") or TEMP_MARK not in name:
                    continue
                owner = name.rsplit(TEMP_MARK, 1)[1]
                host, _, rest = owner.partition(".")
                pid = rest.split(".", 1)[0]
                if host == HOST and pid.isdigit() and not process_alive(int(pid)):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.path)
        return removed

    def writer_lock(self, shard: tuple[int, int] | None) -> contextlib.AbstractContextManager[object]:
        return FlockLock(self.dir, shard)

    def running_shards(self) -> tuple[bool | None, list[tuple[int, int]]]:
        return flock_holders(self.dir)
