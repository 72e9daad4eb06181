"""The checkpoint's schema: unit records, the snapshot, and the ledger that
holds them in memory.

A *record* is one small immutable file per unit, written after its part:
`committed` (the part holds all its rows) or `partial` (a `--limit` run cut
it short: the part holds its first `rows` rows). A *snapshot* is one
writer's head (`_manifest.json`, or a shard's own): what the job has learned
(vector length, probe vectors, totals, run history), its partial units, and
the names of its *segments* (segments.py), immutable files of its committed
units. Readers take every snapshot, its segments and the records not yet
compacted; a unit seen twice is the same unit, so the merge is a union.

Format 3 names segments; the snapshot a job's last writer writes into
`_manifest.json` also lists every unit inline. Format 2 (every unit inline
in each writer's snapshot) and format 1 (one manifest rewritten whole at
every commit) are read too: their committed units carry over (a format-1
partial unit is redone), and the next compaction moves them into segments.
Unit and batch records keep format 2: their files are unchanged.

Batch records (a job's batches) are in batch_records.py.
"""
from __future__ import annotations

import copy
import json
from array import array
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, get_args

import numpy as np

from ..inputs.texts import RejectReason
from .segments import SegmentRef

FORMAT_VERSION = 3  # snapshots
READABLE_VERSIONS = (1, 2, 3)
RECORD_VERSION = 2  # unit and batch records: the same files since format 2
MAX_RUNS_KEPT = 50  # run history in a snapshot stays small
V1_PART_DIGITS = 5  # format 1 named parts part-00000.parquet, and never went past 99,999

UnitState = Literal["committed", "partial"]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)


@dataclass(frozen=True)
class UnitRecord:
    seq: int
    state: UnitState
    rows: int  # rows in the part: all of the unit's when committed
    embedded: int
    tokens: int  # paid for this unit's own requests, over every run that worked on it
    deduped: int = 0  # rows embedded without a request: a repeat of a text the run had
    from_cache: int = 0  # ... and rows found in the vector cache
    rejected_empty: int = 0
    rejected_too_long: int = 0
    rejected_provider_rejected: int = 0

    def __post_init__(self) -> None:
        if self.state not in get_args(UnitState):
            raise ValueError(f"unit state {self.state!r}")
        if min(self.values()) < 0 or self.seq < 0:
            raise ValueError("negative counter in a unit record")

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in UNIT_FIELDS)

    @property
    def rejected(self) -> dict[str, int]:
        return {reason: n for reason in REJECT_REASONS if (n := getattr(self, f"rejected_{reason}"))}

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any) -> UnitRecord:
        return cls(**fields_of(cls, obj, "unit record"))

    @classmethod
    def from_values(cls, seq: int, state: UnitState, values: list[int]) -> UnitRecord:
        return cls(seq, state, *values)


UNIT_FIELDS = tuple(f.name for f in fields(UnitRecord) if f.name not in ("seq", "state"))


def fields_of(cls: Any, obj: Any, what: str) -> dict[str, Any]:
    """A record's fields from its JSON; ValueError if it is not one of this format."""
    if not isinstance(obj, dict) or obj.get("format_version") != RECORD_VERSION:
        raise ValueError(f"not a {what} of this format")
    return {f.name: obj[f.name] for f in fields(cls) if f.name in obj}


class Ledger:
    """The units done, compact enough for millions of parts: a bitmap by seq
    for `is_done`, committed units' counters in flat integer arrays, and
    running totals. Partial units (few: only --limit makes them) as records."""

    def __init__(self) -> None:
        self._done = bytearray()
        self._seqs = array("q")
        self._values = array("q")  # len(UNIT_FIELDS) per committed unit, in commit order
        self._totals = [0] * len(UNIT_FIELDS)
        self.partial: dict[int, UnitRecord] = {}

    def add(self, record: UnitRecord) -> bool:
        """Take a record; the same unit seen twice (a snapshot and its record) counts once,
        and a committed unit supersedes a partial one. Whether it newly committed a unit."""
        if self.is_done(record.seq):
            return False
        if record.state == "partial":
            known = self.partial.get(record.seq)
            if known is None or record.rows > known.rows:
                self.partial[record.seq] = record
            return False
        self.partial.pop(record.seq, None)
        self._grow(record.seq)
        byte, bit = divmod(record.seq, 8)
        self._done[byte] |= 1 << bit
        self._seqs.append(record.seq)
        values = record.values()
        self._values.extend(values)
        self._totals = [t + v for t, v in zip(self._totals, values)]
        return True

    def add_committed(self, seqs: np.ndarray, values: np.ndarray) -> None:
        """Take many committed units at once (a segment, another ledger); those done already count once."""
        if not len(seqs):
            return
        seqs = np.asarray(seqs, dtype=np.int64)
        seqs, first = np.unique(seqs, return_index=True)
        values = np.asarray(values, dtype=np.int64).reshape(-1, len(UNIT_FIELDS))[first]
        self._grow(int(seqs[-1]))
        done = np.frombuffer(self._done, dtype=np.uint8)
        new = (done[seqs >> 3] >> (seqs & 7) & 1) == 0
        seqs, values = seqs[new], values[new]
        if not len(seqs):
            return
        bits = np.unpackbits(done, bitorder="little")
        bits[seqs] = 1
        self._done[:] = np.packbits(bits, bitorder="little").tobytes()
        for seq in set(self.partial).intersection(seqs.tolist()):
            del self.partial[seq]
        self._seqs.frombytes(seqs.astype(np.int64).tobytes())
        self._values.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        self._totals = [t + int(v) for t, v in zip(self._totals, values.sum(axis=0))]

    def update(self, other: Ledger) -> None:
        """Take every unit of `other`."""
        self.add_committed(*other.committed_arrays())
        for record in other.partial.values():
            self.add(record)

    def committed_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(seqs, values of shape (units, UNIT_FIELDS)) of the committed units, copies."""
        seqs = np.frombuffer(self._seqs, dtype=np.int64).copy() if self._seqs else np.zeros(0, np.int64)
        values = np.frombuffer(self._values, dtype=np.int64).copy() if self._values else np.zeros(0, np.int64)
        return seqs, values.reshape(len(seqs), len(UNIT_FIELDS))

    def _grow(self, seq: int) -> None:
        byte = seq // 8
        if byte >= len(self._done):
            self._done.extend(bytes(byte + 1 - len(self._done) + len(self._done) // 2))

    def is_done(self, seq: int) -> bool:
        byte, bit = divmod(seq, 8)
        return byte < len(self._done) and bool(self._done[byte] >> bit & 1)

    @property
    def committed(self) -> int:
        return len(self._seqs)

    def committed_seqs(self) -> Iterator[int]:
        return iter(self._seqs)

    def records(self) -> Iterator[UnitRecord]:
        width = len(UNIT_FIELDS)
        for i, seq in enumerate(self._seqs):
            yield UnitRecord.from_values(seq, "committed", list(self._values[i * width:(i + 1) * width]))
        yield from self.partial.values()

    def counters(self) -> dict[str, Any]:
        totals = list(self._totals)
        for record in self.partial.values():
            totals = [t + v for t, v in zip(totals, record.values())]
        named = dict(zip(UNIT_FIELDS, totals))
        return {
            "units_done": self.committed,
            "rows_done": named["rows"],
            "rows_embedded": named["embedded"],
            "rows_rejected": {r: named[f"rejected_{r}"] for r in REJECT_REASONS if named[f"rejected_{r}"]},
            "tokens": named["tokens"],
            "rows_deduped": named["deduped"],
            "rows_from_cache": named["from_cache"],
        }

    def units_json(self, keep: Callable[[int], bool]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(committed, partial) as {seq: [values in UNIT_FIELDS order]} for the units `keep` says."""
        width = len(UNIT_FIELDS)
        values = self._values.tolist()
        committed = {str(seq): values[i * width:(i + 1) * width] for i, seq in enumerate(self._seqs) if keep(seq)}
        return committed, self.partial_json(keep)

    def partial_json(self, keep: Callable[[int], bool]) -> dict[str, list[int]]:
        return {str(seq): list(r.values()) for seq, r in self.partial.items() if keep(seq)}


# -- snapshots -------------------------------------------------------------------------

LEARNED_KEYS = ("dimensions", "probes", "total_units", "total_rows")


def new_meta(job: str, fingerprint: dict[str, Any], part_digits: int, now: str) -> dict[str, Any]:
    """What a snapshot says besides its units: the job, what produced it, what it learned."""
    return {
        "format_version": FORMAT_VERSION,
        "job": job,
        "created_at": now,
        "updated_at": now,
        "fingerprint": fingerprint,
        "part_digits": part_digits,
        "dimensions": None,  # learned from the first answer
        "probes": None,
        "total_units": None,  # known once a run has read every input
        "total_rows": None,
        "runs": [],
    }


def snapshot_json(meta: dict[str, Any], ledger: Ledger, keep: Callable[[int], bool],
                  segments: Sequence[SegmentRef] = (), *, inline: bool = True) -> dict[str, Any]:
    """A writer's snapshot: its segments, and its committed units inline
    too when `inline` (the whole checkpoint, or format 2's way)."""
    committed, partial = ledger.units_json(keep) if inline else ({}, ledger.partial_json(keep))
    return {**meta, "format_version": FORMAT_VERSION, "counters": ledger.counters(),
            "unit_fields": list(UNIT_FIELDS), "units": committed, "partial": partial,
            "segments": [s.to_json() for s in segments]}


def snapshot_segments(obj: Any) -> list[SegmentRef]:
    """The segments a snapshot names (none before format 3); ValueError if malformed."""
    if not isinstance(obj, dict):
        raise ValueError("not a snapshot")
    refs = obj.get("segments", [])
    if not isinstance(refs, list):
        raise ValueError("manifest segments is not a list")
    return [SegmentRef.from_json(r) for r in refs]


def parse_snapshot(obj: Any) -> tuple[dict[str, Any], list[UnitRecord]]:
    """(meta, inline unit records) of a snapshot of any readable format; ValueError if it is none."""
    if not isinstance(obj, dict) or obj.get("format_version") not in READABLE_VERSIONS:
        version = obj.get("format_version") if isinstance(obj, dict) else None
        raise ValueError(f"manifest format {version!r} is not one of {READABLE_VERSIONS}")
    meta = {k: copy.deepcopy(v) for k, v in obj.items()
            if k not in ("units", "partial", "counters", "unit_fields", "segments")}
    meta.setdefault("runs", [])
    for key in LEARNED_KEYS:
        meta.setdefault(key, None)
    meta["format_version"] = FORMAT_VERSION
    if obj["format_version"] == 1:
        meta["part_digits"] = V1_PART_DIGITS
        records = [_v1_unit(int(seq), unit) for seq, unit in obj.get("units", {}).items()]
        return meta, records  # a format-1 partial unit is redone: its rows kept no journal
    names = obj.get("unit_fields")
    if not isinstance(names, list) or set(names) - set(UNIT_FIELDS):
        raise ValueError("manifest unit_fields unknown")
    records = []
    for state, units in (("committed", obj.get("units", {})), ("partial", obj.get("partial", {}))):
        for seq, values in units.items():
            named = dict(zip(names, values))
            records.append(UnitRecord(int(seq), state, **named))  # type: ignore[arg-type]
    return meta, records


def snapshot_meta(obj: Any) -> dict[str, Any]:
    """What a snapshot says besides its units (its inline units left unread); ValueError as parse_snapshot."""
    if isinstance(obj, dict) and obj.get("format_version") != 1:
        obj = {**obj, "units": {}, "partial": {}}
    return parse_snapshot(obj)[0]


def snapshot_units(obj: Any) -> tuple[np.ndarray, np.ndarray, list[UnitRecord]]:
    """A snapshot's inline units as arrays (committed seqs, their values in
    UNIT_FIELDS order) and its partial records: a whole checkpoint of a
    million units reads in a second. ValueError as parse_snapshot."""
    if not isinstance(obj, dict) or obj.get("format_version") == 1:
        _, found = parse_snapshot(obj)
        committed = [r for r in found if r.state == "committed"]
        seqs = np.array([r.seq for r in committed], dtype=np.int64)
        values = np.array([r.values() for r in committed], dtype=np.int64).reshape(len(committed), len(UNIT_FIELDS))
        return seqs, values, [r for r in found if r.state == "partial"]
    parse_snapshot({**obj, "units": {}})  # the format, the fields and the partial units checked
    names = list(obj["unit_fields"])
    units = obj.get("units", {})
    if not isinstance(units, dict):
        raise ValueError("manifest units is not a mapping")
    seqs = np.fromiter((int(seq) for seq in units), dtype=np.int64, count=len(units))
    given = np.array(list(units.values()), dtype=np.int64).reshape(len(units), len(names))
    if len(seqs) and (seqs.min() < 0 or given.min() < 0):
        raise ValueError("negative counter in a manifest unit")
    values = unit_values(given, names)
    partial = [UnitRecord(int(seq), "partial", **dict(zip(names, v)))  # type: ignore[arg-type]
               for seq, v in obj.get("partial", {}).items()]
    return seqs, values, partial


def unit_values(given: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Counters stored as columns `names` (a snapshot's or a segment's) in UNIT_FIELDS order;
    a field an older writer did not know is 0."""
    if set(names) - set(UNIT_FIELDS):
        raise ValueError(f"unknown unit fields {sorted(set(names) - set(UNIT_FIELDS))}")
    values = np.zeros((len(given), len(UNIT_FIELDS)), dtype=np.int64)
    for i, name in enumerate(names):
        values[:, UNIT_FIELDS.index(name)] = given[:, i]
    return values


def _v1_unit(seq: int, unit: Mapping[str, Any]) -> UnitRecord:
    rejected = unit.get("rejected", {})
    return UnitRecord(
        seq, "committed", unit["rows"], unit["embedded"], unit["tokens"], unit.get("deduped", 0),
        unit.get("from_cache", 0), **{f"rejected_{r}": rejected.get(r, 0) for r in REJECT_REASONS},
    )


def merge_meta(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Learned values another writer has and `into` lacks, and its runs (a union, by finish time)."""
    for key in LEARNED_KEYS:
        if into.get(key) is None and other.get(key) is not None:
            into[key] = copy.deepcopy(other[key])
    runs = {json.dumps(r, sort_keys=True): r for r in [*into.get("runs", []), *other.get("runs", [])]}
    into["runs"] = sorted(runs.values(), key=lambda r: r.get("finished_at") or "")[-MAX_RUNS_KEPT:]
    into["updated_at"] = max(into.get("updated_at") or "", other.get("updated_at") or "")
