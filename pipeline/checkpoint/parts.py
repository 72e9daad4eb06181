"""Parquet parts and the job's other files, in the output layout.

A part is written as its rows come, in input order: one row group per slice
of the unit, streamed to a staged file (storage/output.py) that appears under its
final name only when the checkpoint commits it. Memory holds one slice's
vectors, never a whole part.
"""
from __future__ import annotations

import io
import json
import threading
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config.job import JobConfig
from ..storage.output import Output, Staged
from . import layout
from .columns import VectorColumns

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("error_code", pa.string()), ("part", pa.string())])
COMPRESSION = "zstd"
WRITE_LOCK = threading.Lock()  # parts are written from worker threads
# Row groups of about this much of vectors: writing one holds a few times its
# size (levels, the split streams, the compressed pages), and readers handle
# them well (a 1,536-float row group is 682 rows). 4 MiB rather than 8 takes
# about 40 MB off a run's peak for no measurable CPU.
ROW_GROUP_BYTES = 4 * 2**20


def write_json(output: Output, rel: str, obj: Any) -> None:
    output.write(rel, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode("utf-8"))


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Vector values never repeat and no reader filters on their min/max: a
    dictionary and statistics are work for nothing. float32 split into byte
    streams compresses better and faster (bench/README.md); float16 and bits
    are written plain (a float16's two bytes split gain little, and not every
    reader decodes split halffloats). int8 is the exception to the dictionary
    rule: Parquet stores an int8 in an INT32, and its 256 values as dictionary
    indices take a byte each (bench/quality.py: 0.85 bytes a dimension on
    disk, against 1.3 plain)."""
    vectors = [f.name for f in schema if _is_vector(f.type)]
    floats = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_float32(f.type.value_type)]
    codes = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_int8(f.type.value_type)]
    others = [n for n in schema.names if n not in vectors]
    return {
        "compression": COMPRESSION,
        "use_dictionary": others + [f"{n}.list.element" for n in codes] if codes else others,
        "write_statistics": others,
        "column_encoding": {f"{n}.list.element": "BYTE_STREAM_SPLIT" for n in floats} or None,
    }


def _is_vector(t: pa.DataType) -> bool:
    if pa.types.is_fixed_size_list(t):
        return pa.types.is_floating(t.value_type) or pa.types.is_int8(t.value_type)
    return pa.types.is_fixed_size_binary(t)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_options(table.schema))
    return buf.getvalue()


def vector_array(vectors: np.ndarray, has_vector: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    if has_vector.all():
        return pa.FixedSizeListArray.from_arrays(values, dim)
    # The validity bitmap made here: from_arrays(mask=) inverts its mask with
    # pyarrow.compute, a 14 ms import for one bitwise not.
    validity = pa.py_buffer(np.packbits(has_vector, bitorder="little"))
    return pa.Array.from_buffers(pa.list_(pa.float32(), dim), len(has_vector), [validity], children=[values])


def id_array(table: pa.Table, job: JobConfig, row_offset: int) -> pa.Array:
    if job.input.id_column:
        return table.column(job.input.id_column).combine_chunks()
    return pa.array(np.arange(row_offset, row_offset + table.num_rows, dtype=np.int64))


def part_table(job: JobConfig, table: pa.Table, row_offset: int, vectors: dict[str, pa.Array], dim: int,
               meta: dict[str, str] | None = None) -> pa.Table:
    """id, keep_columns, the vector columns: the output layout, with the job's metadata."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {job.id_column_out: id_array(table, job, row_offset)}
    for name in job.input.keep_columns:
        if name not in columns:
            columns[name] = table.column(name)
    columns.update(vectors)
    out = pa.table(columns)
    return out.replace_schema_metadata({
        "pipeline.job": job.name,
        "pipeline.model": job.embedding.model,
        "pipeline.dimensions": str(dim),
        "pipeline.vector_column": job.output.vector_column,
        **(meta or {}),
    })


def rejects_table(ids: Iterable[object], reasons: Iterable[str], codes: Iterable[str | None], part: str) -> pa.Table:
    ids = [str(i) for i in ids]
    return pa.table(
        {"id": ids, "reason": list(reasons), "error_code": list(codes), "part": [part] * len(ids)},
        schema=REJECT_SCHEMA,
    )


class PartWriter:
    """One unit's part, a row group at a time in input order, and its rejected rows."""

    def __init__(self, output: Output, job: JobConfig, seq: int, digits: int, dim: int,
                 columns: VectorColumns | None = None) -> None:
        self._output = output
        self._job = job
        self._dim = dim
        self._columns = columns or VectorColumns(job, output, None, dim)
        # Rows held back while an int8 column has no ranges yet (none of the
        # output's rows had a vector): a part's metadata is written first.
        self._held: list[pa.Table] = []
        self.name = layout.part_name(seq, digits)
        self._rejects_name = layout.rejects_name(seq, digits)
        self._staged = output.stage(self.name)
        self._writer: pq.ParquetWriter | None = None
        self._rejected: tuple[list[object], list[str], list[str | None]] = ([], [], [])
        self.rows = 0
        self.stale: list[str] = []  # files of an earlier --limit cut of this unit, removed once it commits

    def write(self, table: pa.Table, row_offset: int, vectors: pa.Array,
              reasons: list[str | None], codes: list[str | None]) -> None:
        """The next rows of the part: their input columns, vectors (float32; each
        vector column is made from them), and why a row has none."""
        part = part_table(self._job, table, row_offset, self._columns.arrays(vectors), self._dim)
        self._held.append(part)
        if self._writer is not None or self._columns.ranges_known():
            self._write_held()
        rejected = [i for i, reason in enumerate(reasons) if reason is not None]
        if rejected:
            ids, why, error_codes = self._rejected
            column = part.column(0)
            ids.extend(column[i].as_py() for i in rejected)  # not take(): it loads pyarrow.compute for a few rows
            why.extend(reasons[i] for i in rejected)  # type: ignore[misc]
            error_codes.extend(codes[i] for i in rejected)
        self.rows += part.num_rows

    def _write_held(self) -> None:
        with WRITE_LOCK:  # encoding a row group holds buffers the size of its vectors: one at a time
            if self._writer is None:
                schema = self._held[0].schema.with_metadata({**self._held[0].schema.metadata,
                                                             **{k.encode(): v.encode() for k, v in self._columns.metadata().items()}})
                self._writer = pq.ParquetWriter(self._staged.path, schema, **parquet_options(schema))
            for part in self._held:
                self._writer.write_table(part.replace_schema_metadata(self._writer.schema.metadata),
                                         row_group_size=max(1, ROW_GROUP_BYTES // (4 * self._dim)))
            self._held.clear()

    def finish(self) -> list[Staged]:
        """Close the part (fsynced at publish); stage its reject file. What the checkpoint commits."""
        if self._held:
            self._write_held()
        assert self._writer is not None, "a part holds at least one row"
        self._writer.close()
        staged = [self._staged]
        ids, why, error_codes = self._rejected
        if ids:
            rejects = self._output.stage(self._rejects_name)
            try:
                rejects.path.write_bytes(table_bytes(rejects_table(ids, why, error_codes, self.name)))
            except BaseException:  # a full disk: neither file may outlive the attempt
                rejects.discard()
                self._staged.discard()
                raise
            staged.append(rejects)
        else:
            self.stale.append(self._rejects_name)
        return staged

    def discard(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file goes anyway
                pass
        self._staged.discard()


def merge_rejects(output: Output, seqs: Iterable[int], digits: int) -> int:
    """Rewrite `_rejects.parquet` from the per-unit reject files, in input order."""
    present = set(output.list(layout.REJECTS_DIR, layout.PART_PATTERN))
    tables = []
    for seq in sorted(seqs):
        rel = layout.rejects_name(seq, digits)
        if rel in present:
            tables.append(output.read_table(rel, schema=REJECT_SCHEMA))
    merged = pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
    output.write(layout.REJECTS, table_bytes(merged))
    return merged.num_rows
