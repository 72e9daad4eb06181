"""Filesystems by URI: local paths, s3:// (pyarrow's S3 client, configured
from the job or the usual AWS variables), the other schemes pyarrow knows
(gs://, abfs://, hdfs://), and the rest through fsspec when it is installed.

Inputs are read through `open_input` / `open_stream` / `list_files`; the
output and an object-store cache get their filesystem from `filesystem`.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import re
import socket
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ..config.job import StorageConfig
from ..errors import ConfigError

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
S3_SCHEMES = ("s3", "s3a")
S3_CONNECT_TIMEOUT_S = 10.0  # the SDK's 1 s default gives up on a busy endpoint
MAX_ERROR_CHARS = 300  # an object store's error, quoted on one line


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def store_error(err: BaseException) -> str:
    """An object store's error on one line (they quote request ids, never credentials)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:MAX_ERROR_CHARS]


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
            raise ConfigError(f"{uri}: {store_error(arrow_err)}") from None
        except Exception as err:  # fsspec raises what its backend raises
            raise ConfigError(f"{uri}: {scheme}:// is not supported ({store_error(err)})") from None
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
    """A random-access file for Parquet: the path itself when local."""
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
