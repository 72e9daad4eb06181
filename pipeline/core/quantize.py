"""Vector columns from one float32 answer: prefixes and the four storage dtypes.

Pure numpy, no I/O: the part writer (checkpoint/parts.py) calls these for the
synchronous and the Batch API paths alike, and the bench and the tests hold
the output against them.

- float32: the answer as it came.
- float16: rounded to nearest (numpy's `astype(float16)`).
- int8: scalar quantization with per-dimension ranges calibrated once per
  output (`calibrate`); component v of dimension j becomes
  round((v - lo[j]) / (hi[j] - lo[j]) * 255) - 128, clipped to [-128, 127];
  `dequantize` maps back to the middle of each step's value.
- binary: one bit a dimension, set where the component is > 0, packed most
  significant bit first into ceil(d / 8) bytes (`numpy.packbits`, pgvector's
  `bit` order); the last byte's unused low bits are 0.

A Matryoshka prefix (`dimensions` on a column) keeps the first N components
and renormalises them to unit length, before any cast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..config.job import JobConfig, VectorColumnConfig, VectorDtype
from ..errors import ConfigError

DTYPES: tuple[VectorDtype, ...] = get_args(VectorDtype)
Int8Scheme = Literal["per-dimension-minmax"]
INT8_SCHEME: Int8Scheme = "per-dimension-minmax"
INT8_LEVELS = 255  # steps between a range's ends: -128 .. 127
# A dimension's range covers at least this many standard deviations either
# side of its mean in the sample, whatever the sample's min and max: a small
# first sample (a `--limit 10` smoke run starts the output) would otherwise
# fix ranges too narrow for every later row (min/max of 10 rows: recall@10
# 0.89 on MiniLM, 0.75 on E5). A dimension's deviation is its own, shrunk
# toward the sample's pooled one by INT8_SHRINK_ROWS pseudo-rows, so a few
# rows cannot make it tiny. bench/quality.py measured 4 against 3.5 and 5.
INT8_BAND_SD = 4.0
INT8_SHRINK_ROWS = 10.0
INT8_MARGIN = 0.02  # and the sample's own min/max widened by this share of the width, each side
# Calibration takes at most this many of the first answers: per-dimension
# min/max settle by then, and the ranges stay one small record.
INT8_CALIBRATION_ROWS = 10_000
MIN_WIDTH = 1e-6  # a dimension constant in the sample still gets a range (no division by zero)


@dataclass(frozen=True)
class Int8Ranges:
    """Per dimension: the value mapped to -128 (lo) and to 127 (hi)."""

    lo: np.ndarray  # float32 [d]
    hi: np.ndarray
    rows: int  # how many answers they were calibrated from

    @property
    def dimensions(self) -> int:
        return int(self.lo.shape[0])

    def to_json(self) -> dict[str, Any]:
        return {"scheme": INT8_SCHEME, "rows": self.rows,
                "lo": [float(x) for x in self.lo], "hi": [float(x) for x in self.hi]}

    @classmethod
    def from_json(cls, obj: Any) -> Int8Ranges:
        """Raises ValueError on anything not written by to_json."""
        if not isinstance(obj, dict) or obj.get("scheme") != INT8_SCHEME:
            raise ValueError(f"int8 ranges of an unknown scheme: {obj!r:.80}")
        lo = np.asarray(obj["lo"], dtype=np.float32)
        hi = np.asarray(obj["hi"], dtype=np.float32)
        if lo.ndim != 1 or lo.shape != hi.shape or not np.all(hi > lo):
            raise ValueError("int8 ranges: lo and hi must be lists of one length with hi > lo")
        return cls(lo, hi, int(obj["rows"]))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Int8Ranges) and np.array_equal(self.lo, other.lo)
                and np.array_equal(self.hi, other.hi) and self.rows == other.rows)

    __hash__ = None  # type: ignore[assignment]


def calibrate(sample: np.ndarray) -> Int8Ranges:
    """Ranges from the first answers (rows of `sample`, at most INT8_CALIBRATION_ROWS):
    each dimension's min and max, widened by INT8_MARGIN each side, and at
    least its mean +- INT8_BAND_SD deviations of a later row (from one row: +- that many
    root-mean-squares of its components about 0)."""
    if sample.ndim != 2 or sample.shape[0] == 0:
        raise ValueError("int8 calibration needs at least one vector")
    x = np.asarray(sample[:INT8_CALIBRATION_ROWS], dtype=np.float64)
    n = x.shape[0]
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = np.maximum(hi - lo, MIN_WIDTH) * INT8_MARGIN
    if n >= 2:
        var = x.var(axis=0, ddof=1)
        own = (n - 1) / (n - 1 + INT8_SHRINK_ROWS)
        # sqrt(1 + 1/n): a later value's deviation from a mean of n rows (the mean is uncertain too)
        spread = np.sqrt((own * var + (1 - own) * float(var.mean())) * (1 + 1 / n))
        center = x.mean(axis=0)
    else:
        center, spread = np.zeros(x.shape[1]), np.full(x.shape[1], float(np.sqrt(np.mean(np.square(x)))))
    lo = np.minimum(lo - pad, center - INT8_BAND_SD * spread)
    hi = np.maximum(hi + pad, center + INT8_BAND_SD * spread)
    return Int8Ranges(lo.astype(np.float32), hi.astype(np.float32), n)


def prefix(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components of each row, renormalised to unit
    length (a zero row stays zero); the rows as they are when None or whole."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    head = np.asarray(vectors[:, :dimensions], dtype=np.float64)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def to_float16(vectors: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # past 65,504 is inf, as IEEE rounding says
        return np.asarray(vectors, dtype=np.float32).astype(np.float16)


def to_binary(vectors: np.ndarray) -> np.ndarray:
    """uint8 [n, ceil(d / 8)]: bit i is component i > 0, most significant bit first."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def to_int8(vectors: np.ndarray, ranges: Int8Ranges) -> np.ndarray:
    if vectors.shape[1] != ranges.dimensions:
        raise ValueError(f"int8 ranges are for {ranges.dimensions} dimensions, not {vectors.shape[1]}")
    scale = INT8_LEVELS / (ranges.hi - ranges.lo)
    steps = np.rint((np.asarray(vectors, dtype=np.float32) - ranges.lo) * scale)
    return (np.clip(steps, 0, INT8_LEVELS) - 128).astype(np.int8)


def dequantize(codes: np.ndarray, ranges: Int8Ranges) -> np.ndarray:
    """float32 values of int8 codes: what a reader computes from the part's metadata."""
    step = (ranges.hi - ranges.lo) / INT8_LEVELS
    return ((codes.astype(np.float32) + 128) * step + ranges.lo).astype(np.float32)


def bytes_per_row(dtype: VectorDtype, dimensions: int) -> float:
    """A column's vector bytes a row, before compression."""
    return {"float32": 4.0 * dimensions, "float16": 2.0 * dimensions, "int8": float(dimensions),
            "binary": float(math.ceil(dimensions / 8))}[dtype]


# -- the job's columns ------------------------------------------------------------------


def column_dimensions(column: VectorColumnConfig, model_dim: int) -> int:
    return column.dimensions or model_dim


def check_vector_columns(job: JobConfig, model_dim: int, *, where: str = "the model's") -> None:
    """What cannot work with vectors of `model_dim` components: a prefix
    longer than the vector, a binary column that is not the whole vector.
    One ConfigError (exit 2) naming the key."""
    for i, column in enumerate(job.output.vectors):
        key = f"output.vectors[{i}].dimensions"
        if column.dimensions is not None and column.dimensions > model_dim:
            raise ConfigError(f"{key}: {column.dimensions} is more than {where} {model_dim} dimensions")
        if column.dtype == "binary" and column.dimensions not in (None, model_dim):
            raise ConfigError(f"{key}: a binary column is the sign of every component of {where} vector "
                              f"({model_dim} bits), not of a prefix of {column.dimensions}: drop `dimensions` "
                              f"(its first N bits are the first N/8 bytes)")


def output_sizes(job: JobConfig, model_dim: int, rows: int) -> list[dict[str, Any]]:
    """Each vector column's bytes for `rows` vectors, before compression (for `estimate`)."""
    sizes = []
    for column in job.output.columns:
        dims = column_dimensions(column, model_dim)
        per_row = bytes_per_row(column.dtype, dims)
        sizes.append({"column": column.column, "dtype": column.dtype, "dimensions": dims,
                      "bytes_per_row": per_row, "bytes": int(per_row * rows)})
    return sizes


def columns_fingerprint(job: JobConfig) -> list[dict[str, Any]] | None:
    """The vector columns as the checkpoint's fingerprint keeps them; None for
    today's single float32 column (outputs made before dtypes keep their fingerprint)."""
    if job.output.vector_dtype == "float32" and not job.output.vectors:
        return None
    return [{"column": c.column, "dtype": c.dtype, "dimensions": c.dimensions} for c in job.output.columns]
