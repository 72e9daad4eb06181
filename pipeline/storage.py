"""Where the job's files live: a local folder or an object store.

`Output` is the output directory seen as named files: write one atomically,
read, list, delete, lock. Locally a file is written under a temp name, fsynced,
renamed and its folder fsynced, and a kernel flock serialises manifest
updates. An object store has no rename and no lock, but a PUT (a multipart
upload, on completion) is atomic: an object is seen whole or not at all, so
files go straight to their final key and the manifest is split per writer
(see manifest.py).

Inputs are opened through `open_input` / `open_stream` / `list_files`, over
pyarrow's filesystems (s3://, gs://, hdfs://, abfs://...) or fsspec's for
the schemes pyarrow lacks.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import fcntl
import fnmatch
import functools
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import StorageConfig
from .errors import ConfigError

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
TEMP_MARK = ".tmp."
MANIFEST_LOCK = "_manifest.lock"
WRITE_CHECK = "_write_check"  # written and deleted at start: a read-only bucket fails before any request
S3_SCHEMES = ("s3", "s3a")
S3_CONNECT_TIMEOUT_S = 10.0  # the SDK's 1 s default gives up on a busy endpoint
MAX_ERROR_CHARS = 300  # an object store's error, quoted on one line


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def error_line(err: BaseException) -> str:
    """An object store's error on one line (they quote request ids, never credentials)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:MAX_ERROR_CHARS]


# -- filesystems ----------------------------------------------------------------


def filesystem(uri: str, options: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem serving `uri`, and the path within it."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme in S3_SCHEMES:
        return _s3(options), rest.strip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as arrow_err:
        try:
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs, path = fsspec.core.url_to_fs(uri)
        except ImportError:
            raise ConfigError(f"{uri}: {error_line(arrow_err)}") from None
        except Exception as err:  # fsspec raises what its backend raises
            raise ConfigError(f"{uri}: {scheme}:// is not supported ({error_line(err)})") from None
        return PyFileSystem(FSSpecHandler(fs)), path


@functools.lru_cache(maxsize=None)
def _s3(options: StorageConfig) -> pafs.S3FileSystem:
    """S3 (and S3-compatible: MinIO, R2, Ceph) from the job's keys, else the
    usual AWS variables; pyarrow itself does not read AWS_ENDPOINT_URL."""
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "allow_delayed_open": True}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    if options.anonymous:
        kwargs["anonymous"] = True
    elif options.access_key_id:
        kwargs.update(access_key=options.access_key_id, secret_key=options.secret_access_key,
                      session_token=options.session_token)
    return pafs.S3FileSystem(**kwargs)


def open_input(path: str, options: StorageConfig) -> Any:
    """A random-access file for Parquet: the path itself when local (as before)."""
    if not is_remote(path):
        return path
    fs, key = filesystem(path, options)
    return fs.open_input_file(key)


def open_stream(path: str, options: StorageConfig) -> Any:
    """A sequential stream for CSV, decompressed by extension (.gz, .bz2)."""
    if not is_remote(path):
        return path
    fs, key = filesystem(path, options)
    return fs.open_input_stream(key, compression="detect")


def file_info(path: str, options: StorageConfig) -> pafs.FileInfo:
    fs, key = filesystem(path, options)
    return fs.get_file_info(key)


def list_files(uri: str, options: StorageConfig) -> list[tuple[str, pafs.FileInfo]]:
    """Every file under a prefix, recursively: (its URI, its info)."""
    fs, key = filesystem(uri, options)
    scheme = uri.partition("://")[0]
    selector = pafs.FileSelector(key, recursive=True, allow_not_found=True)
    return [(f"{scheme}://{info.path}", info) for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as `glob.glob` reads it (`*` within a name, `**/` any folders)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append(fnmatch.translate(pattern[i:end + 1])[4:-3])  # fnmatch's class, without (?s: and )\Z
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


# -- local durable writes -----------------------------------------------------------


def temp_path(final: Path) -> Path:
    """A name no reader globs for, that tells which process wrote it."""
    return final.with_name(f".{final.name}{TEMP_MARK}{HOST}.{os.getpid()}")


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temp of ours at start is a leftover of an earlier process with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the output directory -----------------------------------------------------------


class Staged:
    """A unit's files, ready to appear together under their final names."""

    def __init__(self, output: Output, files: dict[str, bytes]) -> None:
        self._output = output
        self._files = files
        self._temps: dict[str, Path] = {}
        if isinstance(output, LocalOutput):
            try:  # written and fsynced now, outside the manifest lock; renamed at publish
                for rel, data in files.items():
                    temp = temp_path(output.path(rel))
                    self._temps[rel] = temp
                    write_durable(temp, data)
            except BaseException:
                self.discard()
                raise

    def publish(self) -> None:
        if isinstance(self._output, LocalOutput):
            for rel, temp in self._temps.items():
                os.replace(temp, self._output.path(rel))
            for folder in {self._output.path(rel).parent for rel in self._temps}:
                fsync_dir(folder)
        else:
            for rel, data in self._files.items():
                self._output.write(rel, data)

    def discard(self) -> None:
        for temp in self._temps.values():
            temp.unlink(missing_ok=True)


class Output(ABC):
    """The output directory: files by name relative to it ("_partial.d/part-00001.parquet").
    LocalOutput and ObjectOutput implement the abstract methods."""

    remote = False  # True: no rename and no lock; manifest.py and locks.py say what changes

    def __init__(self, root: str) -> None:
        self.root = root

    def __str__(self) -> str:
        return self.root

    def display(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    @abstractmethod
    def prepare(self) -> None:
        """Create it if need be; a ConfigError (exit 2) if it cannot be written."""
        ...

    def make_folders(self, folders: tuple[str, ...]) -> None:
        """Object stores have no folders to make."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Raises FileNotFoundError when absent."""
        ...

    def read_table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), schema=schema)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        return pq.read_metadata(pa.BufferReader(self.read_bytes(rel)))

    @abstractmethod
    def write(self, rel: str, data: bytes) -> None:
        """Atomically: the file is seen whole or not at all."""
        ...

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Gone afterwards; absent already is fine."""
        ...

    @abstractmethod
    def list(self, folder: str, pattern: str) -> list[str]:
        """Names (relative to the output) in `folder` matching `pattern`, sorted."""
        ...

    def stage(self, files: dict[str, bytes]) -> Staged:
        return Staged(self, files)

    def clean_temp_files(self, folders: tuple[str, ...] = ()) -> list[str]:
        return []  # object stores hold no temp files: objects go straight to their key

    def manifest_lock(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class LocalOutput(Output):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.dir = Path(root)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def prepare(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"output.path: cannot create {self.dir} ({err.strerror})") from None
        if not os.access(self.dir, os.W_OK):
            raise ConfigError(f"output.path: {self.dir} is not writable")

    def make_folders(self, folders: tuple[str, ...]) -> None:
        for folder in folders:
            (self.dir / folder).mkdir(exist_ok=True)

    def exists(self, rel: str) -> bool:
        return (self.dir / rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return (self.dir / rel).read_bytes()

    def read_table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return pq.read_table(self.dir / rel, schema=schema)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        return pq.read_metadata(self.dir / rel)

    def write(self, rel: str, data: bytes) -> None:
        write_atomic(self.dir / rel, data)

    def delete(self, rel: str) -> None:
        (self.dir / rel).unlink(missing_ok=True)

    def list(self, folder: str, pattern: str) -> list[str]:
        base = self.dir / folder if folder else self.dir
        return sorted(str(p.relative_to(self.dir)) for p in base.glob(pattern))

    def clean_temp_files(self, folders: tuple[str, ...] = ()) -> list[str]:
        """Remove temp files left by dead processes of this host (a live one may still be writing)."""
        removed = []
        for folder in (self.dir, *(self.dir / f for f in folders)):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                name = path.name
                if not name.startswith(".") or TEMP_MARK not in name:
                    continue
                owner = name.rsplit(TEMP_MARK, 1)[1]
                host, _, pid = owner.rpartition(".")
                if host == HOST and pid.isdigit() and not process_alive(int(pid)):
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
        return removed

    @contextlib.contextmanager
    def manifest_lock(self) -> Iterator[None]:
        with open(self.dir / MANIFEST_LOCK, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ObjectOutput(Output):
    """An output on an object store: whole-object PUTs to final keys."""

    remote = True

    def __init__(self, root: str, options: StorageConfig) -> None:
        super().__init__(root.rstrip("/"))
        self.fs, self.base = filesystem(self.root, options)
        self._lock = threading.Lock()  # this process's commits run in threads: one manifest update at a time

    def manifest_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._lock

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def prepare(self) -> None:
        """Reach the store, list the prefix and write one object: a missing
        bucket, bad credentials or an unreachable endpoint fail here."""
        try:
            self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
            self.write(WRITE_CHECK, b"")
            self.delete(WRITE_CHECK)
        except (OSError, pa.ArrowException) as err:
            raise ConfigError(f"output.path: {self.root}: {error_line(err)}") from None

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

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._key(rel))
        except FileNotFoundError:
            pass

    def list(self, folder: str, pattern: str) -> list[str]:
        prefix = self._key(folder) if folder else self.base
        selector = pafs.FileSelector(prefix, recursive=False, allow_not_found=True)
        names = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern):
                names.append(f"{folder}/{info.base_name}" if folder else info.base_name)
        return sorted(names)


def open_output(path: str, options: StorageConfig) -> Output:
    if not is_remote(path):
        return LocalOutput(path.removeprefix("file://"))
    return ObjectOutput(path, options)
