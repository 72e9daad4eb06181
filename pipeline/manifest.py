"""The checkpoint: the single source of truth for what is done.

Commit order is: part file complete on disk -> manifest lists its unit. A part
the manifest does not list is an orphan. Every change is a read-merge-write
under an exclusive file lock, so shards sharing an output never lose each
other's progress.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import JobConfig
from .errors import ConfigError, JobChangedError, OutputLockedError
from .sink import PARTIAL_DIR, REJECTS_DIR, part_name, write_json_atomic
from .sources import InputFile

MANIFEST_NAME = "_manifest.json"
MANIFEST_LOCK = "_manifest.lock"
RUN_LOCK = "_run.lock"
FORMAT_VERSION = 1
MAX_RUNS_KEPT = 50  # run history in the manifest stays small
LOCK_RETRY_S = 0.25  # `status` holds a run lock for an instant to probe it; a real holder holds it for the run
LOCK_POLL_S = 0.02
# `_SUCCESS` and the manifest first: --restart removes them before the parts.
OUTPUT_FILES = ("_SUCCESS", MANIFEST_NAME, "_summary.json", "_rejects.parquet")

# What makes the vectors (or the output layout) what they are: changing any
# of these on an output with progress is refused unless --restart.
VECTOR_KEYS = (
    "inputs",
    "text",
    "model",
    "dimensions",
    "too_long",
    "max_input_tokens",
    "empty",
    "id_column",
    "keep_columns",
    "vector_column",
    "rows_per_part",
)


def job_fingerprint(job: JobConfig, files: list[InputFile]) -> dict[str, Any]:
    return {
        "inputs": [f.fingerprint() for f in files],
        "text": {"column": job.input.text_column} if job.input.text_column else {"template": job.input.text_template},
        "model": job.embedding.model,
        "dimensions": job.embedding.dimensions,
        "too_long": job.embedding.too_long,
        "max_input_tokens": job.embedding.max_input_tokens,
        "empty": job.embedding.empty,
        "id_column": job.id_column_out,
        "keep_columns": list(job.input.keep_columns),
        "vector_column": job.output.vector_column,
        "rows_per_part": job.output.rows_per_part,
    }


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A readable account of the first difference, or None if the same."""
    for key in VECTOR_KEYS:
        if old.get(key) == new.get(key):
            continue
        if key == "inputs":
            before = {f["path"]: f for f in old.get("inputs", [])}
            after = {f["path"]: f for f in new.get("inputs", [])}
            for path in after:
                if path not in before:
                    return f"input {path} was added"
            for path in before:
                if path not in after:
                    return f"input {path} is gone"
            for path, f in after.items():
                if f != before[path]:
                    return f"input {path} changed (size or modification time)"
            return "the order of the inputs changed"
        return f"{key} changed from {old.get(key)!r} to {new.get(key)!r}"
    return None


@dataclass
class Manifest:
    out_dir: Path
    data: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def units(self) -> dict[str, dict[str, Any]]:
        return self.data["units"]

    @property
    def partial(self) -> dict[str, dict[str, Any]]:
        return self.data["partial"]

    def is_done(self, seq: int) -> bool:
        return str(seq) in self.units

    @classmethod
    def read(cls, out_dir: Path) -> Manifest | None:
        path = out_dir / MANIFEST_NAME
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable manifest ({err}); rerun with --restart to start over") from None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path}: manifest format {data.get('format_version')!r} is not {FORMAT_VERSION}")
        return cls(out_dir, data)

    @classmethod
    def open(cls, out_dir: Path, job: JobConfig, fingerprint: dict[str, Any], *, restart: bool) -> Manifest:
        """The output's manifest, created if new; refuses progress made by a different job."""
        with manifest_lock(out_dir):
            existing = cls.read(out_dir)
            if existing is not None and restart:
                discard_outputs(out_dir)
                existing = None
            if existing is not None:
                change = describe_change(existing.data["fingerprint"], fingerprint)
                if change:
                    raise JobChangedError(
                        f"{out_dir} holds progress of a different job: {change}. "
                        f"Rerun with --restart to discard it, or undo the change"
                    )
                return existing
            manifest = cls(
                out_dir,
                {
                    "format_version": FORMAT_VERSION,
                    "job": job.name,
                    "created_at": _now(),
                    "updated_at": _now(),
                    "fingerprint": fingerprint,
                    "dimensions": None,  # learned from the first answer
                    "total_units": None,  # known once a run has read every input
                    "total_rows": None,
                    "units": {},
                    "partial": {},
                    "runs": [],
                },
            )
            write_json_atomic(manifest.path, manifest.data)
            return manifest

    def refresh(self) -> None:
        """Take what the disk says (hold `manifest_lock`: other shards write it)."""
        latest = Manifest.read(self.out_dir)
        if latest is not None:
            self.data = latest.data

    def save(self, data: dict[str, Any]) -> None:
        """Write `data` (hold `manifest_lock`); it becomes ours only once on disk,
        so a failed write (a full disk) leaves `data` as the disk says."""
        data["updated_at"] = _now()
        write_json_atomic(self.path, data)
        self.data = data

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read the latest manifest, apply `change`, write it back, all under the lock."""
        with manifest_lock(self.out_dir):
            latest = Manifest.read(self.out_dir)
            data = latest.data if latest is not None else copy.deepcopy(self.data)
            change(data)
            self.save(data)

    def counters(self) -> dict[str, Any]:
        rows = embedded = tokens = 0
        rejected: Counter[str] = Counter()
        reused: Counter[str] = Counter()
        for record in [*self.units.values(), *self.partial.values()]:
            rows += record["rows"]
            embedded += record["embedded"]
            tokens += record["tokens"]
            rejected.update(record["rejected"])
            reused.update({k: record.get(k, 0) for k in ("deduped", "from_cache")})
        return {"units_done": len(self.units), "rows_done": rows, "rows_embedded": embedded,
                "rows_rejected": dict(rejected), "tokens": tokens,
                "rows_deduped": reused["deduped"], "rows_from_cache": reused["from_cache"]}

    def complete(self) -> bool:
        total = self.data.get("total_units")
        return total is not None and len(self.units) >= total


def discard_outputs(out_dir: Path) -> None:
    """--restart: remove what earlier runs wrote (only files this tool names).
    `_SUCCESS` and the manifest go first: a kill halfway leaves orphans,
    never a manifest listing parts that are gone."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("part-*.parquet"):
        path.unlink()
    for folder in (REJECTS_DIR, PARTIAL_DIR):
        for path in (out_dir / folder).glob("*"):
            path.unlink()


def orphan_parts(out_dir: Path, manifest: Manifest) -> list[Path]:
    """Part files the manifest does not list: written by a run that died before committing."""
    listed = {part_name(int(seq)) for seq in [*manifest.units, *manifest.partial]}
    cut_short = {part_name(int(seq)) for seq in manifest.partial}
    orphans = [p for p in out_dir.glob("part-*.parquet") if p.name not in listed]
    orphans += [p for p in (out_dir / REJECTS_DIR).glob("part-*.parquet") if p.name not in listed]
    orphans += [p for p in (out_dir / PARTIAL_DIR).glob("*.parquet") if p.name not in cut_short]
    return orphans


@contextmanager
def manifest_lock(out_dir: Path) -> Iterator[None]:
    with open(out_dir / MANIFEST_LOCK, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class RunLock:
    """One writer per output (per shard when sharded). The kernel drops a
    flock when its process dies, so a killed run never leaves it held."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        self._out_dir = out_dir
        self._shard = shard
        self._handles: list[Any] = []

    def __enter__(self) -> RunLock:
        try:
            if self._shard is None:
                self._take(RUN_LOCK, fcntl.LOCK_EX, "another run of this job")
            else:
                k, n = self._shard
                self._take(RUN_LOCK, fcntl.LOCK_SH, "an unsharded run of this job")
                self._take(shard_lock_name(k, n), fcntl.LOCK_EX, f"another run of shard {k}/{n}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self, name: str, mode: int, holder: str) -> None:
        path = self._out_dir / name
        fh = open(path, "a+b")
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL_S)
                    continue
                fh.close()
                if name == RUN_LOCK and mode == fcntl.LOCK_EX and not _held(path, fcntl.LOCK_SH):
                    holder = "a sharded run of this job"  # shards share the output lock; none holds it alone
                else:
                    pid = path.read_text(errors="replace").strip()
                    holder += f" (pid {pid})" if pid.isdigit() else ""
                raise OutputLockedError(
                    f"output {self._out_dir} is in use: {holder} is writing to it; wait for it to end or stop it"
                ) from None
        if mode == fcntl.LOCK_EX:
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n".encode())
            fh.flush()
        self._handles.append(fh)

    def __exit__(self, *exc: object) -> None:
        for fh in reversed(self._handles):
            fh.close()
        self._handles.clear()


def shard_lock_name(k: int, n: int) -> str:
    return f"{RUN_LOCK}.shard-{k}-of-{n}"


def run_lock_held(out_dir: Path) -> bool:
    """Whether some run (any shard) holds the output now."""
    return _held(out_dir / RUN_LOCK, fcntl.LOCK_EX)


def shard_locks_held(out_dir: Path) -> list[tuple[int, int]]:
    """The shards (k, n) whose run holds its lock now."""
    held = []
    for path in out_dir.glob(f"{RUN_LOCK}.shard-*-of-*"):
        match = re.fullmatch(re.escape(RUN_LOCK) + r"\.shard-(\d+)-of-(\d+)", path.name)
        if match and _held(path, fcntl.LOCK_EX):
            held.append((int(match.group(1)), int(match.group(2))))
    return sorted(held)


def _held(path: Path, mode: int) -> bool:
    """Whether another process holds `path` so that `mode` cannot be had.
    Takes the lock for an instant when free; RunLock retries past that."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
