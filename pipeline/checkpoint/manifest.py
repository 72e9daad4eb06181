"""The checkpoint: the single source of truth for what is done.

Commit order: a unit's part is published, then its record is written (one
small file, temp + fsync + rename locally, one PUT on an object store). A
part without a record is an orphan, removed at the next start. A commit
writes nothing else and reads nothing, so it costs the same at the last part
as at the first, and shards never touch each other's files: each writer owns
the records of its units and its own snapshot (records.py has the schema).

From time to time (and at start and end) a writer compacts its records into
its snapshot, then deletes them. Readers (`run`, `status`, `validate`, the
`_SUCCESS` check) take `_manifest.json`, every shard's snapshot and every
record; a unit seen twice is the same unit.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from . import layout
from ..config.job import JobConfig
from ..core.quantize import columns_fingerprint
from ..errors import ConfigError, JobChangedError
from ..storage.fs import store_error
from .layout import Shard
from .records import FORMAT_VERSION, MAX_RUNS_KEPT, Ledger, UnitRecord, merge_meta, new_meta, parse_snapshot, snapshot_json
from ..inputs.sources import InputFile
from ..storage.output import Output, Staged

COMPACT_EVERY_RECORDS = 1000  # a restart reads at most this many records per writer
COMPACT_EVERY_S = 300.0  # ... or what a writer committed in the last five minutes
READ_THREADS = 16  # records are small: on an object store reading them is all round trips
# S3 itself swaps objects atomically; some S3-compatible stores (moto among
# them) can serve an object half-overwritten, so a torn snapshot is read again.
READ_ATTEMPTS = 5
READ_RETRY_S = 0.2

# What makes the vectors (or the output layout) what they are: changing any
# of these on an output with progress is refused unless --restart.
VECTOR_KEYS = (
    "inputs", "text", "model", "dimensions", "too_long", "max_input_tokens", "empty", "id_column",
    "keep_columns", "vector_column", "rows_per_part", "columns",
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
        "columns": columns_fingerprint(job),
    }


def epoch_of(fingerprint: dict[str, Any]) -> str:
    """Records carry it: a record left by another job (a --restart cut short) is never read as ours."""
    canonical = json.dumps({k: fingerprint.get(k) for k in VECTOR_KEYS}, sort_keys=True, default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


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
        if key == "columns":
            return ("the vector columns changed (output.vector_dtype or output.vectors); with a cache, "
                    "--restart writes the parts again from it without paying for the texts again")
        return f"{key} changed from {old.get(key)!r} to {new.get(key)!r}"
    return None


class Checkpoint:
    def __init__(self, output: Output, meta: dict[str, Any], ledger: Ledger, shard: Shard | None) -> None:
        self.output = output
        self.meta = meta
        self.ledger = ledger
        self.shard = shard
        self.epoch = epoch_of(meta["fingerprint"])
        self._lock = threading.Lock()  # commits run in threads
        self._compact_lock = threading.Lock()  # one snapshot write at a time, in order
        self._records: list[str] = []  # this writer's records not yet in its snapshot
        self._last_compact = time.monotonic()

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def read(cls, output: Output, shard: Shard | None = None) -> Checkpoint | None:
        """The whole checkpoint (every writer's), or None when the output has none."""
        main = _read_json(output, layout.MANIFEST)
        if main is None:
            return None
        meta, records = _parse(output, layout.MANIFEST, main)
        ledger = Ledger()
        for record in records:
            ledger.add(record)
        checkpoint = cls(output, meta, ledger, shard)
        for rel in output.list(layout.MANIFEST_DIR, layout.SNAPSHOT_PATTERN):
            other = _read_json(output, rel)
            if other is None:
                continue
            other_meta, other_records = _parse(output, rel, other)
            if epoch_of(other_meta["fingerprint"]) != checkpoint.epoch:
                continue  # a stale snapshot of another job
            merge_meta(meta, other_meta)
            for record in other_records:
                ledger.add(record)
        for rel, record in checkpoint._read_records():
            ledger.add(record)
            if layout.owns(shard, record.seq):
                checkpoint._records.append(rel)
        return checkpoint

    def _read_records(self) -> list[tuple[str, UnitRecord]]:
        names = self.output.list(layout.RECORDS_DIR, layout.RECORD_PATTERN)
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            found = list(pool.map(self._read_record, names))
        return [(rel, record) for rel, record in zip(names, found) if record is not None]

    def _read_record(self, rel: str) -> UnitRecord | None:
        for attempt in range(READ_ATTEMPTS):
            try:
                obj = json.loads(self.output.read_bytes(rel))
            except FileNotFoundError:
                return None  # compacted meanwhile: its snapshot has it
            except OSError:
                # A store may fail a read of an object deleted under it (compacted by its writer).
                if attempt + 1 < READ_ATTEMPTS and self.output.exists(rel):
                    time.sleep(READ_RETRY_S)
                    continue
                if not self.output.exists(rel):
                    return None
                raise
            except ValueError:
                return None  # torn by a store that is not atomic: its part is an orphan, redone
            try:
                if obj.get("epoch") != self.epoch:
                    return None  # another job's: ignored, and removed by its owner at start
                return UnitRecord.from_json(obj)
            except (ValueError, TypeError, KeyError, AttributeError):
                return None
        return None

    @classmethod
    def open(cls, output: Output, job: JobConfig, fingerprint: dict[str, Any], *, restart: bool,
             shard: Shard | None, max_units: int) -> Checkpoint:
        """The output's checkpoint, created if new; refuses progress made by a different job.
        Writes this writer's snapshot at once: a restart reads few records."""
        existing = cls.read(output, shard)
        if existing is not None and restart:
            discard_outputs(output)
            existing = None
        if existing is not None:
            change = describe_change(existing.meta["fingerprint"], fingerprint)
            if change:
                raise JobChangedError(
                    f"{output} holds progress of a different job: {change}. "
                    f"Rerun with --restart to discard it, or undo the change"
                )
            existing.compact()
            if shard is None:  # the unsharded writer's snapshot now holds every shard's
                for rel in output.list(layout.MANIFEST_DIR, layout.SNAPSHOT_PATTERN):
                    output.delete(rel)
            return existing
        checkpoint = cls(output, new_meta(job.name, fingerprint, layout.part_digits(max_units), _now()), Ledger(), shard)
        checkpoint.compact()
        if shard is not None and not output.exists(layout.MANIFEST):
            output.write(layout.MANIFEST, _dump(snapshot_json(checkpoint.meta, Ledger(), lambda _: False)))
        return checkpoint

    # -- what is done ------------------------------------------------------------------

    @property
    def part_digits(self) -> int:
        return int(self.meta.get("part_digits") or layout.MIN_PART_DIGITS)

    def part_name(self, seq: int) -> str:
        return layout.part_name(seq, self.part_digits)

    def is_done(self, seq: int) -> bool:
        return self.ledger.is_done(seq)

    def partial(self, seq: int) -> UnitRecord | None:
        return self.ledger.partial.get(seq)

    def counters(self) -> dict[str, Any]:
        return self.ledger.counters()

    def complete(self) -> bool:
        total = self.meta.get("total_units")
        return total is not None and self.ledger.committed >= total

    # -- writing ---------------------------------------------------------------------

    def commit(self, record: UnitRecord, staged: Iterable[Staged], stale: Iterable[str] = ()) -> None:
        """Publish a unit's files, then record it. `stale`: files of an earlier
        cut of the unit that its new files do not replace. Blocking (run it in a thread)."""
        for rel in stale:
            self.output.delete(rel)
        files = list(staged)
        for i, file in enumerate(files):
            try:
                file.publish()
            except BaseException:  # a full disk halfway: no staged file may outlive the attempt
                for rest in files[i:]:
                    rest.discard()
                raise
        rel = layout.record_name(record.seq)
        self.output.write(rel, _dump({**record.to_json(), "epoch": self.epoch}))
        with self._lock:
            self.ledger.add(record)
            self._records.append(rel)
            due = len(self._records) >= COMPACT_EVERY_RECORDS or (
                time.monotonic() - self._last_compact >= COMPACT_EVERY_S)
        if due:
            self.compact()

    def learn(self, **values: Any) -> None:
        """Record what the job learned (vector length, probes, totals) in this writer's snapshot."""
        with self._lock:
            self.meta.update(values)
        self.compact()

    def compact(self) -> None:
        """Write this writer's snapshot, then delete the records it now holds."""
        with self._compact_lock:
            with self._lock:
                self.meta["updated_at"] = _now()
                data = snapshot_json(self.meta, self.ledger, lambda seq: layout.owns(self.shard, seq))
                folded, self._records = self._records, []
                self._last_compact = time.monotonic()
            try:
                self.output.write(layout.snapshot_name(self.shard), _dump(data))
            except BaseException:
                with self._lock:
                    self._records[:0] = folded
                raise
            for rel in folded:
                self.output.delete(rel)

    def refresh(self) -> None:
        """Take in what other writers (shards) have done since this one opened."""
        latest = Checkpoint.read(self.output, self.shard)
        if latest is None:
            return
        with self._lock:
            for record in latest.ledger.records():
                self.ledger.add(record)
            merge_meta(self.meta, latest.meta)

    def record_run(self, run: dict[str, Any], *, whole: bool) -> None:
        """Add a run to the history and compact; `whole` (the job is complete):
        a shard also writes the whole checkpoint into `_manifest.json`."""
        with self._lock:
            self.meta["runs"] = [*self.meta.get("runs", []), run][-MAX_RUNS_KEPT:]
        self.compact()
        if whole and self.shard is not None:
            with self._lock:
                data = snapshot_json(self.meta, self.ledger, lambda _: True)
            self.output.write(layout.MANIFEST, _dump(data))

    # -- housekeeping ------------------------------------------------------------------

    def clean(self) -> None:
        """Remove what a killed run left of this writer's units: temp files,
        parts and reject files without a record, journals of committed units,
        another job's records, format 1's partial copies."""
        output, shard = self.output, self.shard
        output.clean_temp_files(layout.FOLDERS)

        def mine(rel: str) -> bool:
            seq = layout.seq_of(rel)
            return seq is not None and layout.owns(shard, seq)

        listed = {seq for seq in [*self.ledger.committed_seqs(), *self.ledger.partial]}
        for rel in [*output.list("", layout.PART_PATTERN), *output.list(layout.REJECTS_DIR, layout.PART_PATTERN)]:
            if mine(rel) and layout.seq_of(rel) not in listed:
                output.delete(rel)
        for rel in output.list_logs(layout.JOURNAL_DIR):
            if mine(rel) and self.is_done(layout.seq_of(rel)):  # type: ignore[arg-type]
                output.delete_log(rel)
        ours = set(self._records)
        for rel in output.list(layout.RECORDS_DIR, layout.RECORD_PATTERN):
            if mine(rel) and rel not in ours:
                output.delete(rel)  # not read as ours: another job's (a --restart cut short), or torn
        for rel in output.list(layout.LEGACY_PARTIAL_DIR, "*"):
            if mine(rel):
                output.delete(rel)


def discard_outputs(output: Output) -> None:
    """--restart: remove what earlier runs wrote (only files this tool names).
    `_SUCCESS` and the snapshots go first, then the records, then the parts:
    a kill halfway leaves orphans, never a record of a part that is gone."""
    output.delete(layout.SUCCESS)
    output.delete(layout.MANIFEST)
    for rel in output.list(layout.MANIFEST_DIR, "*.json"):
        output.delete(rel)
    for folder in (layout.RECORDS_DIR, layout.BATCHES_DIR):  # batches: cancelled first by the run (batches.py)
        for rel in output.list(folder, "*"):
            output.delete(rel)
    for name in (layout.SUMMARY, layout.REJECTS):
        output.delete(name)
    for rel in output.list("", layout.PART_PATTERN):
        output.delete(rel)
    for folder in (layout.REJECTS_DIR, layout.LEGACY_PARTIAL_DIR):
        for rel in output.list(folder, "*"):
            output.delete(rel)
    for rel in output.list_logs(layout.JOURNAL_DIR):
        output.delete_log(rel)


def _parse(output: Output, rel: str, obj: Any) -> tuple[dict[str, Any], list[UnitRecord]]:
    try:
        return parse_snapshot(obj)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{output.display(rel)}: {err}; rerun with --restart to start over") from None


def _read_json(output: Output, rel: str) -> Any:
    """A snapshot, or None when absent; a ConfigError when unreadable."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return json.loads(output.read_bytes(rel))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as err:
            # Caught mid-overwrite by a store that is not atomic, or a read failed under load.
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(READ_RETRY_S)
                continue
            why = "not JSON" if isinstance(err, ValueError) else (err.strerror or store_error(err))
        raise ConfigError(f"{output.display(rel)}: unreadable manifest ({why}); rerun with --restart to start over")
    return None


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["Checkpoint", "FORMAT_VERSION", "describe_change", "discard_outputs", "job_fingerprint"]
