"""Snapshot segments: a writer's committed units in immutable files, merged in tiers.

A compaction writes the units committed since the last one as a new segment
of tier 0 (`_manifest.d/segments/W.tT.ID.seg`, W the writer); when a tier
holds `fanout` segments they are merged into one of the next tier, up to a
top tier whose segments are never merged again. A unit is rewritten once
per tier it climbs, so the bytes a commit costs grow with the number of
tiers (the log of the parts done, capped), never with the parts done; and a
reader reads at most `fanout - 1` segments per tier below the top, plus the
top tier's (one per `fanout ** top` compactions' worth of units).

A segment is never changed: a merge writes the merged segment, then the
writer's snapshot naming it, and only then deletes what it replaced, so a
reader that finds a named segment gone reads the snapshot again.

Format: a JSON header line (format, unit fields, count, epoch), then zlib of
the units' seqs (deltas) and their counters, column by column, little-endian
int64. Pure: no I/O here.
"""
from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

MAGIC = b"ECS1\n"
SEGMENTS_VERSION = 1
ZLIB_LEVEL = 6  # counters are runs of small integers: ~3 bytes a unit at level 6, ~60 MB/s


@dataclass(frozen=True)
class SegmentRef:
    """A segment as its writer's snapshot names it."""

    name: str
    tier: int
    units: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tier": self.tier, "units": self.units}

    @classmethod
    def from_json(cls, obj: Any) -> SegmentRef:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError("a segment reference without a name")
        return cls(obj["name"], int(obj["tier"]), int(obj["units"]))


def segment_name(folder: str, writer: str, tier: int) -> str:
    """A new segment's name: never reused, so a name always means the same bytes."""
    return f"{folder}/{writer}.t{tier}.{uuid.uuid4().hex[:16]}.seg"


def encode(seqs: np.ndarray, values: np.ndarray, fields: Sequence[str], epoch: str) -> bytes:
    """A segment of units `seqs` (any order, no repeats) with `values` (one row of `fields` each)."""
    order = np.argsort(seqs, kind="stable")
    seqs = np.asarray(seqs, dtype="<i8")[order]
    values = np.asarray(values, dtype="<i8").reshape(len(seqs), len(fields))[order]
    header = {"format": SEGMENTS_VERSION, "unit_fields": list(fields), "units": int(len(seqs)), "epoch": epoch}
    deltas = np.diff(seqs, prepend=np.int64(0)).astype("<i8")
    body = deltas.tobytes() + np.ascontiguousarray(values.T).tobytes()
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n" + zlib.compress(body, ZLIB_LEVEL)


def decode(data: bytes) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(seqs, values of shape (units, fields), the field names, epoch); ValueError if it is not a whole segment."""
    if not data.startswith(MAGIC):
        raise ValueError("not a checkpoint segment")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end])
        fields, n = list(header["unit_fields"]), int(header["units"])
        body = zlib.decompress(data[end + 1:])
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise ValueError(f"a damaged checkpoint segment ({err})") from None
    if header.get("format") != SEGMENTS_VERSION or len(body) != 8 * n * (1 + len(fields)):
        raise ValueError("a checkpoint segment of another format, or cut short")
    flat = np.frombuffer(body, dtype="<i8")
    seqs = np.cumsum(flat[:n])
    values = flat[n:].reshape(len(fields), n).T
    if n and (seqs[0] < 0 or (np.diff(seqs) <= 0).any() or values.min() < 0):
        raise ValueError("a checkpoint segment with units out of order or negative counters")
    return seqs, values, fields, str(header.get("epoch"))


def merge_plan(refs: Sequence[SegmentRef], fanout: int, top_tier: int) -> list[SegmentRef]:
    """The segments to merge next: the `fanout` oldest of the lowest tier
    below `top_tier` that holds that many; [] when none does."""
    for tier in sorted({r.tier for r in refs}):
        if tier >= top_tier:
            break
        group = [r for r in refs if r.tier == tier]
        if len(group) >= fanout:
            return group[:fanout]
    return []
