"""Reading the whole checkpoint (every writer's) in an order that cannot miss a unit.

A writer compacts in this order: it writes its new segments, then its
snapshot naming them, and only then deletes the records and the segments
they replace. So a reader lists (and reads) the records first and the
snapshots after: a record deleted under it was folded into a snapshot
written before the deletion, which it reads later. A snapshot names
segments; one found gone was merged into a segment that a newer snapshot
names, so the read starts over (rare: a merge is a few per thousand
compactions) rather than take a stale view.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np

from ..errors import ConfigError
from ..storage.fs import store_error
from ..storage.output import Output
from . import layout, segments
from .fingerprint import epoch_of
from .layout import Shard
from .records import Ledger, UnitRecord, merge_meta, snapshot_meta, snapshot_segments, snapshot_units, unit_values
from .segments import SegmentRef

READ_THREADS = 16  # records and segments are many small reads: on an object store, all round trips
# S3 itself swaps objects atomically; some S3-compatible stores (moto among
# them) can serve an object half-overwritten, so a torn snapshot is read again.
READ_ATTEMPTS = 5
READ_RETRY_S = 0.2
RACE_ATTEMPTS = 50  # reads started over because another writer merged meanwhile: each race is one merge


T = TypeVar("T")


@dataclass
class Loaded:
    meta: dict[str, Any]
    ledger: Ledger
    own_records: list[str] = field(default_factory=list)  # the reading writer's record files read
    own_segments: list[SegmentRef] = field(default_factory=list)  # as its snapshot names them
    own_seqs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the units in them


class _Vanished(Exception):
    """A snapshot or a segment named a moment ago is gone: another writer compacted."""


def load(output: Output, shard: Shard | None) -> Loaded | None:
    """The whole checkpoint, or None when the output has none; `shard`: whose files are "own"."""
    for _ in range(RACE_ATTEMPTS):
        try:
            return _load_once(output, shard)
        except _Vanished:
            continue
    raise ConfigError(f"{output}: the checkpoint changed under {RACE_ATTEMPTS} reads in a row; run the command again")


def _load_once(output: Output, shard: Shard | None) -> Loaded | None:
    names = output.list(layout.RECORDS_DIR, layout.RECORD_PATTERN)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        raw = list(pool.map(lambda rel: _read_record(output, rel), names))
    main = read_json(output, layout.MANIFEST)
    if main is None:
        return None
    heads = [(layout.MANIFEST, main)]
    for rel in output.list(layout.MANIFEST_DIR, layout.SNAPSHOT_PATTERN):
        obj = read_json(output, rel)
        if obj is None:
            raise _Vanished(rel)  # the unsharded writer took the shards' snapshots over meanwhile
        heads.append((rel, obj))
    meta = parse(output, layout.MANIFEST, main)
    epoch = epoch_of(meta["fingerprint"])
    loaded = Loaded(meta, Ledger())
    own = layout.snapshot_name(shard)
    for rel, obj in heads:
        try:
            head_meta = snapshot_meta(obj) if rel != layout.MANIFEST else meta
            seqs, values, partial = snapshot_units(obj)
            refs = snapshot_segments(obj)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{output.display(rel)}: {err}; rerun with --restart to start over") from None
        if rel != layout.MANIFEST:
            if epoch_of(head_meta["fingerprint"]) != epoch:
                continue  # a stale snapshot of another job
            merge_meta(meta, head_meta)
        loaded.ledger.add_committed(seqs, values)
        for record in partial:
            loaded.ledger.add(record)
        found = _read_segments(output, refs, epoch)
        for seg_seqs, seg_values in found:
            loaded.ledger.add_committed(seg_seqs, seg_values)
        if rel == own:
            loaded.own_segments = refs
            loaded.own_seqs = np.concatenate([s for s, _ in found]) if found else loaded.own_seqs
    for rel, obj in zip(names, raw):
        record = _record(obj, epoch)
        if record is not None:
            loaded.ledger.add(record)
            if layout.owns(shard, record.seq):
                loaded.own_records.append(rel)
    return loaded


def _read_segments(output: Output, refs: list[SegmentRef], epoch: str) -> list[tuple[np.ndarray, np.ndarray]]:
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        found = list(pool.map(lambda ref: read_segment(output, ref.name), refs))
    return [(seqs, values) for seqs, values, seg_epoch in found if seg_epoch == epoch]


def read_segment(output: Output, rel: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(seqs, values in UNIT_FIELDS order, epoch) of a segment; _Vanished when it is gone."""
    found = _read_checked(output, rel, segments.decode, "checkpoint segment")
    if found is None:
        raise _Vanished(rel)
    seqs, given, names, epoch = found
    try:
        return seqs, unit_values(given, names), epoch
    except ValueError as err:
        raise ConfigError(f"{output.display(rel)}: {err}; rerun with --restart to start over") from None


def _read_record(output: Output, rel: str) -> Any:
    """A record's JSON, or None when it is gone (compacted: a snapshot read after has it) or torn."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return json.loads(output.read_bytes(rel))
        except FileNotFoundError:
            return None
        except OSError:
            # A store may fail a read of an object deleted under it (compacted by its writer).
            if attempt + 1 < READ_ATTEMPTS and output.exists(rel):
                time.sleep(READ_RETRY_S)
                continue
            if not output.exists(rel):
                return None
            raise
        except ValueError:
            return None  # torn by a store that is not atomic: its part is an orphan, redone
    return None


def _record(obj: Any, epoch: str) -> UnitRecord | None:
    try:
        if obj is None or obj.get("epoch") != epoch:
            return None  # another job's: ignored, and removed by its owner at start
        return UnitRecord.from_json(obj)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def parse(output: Output, rel: str, obj: Any) -> dict[str, Any]:
    """A snapshot's meta; a ConfigError (start over) when it is no snapshot of a known format."""
    try:
        return snapshot_meta(obj)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{output.display(rel)}: {err}; rerun with --restart to start over") from None


def read_json(output: Output, rel: str) -> Any:
    """A snapshot, or None when absent; a ConfigError when unreadable."""
    return _read_checked(output, rel, json.loads, "manifest")


def _read_checked(output: Output, rel: str, decode: Callable[[bytes], T], what: str) -> T | None:
    """`decode` of the bytes of `rel`, or None when absent. A read that fails
    under load, or an object caught mid-overwrite by a store that is not
    atomic, is tried again; then a ConfigError."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return decode(output.read_bytes(rel))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as err:
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(READ_RETRY_S)
                continue
            why = str(err) if isinstance(err, ValueError) else (err.strerror or store_error(err))
            if isinstance(err, json.JSONDecodeError):
                why = "not JSON"
            raise ConfigError(f"{output.display(rel)}: unreadable {what} ({why}); rerun with --restart to start over")
    return None
