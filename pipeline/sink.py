"""Parquet parts and the job's other files, in the output layout. Writing
them so a crash never leaves a half-written file under a final name is
storage.py's part (temp + fsync + rename locally, whole-object PUTs on an
object store).
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig
from .storage import TEMP_MARK, Output  # noqa: F401  (TEMP_MARK: the tests look for leftovers by it)

PART_DIGITS = 5
MAX_PARTS = 10**PART_DIGITS  # keeps name order equal to input order
REJECTS_DIR = "_rejects.d"  # one small file per unit that has rejects; merged into _rejects.parquet
PARTIAL_DIR = "_partial.d"  # rows of a unit cut short by --limit, finished by a later run
REASON_COLUMN = "_reason"
CODE_COLUMN = "_code"
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("error_code", pa.string()), ("part", pa.string())])


def part_name(seq: int) -> str:
    return f"part-{seq:0{PART_DIGITS}d}.parquet"


def write_json(output: Output, rel: str, obj: Any) -> None:
    output.write(rel, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode("utf-8"))


def table_bytes(table: pa.Table) -> bytes:
    # Vector values never repeat and no reader filters on their min/max: a
    # dictionary and statistics are work for nothing. Split into byte streams
    # they compress better and faster (bench/README.md).
    vectors = [f.name for f in table.schema
               if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]
    others = [n for n in table.column_names if n not in vectors]
    buf = io.BytesIO()
    pq.write_table(
        table, buf, compression="zstd", use_dictionary=others, write_statistics=others,
        column_encoding={f"{n}.list.element": "BYTE_STREAM_SPLIT" for n in vectors} or None,
    )
    return buf.getvalue()


def vector_array(vectors: np.ndarray, has_vector: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    mask = None if has_vector.all() else pa.array(~has_vector)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def id_array(table: pa.Table, job: JobConfig, row_offset: int) -> pa.Array:
    if job.input.id_column:
        return table.column(job.input.id_column).combine_chunks()
    return pa.array(np.arange(row_offset, row_offset + table.num_rows, dtype=np.int64))


def part_table(job: JobConfig, table: pa.Table, row_offset: int, vectors: pa.Array, dim: int) -> pa.Table:
    """id, keep_columns, vector: the output layout, with the job's metadata."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {job.id_column_out: id_array(table, job, row_offset)}
    for name in job.input.keep_columns:
        if name not in columns:
            columns[name] = table.column(name)
    columns[job.output.vector_column] = vectors
    out = pa.table(columns)
    meta = {
        "pipeline.job": job.name,
        "pipeline.model": job.embedding.model,
        "pipeline.dimensions": str(dim),
        "pipeline.vector_column": job.output.vector_column,
    }
    return out.replace_schema_metadata(meta)


def rejects_table(ids: Iterable[object], reasons: Iterable[str], codes: Iterable[str | None], part: str) -> pa.Table:
    ids = [str(i) for i in ids]
    return pa.table(
        {"id": ids, "reason": list(reasons), "error_code": list(codes), "part": [part] * len(ids)},
        schema=REJECT_SCHEMA,
    )


def merge_rejects(output: Output, seqs: Iterable[int]) -> int:
    """Rewrite `_rejects.parquet` from the per-unit reject files, in input order."""
    present = set(output.list(REJECTS_DIR, "part-*.parquet"))
    tables = []
    for seq in sorted(seqs):
        rel = f"{REJECTS_DIR}/{part_name(seq)}"
        if rel in present:
            tables.append(output.read_table(rel, schema=REJECT_SCHEMA))
    merged = pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
    output.write("_rejects.parquet", table_bytes(merged))
    return merged.num_rows
