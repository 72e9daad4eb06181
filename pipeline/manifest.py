"""The checkpoint: the single source of truth for what is done.

Commit order is: part file complete on disk -> manifest lists its unit. A part
the manifest does not list is an orphan. Every change is a read-merge-write
under an exclusive file lock, so shards sharing an output never lose each
other's progress.

An object store has no lock. There each writer (the unsharded run, or shard
K/N) rewrites only its own object, `_manifest.json` or
`_manifest.d/shard-K-of-N.json`, and readers merge them all: units only ever
get added, so a merge (a union) loses no shard's commit. The shard that finds
the job complete writes the merged whole into `_manifest.json`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from .config import JobConfig
from .errors import ConfigError, JobChangedError
from .sink import PARTIAL_DIR, REJECTS_DIR, part_name, write_json
from .sources import InputFile
from .storage import Output, error_line

MANIFEST_NAME = "_manifest.json"
SHARD_MANIFESTS = "_manifest.d"  # object stores: one manifest object per shard, merged by readers
FORMAT_VERSION = 1
MAX_RUNS_KEPT = 50  # run history in the manifest stays small
# S3 itself swaps objects atomically; some S3-compatible stores (moto among
# them) can serve an object half-overwritten, so a torn manifest is read again.
REMOTE_READ_ATTEMPTS = 5
REMOTE_READ_RETRY_S = 0.2
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


def merge_manifests(main: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """Pure: `main` with every unit, partial, run and learned value of the
    shards' objects (those of the same job; a stale one of another is ignored)."""
    data = copy.deepcopy(main)
    runs = {json.dumps(r, sort_keys=True): r for r in data.get("runs", [])}
    for other in others:
        if other.get("format_version") != FORMAT_VERSION or other.get("fingerprint") != data.get("fingerprint"):
            continue
        data["units"].update(other.get("units", {}))
        data["partial"].update(other.get("partial", {}))
        for key in ("dimensions", "probes", "total_units", "total_rows"):
            if data.get(key) is None and other.get(key) is not None:
                data[key] = other[key]
        runs.update((json.dumps(r, sort_keys=True), r) for r in other.get("runs", []))
        data["updated_at"] = max(data.get("updated_at") or "", other.get("updated_at") or "")
    for seq in data["units"]:
        data["partial"].pop(seq, None)
    data["runs"] = sorted(runs.values(), key=lambda r: r.get("finished_at") or "")[-MAX_RUNS_KEPT:]
    return data


def manifest_object(shard: tuple[int, int] | None) -> str:
    """The manifest object a writer rewrites on an object store."""
    return MANIFEST_NAME if shard is None else f"{SHARD_MANIFESTS}/shard-{shard[0]}-of-{shard[1]}.json"


@dataclass
class Manifest:
    output: Output
    data: dict[str, Any]
    shard: tuple[int, int] | None = None  # whose object `save` writes on an object store

    @property
    def own(self) -> str:
        return manifest_object(self.shard) if self.output.remote else MANIFEST_NAME

    @property
    def units(self) -> dict[str, dict[str, Any]]:
        return self.data["units"]

    @property
    def partial(self) -> dict[str, dict[str, Any]]:
        return self.data["partial"]

    def is_done(self, seq: int) -> bool:
        return str(seq) in self.units

    @classmethod
    def read(cls, output: Output, shard: tuple[int, int] | None = None) -> Manifest | None:
        """The manifest, or None when the output has none; on an object store,
        `_manifest.json` merged with the shards' objects."""
        data = _read_object(output, MANIFEST_NAME)
        if data is None:
            return None
        if output.remote:
            others = [_read_object(output, rel) for rel in output.list(SHARD_MANIFESTS, "*.json")]
            data = merge_manifests(data, [o for o in others if o is not None])
        return cls(output, data, shard)

    @classmethod
    def open(
        cls, output: Output, job: JobConfig, fingerprint: dict[str, Any], *, restart: bool,
        shard: tuple[int, int] | None = None,
    ) -> Manifest:
        """The output's manifest, created if new; refuses progress made by a different job."""
        with manifest_lock(output):
            existing = cls.read(output, shard)
            if existing is not None and restart:
                discard_outputs(output)
                existing = None
            if existing is not None:
                change = describe_change(existing.data["fingerprint"], fingerprint)
                if change:
                    raise JobChangedError(
                        f"{output} holds progress of a different job: {change}. "
                        f"Rerun with --restart to discard it, or undo the change"
                    )
                return existing
            manifest = cls(
                output,
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
                shard,
            )
            write_json(output, MANIFEST_NAME, manifest.data)
            return manifest

    def refresh(self) -> None:
        """Take what the disk says (hold `manifest_lock`: other shards write it)."""
        latest = Manifest.read(self.output)
        if latest is not None:
            self.data = latest.data

    def save(self, data: dict[str, Any], *, whole: bool = False) -> None:
        """Write `data` (hold `manifest_lock`); it becomes ours only once on disk,
        so a failed write (a full disk) leaves `data` as the disk says. On an
        object store `whole` also writes it (merged: the job is done) into
        `_manifest.json`."""
        data["updated_at"] = _now()
        write_json(self.output, self.own, data)
        if whole and self.own != MANIFEST_NAME:
            write_json(self.output, MANIFEST_NAME, data)
        self.data = data

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read the latest manifest, apply `change`, write it back, all under the lock."""
        with manifest_lock(self.output):
            latest = Manifest.read(self.output)
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


def _read_object(output: Output, rel: str) -> dict[str, Any] | None:
    where = output.display(rel)
    attempts = REMOTE_READ_ATTEMPTS if output.remote else 1
    for attempt in range(attempts):
        try:
            data = json.loads(output.read_bytes(rel))
            break
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            if isinstance(err, ValueError) and attempt + 1 < attempts:
                time.sleep(REMOTE_READ_RETRY_S)  # caught mid-overwrite by a store that is not atomic
                continue
            why = err.strerror if isinstance(err, OSError) and err.strerror else error_line(err)
            raise ConfigError(f"{where}: unreadable manifest ({why}); rerun with --restart to start over") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ConfigError(f"{where}: manifest format {version!r} is not {FORMAT_VERSION}")
    return data


def discard_outputs(output: Output) -> None:
    """--restart: remove what earlier runs wrote (only files this tool names).
    `_SUCCESS` and the manifests go first: a kill halfway leaves orphans,
    never a manifest listing parts that are gone."""
    output.delete(OUTPUT_FILES[0])
    for rel in output.list(SHARD_MANIFESTS, "*.json"):
        output.delete(rel)
    for name in OUTPUT_FILES[1:]:
        output.delete(name)
    for rel in output.list("", "part-*.parquet"):
        output.delete(rel)
    for folder in (REJECTS_DIR, PARTIAL_DIR):
        for rel in output.list(folder, "*"):
            output.delete(rel)


def orphan_parts(output: Output, manifest: Manifest, shard: tuple[int, int] | None = None) -> list[str]:
    """Part files the manifest does not list: written by a run that died before committing.

    On an object store a shard considers only its own parts: another shard's
    part may be uploaded and not yet listed (locally that window is inside
    the manifest lock)."""
    listed = {part_name(int(seq)) for seq in [*manifest.units, *manifest.partial]}
    cut_short = {part_name(int(seq)) for seq in manifest.partial}
    orphans = [p for p in output.list("", "part-*.parquet") if _name(p) not in listed]
    orphans += [p for p in output.list(REJECTS_DIR, "part-*.parquet") if _name(p) not in listed]
    orphans += [p for p in output.list(PARTIAL_DIR, "*.parquet") if _name(p) not in cut_short]
    if output.remote and shard is not None:
        k, n = shard
        orphans = [p for p in orphans if _seq(p) is not None and _seq(p) % n == k]
    return orphans


def _name(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _seq(rel: str) -> int | None:
    match = re.fullmatch(r"part-(\d+)\.parquet", _name(rel))
    return int(match.group(1)) if match else None


def manifest_lock(output: Output) -> contextlib.AbstractContextManager[None]:
    """Serialises manifest updates locally; a no-op on an object store (a writer rewrites only its own object there)."""
    return output.manifest_lock()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
