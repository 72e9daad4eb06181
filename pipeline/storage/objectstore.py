"""The output on an object store: the second implementation of storage.Output.

An object store has no rename, no append and no lock, but a PUT (a multipart
upload, on completion) is atomic: an object is seen whole or not at all.
Files go straight to their final key; a staged file (a part) is spooled on
local disk and uploaded when it is published; each append to a log is an
object of its own; the writer lock is a renewed lease object (locks.py).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from ..config.job import StorageConfig
from ..errors import ConfigError
from .fs import HOST, filesystem, store_error
from .locks import Lease, lease_holders
from .output import COPY_CHUNK_BYTES, LOG_CHUNK_SUFFIX, WRITE_CHECK, Output, Staged, private_temp_dir


class _ObjectStaged(Staged):
    def __init__(self, output: ObjectOutput, rel: str) -> None:
        super().__init__(output.spool() / f"{uuid.uuid4().hex}-{rel.replace('/', '_')}")
        self._output = output
        self._rel = rel

    def publish(self) -> None:
        try:
            self._output.put_file(self.path, self._rel)  # the object completes at the end of the upload
        finally:
            self.discard()



class ObjectOutput(Output):
    """An output on an object store: whole-object PUTs to final keys."""

    def __init__(self, root: str, options: StorageConfig, label: str = "output.path") -> None:
        super().__init__(root.rstrip("/"))
        self.label = label  # the job key that named it, for errors
        self.fs, self.base = filesystem(self.root, options)
        self._spool: Path | None = None
        self._spool_lock = threading.Lock()

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def spool(self) -> Path:
        """This process's local folder for staged parts (removed by the next run if killed)."""
        with self._spool_lock:
            if self._spool is None:
                self._spool = private_temp_dir("spool")
            return self._spool

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def prepare(self, folders: tuple[str, ...] = ()) -> None:
        """Reach the store, list the prefix and write one object: a missing
        bucket, bad credentials or an unreachable endpoint fail here."""
        check = f"{WRITE_CHECK}-{HOST}-{os.getpid()}"
        try:
            self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
            self.write(check, b"")
            self.delete(check)
        except (OSError, pa.ArrowException) as err:
            raise ConfigError(f"{self.label}: {self.root}: {store_error(err)}") from None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._key(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._key(rel)) as fh:
            return fh.read()

    def write(self, rel: str, data: bytes) -> None:
        # One write of the whole object, then close: the upload completes at
        # close, so a kill before it leaves nothing under the key.
        stream = self.fs.open_output_stream(self._key(rel))
        stream.write(data)
        stream.close()

    def stage(self, rel: str) -> Staged:
        return _ObjectStaged(self, rel)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._key(rel))
        except FileNotFoundError:
            pass

    def _infos(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._key(folder), recursive=recursive, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def list(self, folder: str, pattern: str) -> list[str]:
        names = [info.base_name for info in self._infos(folder)
                 if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern)]
        return sorted(f"{folder}/{name}" if folder else name for name in names)

    def append(self, rel: str, buffers: Sequence[bytes | memoryview]) -> None:
        self.write(f"{rel}/{uuid.uuid4().hex}{LOG_CHUNK_SUFFIX}", b"".join(buffers))

    def read_log(self, rel: str) -> bytes:
        chunks = []
        for name in self.list(rel, f"*{LOG_CHUNK_SUFFIX}"):
            try:
                chunks.append(self.read_bytes(name))
            except FileNotFoundError:  # deleted meanwhile: its unit was committed
                continue
        return b"".join(chunks)

    def delete_log(self, rel: str) -> None:
        for name in self.list(rel, f"*{LOG_CHUNK_SUFFIX}"):
            self.delete(name)

    def list_logs(self, folder: str) -> list[str]:
        prefix = len(self.base) + 1
        return sorted(info.path[prefix:] for info in self._infos(folder) if info.type == pafs.FileType.Directory)

    def put_file(self, local: Path, rel: str) -> None:
        # close() completes the upload and raises if it fails (copy_files
        # swallows a failure at close: a part must never be recorded unwritten).
        stream = self.fs.open_output_stream(self._key(rel))
        with open(local, "rb") as src:
            while chunk := src.read(COPY_CHUNK_BYTES):
                stream.write(chunk)
        stream.close()

    def get_file(self, rel: str, local: Path) -> None:
        try:
            with self.fs.open_input_stream(self._key(rel)) as src, open(local, "wb") as dst:
                while chunk := src.read(COPY_CHUNK_BYTES):
                    dst.write(chunk)
        except FileNotFoundError:
            local.unlink(missing_ok=True)
            raise

    def writer_lock(self, shard: tuple[int, int] | None) -> contextlib.AbstractContextManager[object]:
        return Lease(self, shard)

    def running_shards(self) -> tuple[bool | None, list[tuple[int, int]]]:
        return lease_holders(self)
