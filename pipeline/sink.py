"""Parquet parts and the job's other files, written so a crash never leaves a
half-written file under a final name: temp name in the same folder, flush,
fsync, `os.replace`, fsync the folder.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig

PART_DIGITS = 5
MAX_PARTS = 10**PART_DIGITS  # keeps name order equal to input order
REJECTS_DIR = "_rejects.d"  # one small file per unit that has rejects; merged into _rejects.parquet
PARTIAL_DIR = "_partial.d"  # rows of a unit cut short by --limit, finished by a later run
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
TEMP_MARK = ".tmp."
REASON_COLUMN = "_reason"
CODE_COLUMN = "_code"
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("error_code", pa.string()), ("part", pa.string())])


def part_name(seq: int) -> str:
    return f"part-{seq:0{PART_DIGITS}d}.parquet"


def temp_path(final: Path) -> Path:
    """A name no reader globs for, that tells which process wrote it."""
    return final.with_name(f".{final.name}{TEMP_MARK}{HOST}.{os.getpid()}")


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync `path` itself: a temp name, renamed into place by the caller."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # a full disk must not leave half a file behind
        raise


def write_atomic(final: Path, data: bytes) -> None:
    tmp = temp_path(final)
    write_durable(tmp, data)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_json_atomic(final: Path, obj: Any) -> None:
    write_atomic(final, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode("utf-8"))


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


def write_table_atomic(final: Path, table: pa.Table) -> None:
    write_atomic(final, table_bytes(table))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temp_files(out_dir: Path) -> list[Path]:
    """Remove temp files left by dead processes of this host (a live one may still be writing)."""
    removed = []
    for folder in (out_dir, out_dir / REJECTS_DIR, out_dir / PARTIAL_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.name
            if not name.startswith(".") or TEMP_MARK not in name:
                continue
            owner = name.rsplit(TEMP_MARK, 1)[1]
            host, _, pid = owner.rpartition(".")
            if host == HOST and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temp of ours at start is a leftover of an earlier process with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def merge_rejects(out_dir: Path, seqs: Iterable[int]) -> int:
    """Rewrite `_rejects.parquet` from the per-unit reject files, in input order."""
    tables = []
    for seq in sorted(seqs):
        path = out_dir / REJECTS_DIR / part_name(seq)
        if path.exists():
            tables.append(pq.read_table(path, schema=REJECT_SCHEMA))
    merged = pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
    write_table_atomic(out_dir / "_rejects.parquet", merged)
    return merged.num_rows
