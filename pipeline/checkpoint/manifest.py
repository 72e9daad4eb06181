"""The checkpoint: the single source of truth for what is done.

Commit order: a unit's part is published, then its record is written (one
small file, temp + fsync + rename locally, one PUT on an object store). A
part without a record is an orphan, removed at the next start. A commit
writes nothing else and reads nothing, and shards never touch each other's
files: each writer owns the records of its units, its own snapshot and its
own segments (records.py has the schema, segments.py the segments).

Every COMPACT_EVERY_RECORDS commits (and at start and end) a writer
compacts: the units committed since the last compaction go into a new
immutable segment, segments merge in tiers (TIER_FANOUT of a tier into one
of the next, up to TOP_TIER), its snapshot is rewritten to name them, and
only then are the folded records and the merged segments deleted. A unit is
rewritten once per tier it climbs, so a commit's share of the bytes written
stays flat however many parts are done. Readers (`run`, `status`,
`validate`, the `_SUCCESS` check) take every snapshot, its segments and
every record, in the order loading.py explains; a unit seen twice is the
same unit.
"""
from __future__ import annotations

import json
import threading
import time
from array import array
from typing import Any, Iterable

import numpy as np

from ..config.job import JobConfig
from ..errors import JobChangedError
from ..storage.output import Output, Staged
from . import layout, segments
from .fingerprint import describe_change, epoch_of, job_fingerprint
from .layout import Shard
from .loading import load, read_segment
from .records import FORMAT_VERSION, MAX_RUNS_KEPT, UNIT_FIELDS, Ledger, UnitRecord, merge_meta, new_meta, snapshot_json
from .segments import SegmentRef

COMPACT_EVERY_RECORDS = 1000  # a restart reads at most this many records per writer
COMPACT_EVERY_S = 300.0  # ... or what a writer committed in the last five minutes
TIER_FANOUT = 8  # segments of a tier merged into one of the next: each unit rewritten once per tier
# Segments of the top tier (8 ** 2 compactions: 64,000 units at 1,000 a
# compaction, about 0.2 MB) are not merged again: the largest merge, and so
# a commit's share of bytes written, stays bounded at any job size; a reader
# takes one top segment per 64,000 units plus at most 7 of each tier below.
TOP_TIER = 2


class Checkpoint:
    def __init__(self, output: Output, meta: dict[str, Any], ledger: Ledger, shard: Shard | None) -> None:
        self.output = output
        self.meta = meta
        self.ledger = ledger
        self.shard = shard
        self.writer = layout.writer_name(shard)
        self.epoch = epoch_of(meta["fingerprint"])
        self._lock = threading.Lock()  # commits run in threads
        self._compact_lock = threading.Lock()  # one snapshot write at a time, in order
        self._records: list[str] = []  # this writer's record files whose units are not yet in its segments
        self._pending_seqs = array("q")  # ... and those units, with their counters
        self._pending_values = array("q")
        self._segments: list[SegmentRef] = []  # this writer's, as its snapshot names them
        self._in_segments = np.zeros(0, np.int64)  # the units they hold, as read (until _adopt)
        self._last_compact = time.monotonic()

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def read(cls, output: Output, shard: Shard | None = None) -> Checkpoint | None:
        """The whole checkpoint (every writer's), or None when the output has none."""
        loaded = load(output, shard)
        if loaded is None:
            return None
        checkpoint = cls(output, loaded.meta, loaded.ledger, shard)
        checkpoint._records = loaded.own_records
        checkpoint._segments = loaded.own_segments
        checkpoint._in_segments = loaded.own_seqs
        return checkpoint

    @classmethod
    def open(cls, output: Output, job: JobConfig, fingerprint: dict[str, Any], *, restart: bool,
             shard: Shard | None, max_units: int) -> Checkpoint:
        """The output's checkpoint, created if new; refuses progress made by a different job.
        Compacts at once: a restart reads few records."""
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
            existing._adopt()
            existing.compact()
            if shard is None:  # the unsharded writer's segments now hold every shard's units
                for rel in output.list(layout.MANIFEST_DIR, layout.SNAPSHOT_PATTERN):
                    output.delete(rel)
            return existing
        checkpoint = cls(output, new_meta(job.name, fingerprint, layout.part_digits(max_units), _now()), Ledger(), shard)
        checkpoint.compact()
        if shard is not None and not output.exists(layout.MANIFEST):
            output.write(layout.MANIFEST, _dump(snapshot_json(checkpoint.meta, Ledger(), lambda _: False)))
        return checkpoint

    def _adopt(self) -> None:
        """Units this writer owns that none of its segments holds (its records
        not yet compacted, a format-2 snapshot's, other shards' for the
        unsharded writer) go into its next segment."""
        seqs, values = self.ledger.committed_arrays()
        mine = np.isin(seqs, self._in_segments, invert=True)
        if self.shard is not None:
            mine &= seqs % self.shard[1] == self.shard[0]
        self._pending_seqs.frombytes(seqs[mine].tobytes())
        self._pending_values.frombytes(np.ascontiguousarray(values[mine]).tobytes())
        self._in_segments = np.zeros(0, np.int64)

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
            if self.ledger.add(record):
                self._pending_seqs.append(record.seq)
                self._pending_values.extend(record.values())
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

    def compact(self, *, whole: bool = False) -> None:
        """Put the units committed since the last compaction into a new
        segment, merge full tiers, write this writer's snapshot naming the
        segments, then delete the records and segments it replaces. `whole`:
        the snapshot lists every unit inline too (the unsharded writer's
        `_manifest.json` once the job is complete)."""
        with self._compact_lock:
            with self._lock:
                self.meta["updated_at"] = _now()
                seqs, self._pending_seqs = self._pending_seqs, array("q")
                values, self._pending_values = self._pending_values, array("q")
                folded, self._records = self._records, []
                self._last_compact = time.monotonic()
            refs, replaced = list(self._segments), []
            try:
                if seqs:
                    width = len(UNIT_FIELDS)
                    pending = np.frombuffer(seqs, np.int64), np.frombuffer(values, np.int64).reshape(-1, width)
                    refs.append(self._write_segment(*pending, tier=_tier_for(len(seqs))))
                while group := segments.merge_plan(refs, TIER_FANOUT, TOP_TIER):
                    refs = [r for r in refs if r not in group] + [self._merge(group)]
                    replaced += group
                with self._lock:
                    data = snapshot_json(self.meta, self.ledger, lambda seq: layout.owns(self.shard, seq), refs,
                                         inline=whole)
                self.output.write(layout.snapshot_name(self.shard), _dump(data))
            except BaseException:
                # Segments written for it stay unnamed, removed at the next start (clean);
                # never deleted here: a snapshot whose write raised may still have landed.
                with self._lock:
                    self._pending_seqs.extend(seqs)
                    self._pending_values.extend(values)
                    self._records[:0] = folded
                raise
            self._segments = refs
            for rel in folded:
                self.output.delete(rel)
            for ref in replaced:
                self.output.delete(ref.name)

    def _write_segment(self, seqs: np.ndarray, values: np.ndarray, tier: int) -> SegmentRef:
        ref = SegmentRef(segments.segment_name(layout.SEGMENTS_DIR, self.writer, tier), tier, len(seqs))
        self.output.write(ref.name, segments.encode(seqs, values, UNIT_FIELDS, self.epoch))
        return ref

    def _merge(self, group: list[SegmentRef]) -> SegmentRef:
        """One segment of the next tier holding the units of `group` (read back: they are this writer's own)."""
        found = [read_segment(self.output, ref.name) for ref in group]
        seqs = np.concatenate([f[0] for f in found])
        values = np.concatenate([f[1] for f in found])
        seqs, first = np.unique(seqs, return_index=True)  # a unit in two segments (a kill mid-compaction) once
        return self._write_segment(seqs, values[first], tier=max(r.tier for r in group) + 1)

    def refresh(self) -> None:
        """Take in what other writers (shards) have done since this one opened."""
        latest = Checkpoint.read(self.output, self.shard)
        if latest is None:
            return
        with self._lock:
            self.ledger.update(latest.ledger)
            merge_meta(self.meta, latest.meta)

    def record_run(self, run: dict[str, Any], *, whole: bool) -> None:
        """Add a run to the history and compact; `whole` (the job is complete):
        `_manifest.json` lists every unit inline (a shard writes it whole, once)."""
        with self._lock:
            self.meta["runs"] = [*self.meta.get("runs", []), run][-MAX_RUNS_KEPT:]
        self.compact(whole=whole and self.shard is None)
        if whole and self.shard is not None:
            with self._lock:
                data = snapshot_json(self.meta, self.ledger, lambda _: True)
            self.output.write(layout.MANIFEST, _dump(data))

    # -- housekeeping ------------------------------------------------------------------

    def clean(self) -> None:
        """Remove what a killed run left of this writer's units: temp files,
        parts and reject files without a record, journals of committed units,
        another job's records, segments no snapshot names, format 1's partial copies."""
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
        named = {ref.name for ref in self._segments}
        # The unsharded writer's snapshot holds every unit (open): every other writer's segments go too.
        for rel in output.list(layout.SEGMENTS_DIR, layout.segments_pattern(None if shard is None else self.writer)):
            if rel not in named:
                output.delete(rel)
        for rel in output.list(layout.LEGACY_PARTIAL_DIR, "*"):
            if mine(rel):
                output.delete(rel)


def _tier_for(units: int) -> int:
    """The tier of a new segment: 0 for a compaction's, higher for one as
    large as a merge would make (format 2's units, the shards' taken over),
    so it is not rewritten through the tiers below."""
    tier = 0
    while tier < TOP_TIER and units >= COMPACT_EVERY_RECORDS * TIER_FANOUT ** (tier + 1):
        tier += 1
    return tier


def discard_outputs(output: Output) -> None:
    """--restart: remove what earlier runs wrote (only files this tool names).
    `_SUCCESS` and the snapshots go first, then the records and segments, then the parts:
    a kill halfway leaves orphans, never a record of a part that is gone."""
    output.delete(layout.SUCCESS)
    output.delete(layout.MANIFEST)
    for rel in output.list(layout.MANIFEST_DIR, "*.json"):
        output.delete(rel)
    for folder in (layout.RECORDS_DIR, layout.SEGMENTS_DIR, layout.BATCHES_DIR):  # batches: cancelled first by the run (commands/run.py)
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


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["Checkpoint", "FORMAT_VERSION", "describe_change", "discard_outputs", "job_fingerprint"]
