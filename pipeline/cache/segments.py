"""The vector cache on an object store (`cache: s3://bucket/prefix`).

SQLite cannot live on an object store (no locks, no partial writes), so the
cache there is a set of immutable SQLite files, *segments*, under
PREFIX/segments/, each in the local cache's format. An upload is atomic, and
a segment is never written again after it, so concurrent shards and killed
writers can never corrupt one.

At open every segment is downloaded to a private temp folder and opened
read-only. New vectors go to a local writable segment; every
UPLOAD_EVERY_VECTORS and at close it is sealed, uploaded under a name no
other writer uses, and joins the read-only ones. A kill loses only the
vectors not yet uploaded. Too many segments at open are merged into one,
uploaded before the merged ones are deleted, so a concurrent opener never
misses an entry (a key in two segments is harmless: both hold its vector).
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..config.job import StorageConfig
from ..errors import ConfigError
from ..storage.fs import HOST, S3_SCHEMES, store_error
from ..storage.objectstore import ObjectOutput
from ..storage.output import private_temp_dir
from .vectors import VectorCache

log = logging.getLogger("pipeline")

# A kill loses at most this many paid vectors (~120 MiB at 1536 dimensions,
# minutes of requests), while a long run still makes few segments to query.
UPLOAD_EVERY_VECTORS = 20_000
MAX_SEGMENTS = 16  # every lookup queries each segment: more than this at open are merged into one
SEGMENTS_DIR = "segments"
SEGMENT_SUFFIX = ".sqlite3"
WRITER_FILE = "new.sqlite3.tmp"  # the local segment being written, renamed when sealed
# host-pid-random-counter-sizeB.sqlite3: the size tells a whole segment from a cut-short one.
SEGMENT_NAME = re.compile(r"[A-Za-z0-9-]+-(\d+)B\.sqlite3\Z")


class SegmentedCache:
    """Same interface as `VectorCache`; thread-safe the same way."""

    def __init__(self, uri: str, options: StorageConfig, *, readonly: bool = False) -> None:
        self.folder = uri.rstrip("/")
        self._readonly = readonly
        self._lock = threading.Lock()  # the writer and the segment list
        self._upload_lock = threading.Lock()  # one upload at a time, outside the lookup lock
        self._segments: dict[str, VectorCache] = {}  # object name -> opened download
        self._writer: VectorCache | None = None
        self._written = 0  # vectors put into the writer
        self._pending: list[str] = []  # sealed locally, not yet uploaded
        self._names = (f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}-{n:05d}" for n in itertools.count())
        self._tmp = private_temp_dir("cache")  # a killed run's (a whole cache's download) is removed by the next
        try:
            self._store = ObjectOutput(self.folder, options, label="cache")
            if readonly and self.folder.partition("://")[0].lower() in S3_SCHEMES:
                # Listing a missing bucket finds nothing: say so rather than count no hits.
                bucket = self._store.base.split("/", 1)[0]
                if self._store.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise ConfigError(f"cache: {self.folder}: bucket {bucket} does not exist")
            self._load()
            if not readonly:  # a read-only bucket or refused credentials fail now, not at the first upload
                self._store.prepare()
        except (OSError, pa.ArrowException) as err:
            self._discard()
            raise ConfigError(f"cache: {self.folder}: {store_error(err)}") from None
        except BaseException:
            self._discard()
            raise
        if not readonly and len(self._segments) > MAX_SEGMENTS:
            self._compact()

    # -- lookups and writes ------------------------------------------------------

    def get(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            missing = list(keys)
            for part in self._parts():
                if not missing:
                    break
                hits = part.get(missing, dim)
                found.update(hits)
                missing = [k for k in missing if k not in hits]
        return found

    def contains(self, keys: Sequence[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        with self._lock:
            missing = list(keys)
            for part in self._parts():
                if not missing:
                    break
                found |= part.contains(missing)
                missing = [k for k in missing if k not in found]
        return found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        if self._readonly:
            raise ValueError("put on a read-only cache")
        with self._lock:
            if self._writer is None:
                (self._tmp / WRITER_FILE).unlink(missing_ok=True)
                self._writer = VectorCache(self._tmp, file_name=WRITER_FILE)
            self._writer.put(keys, vectors)
            self._written += len(keys)
            full = self._written >= UPLOAD_EVERY_VECTORS
            if full:
                self._seal()
        if full:
            self._upload_pending()

    def count(self) -> int:
        """Entries over all segments (a key held by two counts twice)."""
        with self._lock:
            return sum(part.count() for part in self._parts())

    def segment_names(self) -> list[str]:
        with self._lock:
            return sorted(self._segments)

    def close(self) -> None:
        """Upload what is left; a failure is a warning: the run's vectors are in its parts."""
        try:
            with self._lock:
                if self._writer is not None and self._written:
                    self._seal()
            left = self._upload_pending()
            if left:
                log.warning("cache: %s vectors of this run were not uploaded to %s; a later run pays for them again",
                            f"{left:,}", self.folder)
        finally:
            self._discard()

    # -- inside ------------------------------------------------------------------

    def _parts(self) -> list[VectorCache]:
        return ([self._writer] if self._writer is not None else []) + list(self._segments.values())

    def _list(self) -> list[str]:
        names = [rel.rsplit("/", 1)[-1] for rel in self._store.list(SEGMENTS_DIR, f"*{SEGMENT_SUFFIX}")]
        return [name for name in names if SEGMENT_NAME.match(name)]

    def _load(self) -> None:
        """Download every segment; one that vanished meanwhile was merged by
        another opener, whose merged segment a second listing finds."""
        seen: set[str] = set()
        for _ in range(2):
            names = [n for n in self._list() if n not in seen]
            seen.update(names)
            vanished = [name for name in names if not self._download(name)]
            if not vanished:
                return

    def _download(self, name: str) -> bool:
        local = self._tmp / name
        try:
            self._store.get_file(f"{SEGMENTS_DIR}/{name}", local)
        except FileNotFoundError:
            return False
        size = int(SEGMENT_NAME.match(name).group(1))  # type: ignore[union-attr]
        if local.stat().st_size != size:  # an upload that completed cut short: never read it
            log.warning("cache: segment %s is cut short; ignoring it", self._store.display(f"{SEGMENTS_DIR}/{name}"))
            local.unlink()
            return True
        self._segments[name] = VectorCache(self._tmp, file_name=name, immutable=True)
        return True

    def _seal(self) -> str:
        """The writer becomes a read-only segment, named and queued for upload (under self._lock)."""
        assert self._writer is not None
        self._writer.seal()
        self._writer = None
        self._written = 0
        path = self._tmp / WRITER_FILE
        name = f"{next(self._names)}-{path.stat().st_size}B{SEGMENT_SUFFIX}"
        path.rename(self._tmp / name)
        self._segments[name] = VectorCache(self._tmp, file_name=name, immutable=True)
        self._pending.append(name)
        return name

    def _upload(self, name: str) -> None:
        # The object completes at close(), so a kill mid-upload leaves nothing.
        self._store.put_file(self._tmp / name, f"{SEGMENTS_DIR}/{name}")

    def _upload_pending(self) -> int:
        """Upload sealed segments; the vectors in those that failed (kept for close to retry)."""
        with self._upload_lock:
            with self._lock:
                todo, self._pending = self._pending, []
            failed = []
            for i, name in enumerate(todo):
                try:
                    self._upload(name)
                except (OSError, pa.ArrowException) as err:
                    log.warning("cache: cannot upload a segment to %s (%s); retrying at the end of the run",
                                self.folder, store_error(err))
                    failed = todo[i:]
                    break
            with self._lock:
                self._pending = failed + self._pending
                return sum(self._segments[name].count() for name in self._pending)

    def _compact(self) -> None:
        """Merge every downloaded segment into one; upload it, and only then delete the merged ones."""
        merged = list(self._segments)
        try:
            self._writer = VectorCache(self._tmp, file_name=WRITER_FILE)
            for name in merged:
                self._writer.merge_from(self._tmp / name)
            name = self._seal()
            self._pending.remove(name)
            self._upload(name)
        except (OSError, sqlite3.Error, pa.ArrowException, ConfigError) as err:
            log.warning("cache: cannot merge the %d segments of %s (%s); going on with them", len(merged),
                        self.folder, store_error(err))
            with self._lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                for stray in set(self._segments) - set(merged):
                    self._segments.pop(stray).close()
                    (self._tmp / stray).unlink(missing_ok=True)
            return
        for old in merged:
            try:
                self._store.delete(f"{SEGMENTS_DIR}/{old}")  # absent: another opener merged it first
            except (OSError, pa.ArrowException) as err:
                log.warning("cache: cannot delete merged segment %s (%s)", old, store_error(err))
            self._segments.pop(old).close()
            (self._tmp / old).unlink(missing_ok=True)
        log.info("cache: merged %d segments of %s into one", len(merged), self.folder)

    def _discard(self) -> None:
        for part in self._parts():
            part.close()
        self._segments.clear()
        self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)
