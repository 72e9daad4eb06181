"""The output's vector columns: one float32 answer -> every column the job names.

`output.vector_column` (the whole vector, `output.vector_dtype`) and each of
`output.vectors` ({column, dtype, dimensions}) are made from the same row
vectors by core/quantize.py, so one paid call feeds them all, on the
synchronous and the Batch API paths alike (both write through parts.py).

int8 ranges are calibrated once per output, from the first answers a writer
is about to write, and recorded before any part uses them in the checkpoint
folder (`_manifest.d/int8-ranges.COLUMN.json`), with `Output.write_once`:
the first writer's file stays, and every other writer (a shard beside it, a
rerun after a SIGKILL) reads that file and uses its ranges. Why not a
deterministic calibration: nothing every shard can compute without paying is
calibration data (a shard owns none of unit 0's rows, and a provider's
vectors for the same text differ in the last bits between calls), and fixed
ranges from the vector length alone lose the per-dimension spread that int8
needs to keep recall. A --restart discards the file with the rest of the
checkpoint. Every part names each column's dtype, length and int8 ranges in
its Parquet metadata (`pipeline.columns`).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config.job import JobConfig, VectorDtype
from ..core import quantize
from ..core.quantize import Int8Ranges
from ..errors import ConfigError
from ..storage.output import Output
from . import layout

COLUMNS_META = "pipeline.columns"  # a part's schema metadata: JSON list of its vector columns
READ_ATTEMPTS = 5  # another writer's ranges, read again while torn (a store without atomic create)
READ_RETRY_S = 0.2


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: VectorDtype
    dimensions: int  # components the column keeps (the vector's own length, or a prefix)
    prefix: bool  # a Matryoshka prefix: renormalised before the cast

    def arrow_type(self) -> pa.DataType:
        if self.dtype == "binary":
            return pa.binary(-(-self.dimensions // 8))
        value = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8()}[self.dtype]
        return pa.list_(value, self.dimensions)


def ranges_name(column: str) -> str:
    """The column's int8 ranges in the checkpoint folder (a safe file name, unique per column)."""
    safe = re.sub(r"[^\w.-]", "_", column)[:60]
    digest = hashlib.blake2b(column.encode("utf-8"), digest_size=4).hexdigest()
    return f"{layout.MANIFEST_DIR}/int8-ranges.{safe}.{digest}.json"


class VectorColumns:
    """The job's vector columns for vectors of `dim` components; shared by a run's part writers."""

    def __init__(self, job: JobConfig, output: Output, epoch: str | None, dim: int) -> None:
        quantize.check_vector_columns(job, dim, where="the provider's")
        self.dim = dim
        self.specs = [ColumnSpec(c.column, c.dtype, quantize.column_dimensions(c, dim),
                                 c.dimensions is not None and c.dimensions < dim) for c in job.output.columns]
        self.plain = len(self.specs) == 1 and self.specs[0].dtype == "float32"  # today's output: written as it comes
        self._output = output
        self._epoch = epoch
        self._ranges: dict[str, Int8Ranges] = {}
        self._lock = threading.Lock()  # parts are written from worker threads

    # -- the arrays -----------------------------------------------------------------------

    def arrays(self, vectors: pa.FixedSizeListArray) -> dict[str, pa.Array]:
        """Each column's array for these rows (null where `vectors` is null)."""
        if self.plain:
            return {self.specs[0].name: vectors}
        n = len(vectors)
        flat = vectors.values.slice(vectors.offset * self.dim, n * self.dim)
        matrix = flat.to_numpy(zero_copy_only=False).reshape(n, self.dim)
        has = np.ones(n, dtype=bool) if vectors.null_count == 0 else vectors.is_valid().to_numpy(zero_copy_only=False)
        mask = None if has.all() else pa.array(~has)
        out: dict[str, pa.Array] = {}
        for spec in self.specs:
            v = quantize.prefix(matrix, spec.dimensions) if spec.prefix else matrix
            if spec.dtype == "binary":
                packed = quantize.to_binary(v)
                out[spec.name] = pa.FixedSizeBinaryArray.from_buffers(
                    spec.arrow_type(), n, [None if mask is None else _validity(has), pa.py_buffer(packed.tobytes())])
                continue
            if spec.dtype == "float32":
                values = pa.array(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
            elif spec.dtype == "float16":
                values = pa.array(quantize.to_float16(v).reshape(-1), pa.float16())
            else:
                ranges = self._int8_ranges(spec, v[has])
                codes = quantize.to_int8(v, ranges) if ranges is not None else np.zeros(v.shape, dtype=np.int8)
                values = pa.array(codes.reshape(-1))
            out[spec.name] = pa.FixedSizeListArray.from_arrays(values, spec.dimensions, mask=mask)
        return out

    # -- int8 ranges ------------------------------------------------------------------------

    def ranges_known(self) -> bool:
        """Every int8 column has its ranges (recorded by this writer or another)."""
        with self._lock:
            return all(self._known(s) is not None for s in self.specs if s.dtype == "int8")

    def _int8_ranges(self, spec: ColumnSpec, sample: np.ndarray) -> Int8Ranges | None:
        """The output's ranges for `spec`: recorded ones, else calibrated from
        `sample` (the first answers) and recorded, unless another writer's came
        first. None while neither exists (no vector written yet)."""
        with self._lock:
            known = self._known(spec)
            if known is not None or len(sample) == 0:
                return known
            mine = quantize.calibrate(sample)
            body = {"epoch": self._epoch, "column": spec.name, "dimensions": spec.dimensions, **mine.to_json()}
            if not self._output.write_once(ranges_name(spec.name), (json.dumps(body) + "\n").encode("utf-8")):
                theirs = self._read(spec)
                for _ in range(READ_ATTEMPTS):  # another writer's file may be seen before it is whole
                    if theirs is not None:
                        break
                    time.sleep(READ_RETRY_S)
                    theirs = self._read(spec)
                if theirs is None:
                    raise ConfigError(f"{self._output.display(ranges_name(spec.name))}: unreadable int8 ranges; "
                                      f"rerun with --restart to start over")
                mine = theirs
            self._ranges[spec.name] = mine
            return mine

    def _known(self, spec: ColumnSpec) -> Int8Ranges | None:
        if spec.name not in self._ranges:
            found = self._read(spec)
            if found is not None:
                self._ranges[spec.name] = found
        return self._ranges.get(spec.name)

    def _read(self, spec: ColumnSpec) -> Int8Ranges | None:
        rel = ranges_name(spec.name)
        try:
            obj = json.loads(self._output.read_bytes(rel))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        if not isinstance(obj, dict) or obj.get("epoch") != self._epoch:
            if self._epoch is not None:
                self._output.delete(rel)  # another job's (a --restart cut short): this job calibrates its own
            return None
        try:
            ranges = Int8Ranges.from_json(obj)
        except (ValueError, KeyError, TypeError):
            return None
        if ranges.dimensions != spec.dimensions:
            return None
        return ranges

    # -- what a part says about its columns ---------------------------------------------

    def metadata(self) -> dict[str, str]:
        """Schema metadata naming each vector column's dtype, length and int8 ranges."""
        described: list[dict[str, Any]] = []
        with self._lock:
            for spec in self.specs:
                entry: dict[str, Any] = {"column": spec.name, "dtype": spec.dtype, "dimensions": spec.dimensions,
                                         "prefix_of": self.dim if spec.prefix else None}
                if spec.dtype == "int8":
                    ranges = self._known(spec)
                    entry["int8"] = ranges.to_json() if ranges is not None else None
                if spec.dtype == "binary":
                    entry["bit_order"] = "msb-first; bit i = component i > 0"
                described.append(entry)
        first = self.specs[0]
        return {"pipeline.vector_dtype": first.dtype, COLUMNS_META: json.dumps(described, separators=(",", ":"))}


def _validity(has: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(has, bitorder="little").tobytes())


def read_ranges(metadata: dict[bytes, bytes] | None, column: str) -> Int8Ranges | None:
    """A part's int8 ranges of `column`, from its schema metadata (for readers and tests)."""
    for entry in json.loads((metadata or {}).get(COLUMNS_META.encode(), b"[]")):
        if entry["column"] == column and entry.get("int8"):
            return Int8Ranges.from_json(entry["int8"])
    return None
