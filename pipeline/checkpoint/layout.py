"""The output's names, and which shard owns which unit: one place for each.

```
part-00000.parquet ...       the rows, in input order (5 digits or more: see part_digits)
_manifest.json               the checkpoint's snapshot (the unsharded writer's own)
_manifest.d/shard-K-of-N.json   a shard's own snapshot
_manifest.d/segments/W.tT.ID.seg   committed units of writer W (all, or shard-K-of-N), tier T, immutable
_manifest.d/units/unit-N.json   one record per committed (or --limit partial) unit
_journal.d/unit-N.journal    answers of a unit not yet committed (a log)
_manifest.d/batches/W.S.json, W.S.requests   a batch of writer W (submission S): its record, what it covers
_journal.d/batch.W.S.journal   a collected batch's answers, kept until the units it serves commit
_rejects.d/part-N.parquet    a unit's rejected rows; merged into _rejects.parquet
_summary.json, _SUCCESS
```
"""
from __future__ import annotations

import re

Shard = tuple[int, int]  # (k, n): the k-th of n shares, 0 <= k < n
SHARD_FORM = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(text: str) -> Shard:
    """"K/N" as a user writes it; ValueError unless 0 <= K < N."""
    match = SHARD_FORM.fullmatch(text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"{text!r} is not K/N with 0 <= K < N")
    return int(match.group(1)), int(match.group(2))

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
REJECTS = "_rejects.parquet"
MANIFEST_DIR = "_manifest.d"
RECORDS_DIR = f"{MANIFEST_DIR}/units"
SEGMENTS_DIR = f"{MANIFEST_DIR}/segments"
BATCHES_DIR = f"{MANIFEST_DIR}/batches"
JOURNAL_DIR = "_journal.d"
REJECTS_DIR = "_rejects.d"
LEGACY_PARTIAL_DIR = "_partial.d"  # format 1 kept --limit's rows here; removed at the next start
FOLDERS = (MANIFEST_DIR, RECORDS_DIR, SEGMENTS_DIR, BATCHES_DIR, JOURNAL_DIR, REJECTS_DIR)
PART_PATTERN = "part-*.parquet"
SNAPSHOT_PATTERN = "shard-*-of-*.json"
RECORD_PATTERN = "unit-*.json"
MIN_PART_DIGITS = 5  # part-00000.parquet: outputs of under 100,000 parts keep the names they always had

_PART = re.compile(r"part-(\d+)\.parquet\Z")
_NUMBERED = re.compile(r"(?:unit|part)-(\d+)\.(?:json|journal|parquet)\Z")


def part_digits(max_units: int) -> int:
    """Digits in part names for an output of at most `max_units` units: name
    order stays input order however many parts there are."""
    return max(MIN_PART_DIGITS, len(str(max(max_units - 1, 0))))


def part_name(seq: int, digits: int) -> str:
    return f"part-{seq:0{digits}d}.parquet"


def rejects_name(seq: int, digits: int) -> str:
    return f"{REJECTS_DIR}/{part_name(seq, digits)}"


def record_name(seq: int) -> str:
    return f"{RECORDS_DIR}/unit-{seq}.json"


def journal_name(seq: int) -> str:
    return f"{JOURNAL_DIR}/unit-{seq}.journal"


def writer_name(shard: Shard | None) -> str:
    """Who wrote a batch: each writer (a shard, or the unsharded run) polls and collects its own."""
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def batch_record_name(writer: str, sub: str) -> str:
    return f"{BATCHES_DIR}/{writer}.{sub}.json"


def batch_requests_name(writer: str, sub: str) -> str:
    return f"{BATCHES_DIR}/{writer}.{sub}.requests"


def batch_journal_name(writer: str, sub: str) -> str:
    return f"{JOURNAL_DIR}/batch.{writer}.{sub}.journal"


def segments_pattern(writer: str | None) -> str:
    """Segment names of one writer, or every writer's."""
    return f"{writer or '*'}.t*.seg"


def batch_records_pattern(writer: str | None) -> str:
    """Record names of one writer's batches, or every writer's."""
    return f"{writer or '*'}.*.json"


def snapshot_name(shard: Shard | None) -> str:
    """The snapshot a writer rewrites: `_manifest.json`, or its shard's own."""
    return MANIFEST if shard is None else f"{MANIFEST_DIR}/shard-{shard[0]}-of-{shard[1]}.json"


def seq_of(rel: str) -> int | None:
    """The unit a part, reject file, record or journal belongs to."""
    match = _NUMBERED.search(rel.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def is_part(rel: str) -> bool:
    return _PART.fullmatch(rel.rsplit("/", 1)[-1]) is not None


def owns(shard: Shard | None, seq: int) -> bool:
    """Shard k of n takes every n-th unit from k; an unsharded run takes all."""
    return shard is None or seq % shard[1] == shard[0]


def units_of(shard: Shard | None, total: int) -> int:
    """How many of `total` units the shard owns."""
    return total if shard is None else len(range(shard[0], total, shard[1]))
