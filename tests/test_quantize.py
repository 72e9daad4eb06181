"""The dtype conversions (core/quantize.py) and the vector columns a part is
written with (checkpoint/columns.py), in process: each dtype exact against
the float32 vector, int8 ranges recorded once per output, the job keys that
name them and what they refuse."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.checkpoint import parts
from pipeline.checkpoint.columns import VectorColumns, ranges_name, read_ranges
from pipeline.config.job import load_job
from pipeline.core import quantize
from pipeline.core.models import known_dimensions
from pipeline.core.quantize import Int8Ranges
from pipeline.errors import ConfigError
from pipeline.storage import LocalOutput

RNG = np.random.default_rng(7)


def unit_rows(n: int, d: int, *, scale: float = 1.0) -> np.ndarray:
    v = RNG.standard_normal((n, d)) * scale
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


# -- the conversions ---------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 8, 9, 384, 1536, 3072])
def test_binary_is_bit_equal_to_packbits_of_the_positive_components_msb_first(d: int) -> None:
    v = unit_rows(5, d)
    v[0, 0] = 0.0  # zero is not > 0: bit clear
    v[1, :] = -0.0
    bits = quantize.to_binary(v)
    assert bits.shape == (5, -(-d // 8))
    assert np.array_equal(bits, np.packbits(v > 0, axis=1))
    assert not bits[1].any()
    if d >= 8:  # the first component is the most significant bit of the first byte
        w = np.zeros((1, d), dtype=np.float32)
        w[0, 0] = 0.5
        assert quantize.to_binary(w)[0, 0] == 0b1000_0000


def test_float16_is_bit_equal_to_numpys_rounding_including_edge_values() -> None:
    v = np.concatenate([unit_rows(3, 16), np.array([[65504.0, 65520.0, 1e-8, -1e-8, 6.1e-5, 5.96e-8, np.inf, -np.inf,
                                                      np.nan, 0.0, -0.0, 1 / 3, 2 / 3, 1e5, -1e5, 0.1]],
                                                    dtype=np.float32)])
    got = quantize.to_float16(v)
    assert got.dtype == np.float16
    with np.errstate(over="ignore"):  # 65,520 and 1e5 round to inf, as they should
        expect = v.astype(np.float16)
    assert np.array_equal(got.view(np.uint16), expect.view(np.uint16))


@pytest.mark.parametrize("dims", [1, 2, 64, 256, 1535])
def test_a_prefix_keeps_the_first_components_renormalised_to_unit_length(dims: int) -> None:
    v = unit_rows(50, 1536)
    got = quantize.prefix(v, dims)
    assert got.shape == (50, dims) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-6)
    expect = v[:, :dims] / np.linalg.norm(v[:, :dims].astype(np.float64), axis=1, keepdims=True)
    assert np.allclose(got, expect, atol=1e-6)


def test_a_prefix_of_a_zero_row_stays_zero_and_a_whole_length_prefix_is_the_vector() -> None:
    v = unit_rows(3, 8)
    v[1] = 0.0
    assert np.array_equal(quantize.prefix(v, 4)[1], np.zeros(4, dtype=np.float32))
    assert quantize.prefix(v, 8) is v and quantize.prefix(v, None) is v


def test_int8_maps_each_dimensions_range_onto_the_256_codes_and_back_within_half_a_step() -> None:
    sample = unit_rows(2000, 64)
    ranges = quantize.calibrate(sample)
    codes = quantize.to_int8(sample, ranges)
    assert codes.dtype == np.int8
    step = (ranges.hi - ranges.lo) / 255
    back = quantize.dequantize(codes, ranges)
    assert np.all(np.abs(back - sample) <= step / 2 + 1e-7)
    ends = np.stack([ranges.lo, ranges.hi])
    assert quantize.to_int8(ends, ranges).tolist() == [[-128] * 64, [127] * 64]
    beyond = np.stack([ranges.lo - 1, ranges.hi + 1])  # clipped, not wrapped
    assert quantize.to_int8(beyond, ranges).tolist() == [[-128] * 64, [127] * 64]


def test_int8_codes_follow_the_documented_formula() -> None:
    ranges = Int8Ranges(np.array([-1.0, 0.0], np.float32), np.array([1.0, 0.5], np.float32), rows=1)
    v = np.array([[0.0, 0.25], [-1.0, 0.5], [0.5, 0.0]], dtype=np.float32)
    expect = np.clip(np.rint((v - ranges.lo) / (ranges.hi - ranges.lo) * 255), 0, 255) - 128
    assert quantize.to_int8(v, ranges).tolist() == expect.astype(int).tolist()


@pytest.mark.parametrize("rows", [1, 2, 10, 10_000])
def test_a_small_first_sample_still_gives_ranges_wide_enough_for_later_answers(rows: int) -> None:
    d = 384
    ranges = quantize.calibrate(unit_rows(rows, d))
    later = unit_rows(5000, d)
    clipped = np.mean((later < ranges.lo) | (later > ranges.hi))
    assert clipped < 1e-3  # a component in a thousand at most (min/max of 10 rows alone: about one in six)
    # and no wider than needed: the widest range stays within a few times the spread
    assert float(np.max(ranges.hi - ranges.lo)) < 20 / np.sqrt(d)


def test_calibration_of_constant_or_zero_dimensions_gives_usable_ranges() -> None:
    sample = np.zeros((4, 3), dtype=np.float32)
    sample[:, 1] = 0.25
    ranges = quantize.calibrate(sample)
    assert np.all(ranges.hi > ranges.lo)
    assert np.all(np.isfinite(quantize.dequantize(quantize.to_int8(sample, ranges), ranges)))
    with pytest.raises(ValueError):
        quantize.calibrate(np.zeros((0, 3), dtype=np.float32))


def test_int8_ranges_survive_json_exactly_and_refuse_what_they_did_not_write() -> None:
    ranges = quantize.calibrate(unit_rows(100, 32))
    assert Int8Ranges.from_json(json.loads(json.dumps(ranges.to_json()))) == ranges
    bad = [{"scheme": "other", "lo": [0], "hi": [1], "rows": 1}, {**ranges.to_json(), "hi": ranges.to_json()["lo"]},
           {**ranges.to_json(), "lo": [0.0]}, "x"]
    for obj in bad:
        with pytest.raises(ValueError):
            Int8Ranges.from_json(obj)


@pytest.mark.parametrize(("dtype", "d", "expect"), [("float32", 1536, 6144), ("float16", 1536, 3072),
                                                   ("int8", 1536, 1536), ("binary", 1536, 192), ("binary", 9, 2),
                                                   ("binary", 1, 1)])
def test_bytes_per_row_of_each_dtype(dtype: Any, d: int, expect: int) -> None:
    assert quantize.bytes_per_row(dtype, d) == expect


# -- the job keys ----------------------------------------------------------------------------


def job_file(tmp_path: Path, output: dict[str, Any], embedding: dict[str, Any] | None = None) -> Path:
    doc = {"name": "t", "input": {"path": "x.parquet", "text_column": "body", "keep_columns": ["title"]},
           "output": {"path": "out", **output}, "embedding": {"model": "text-embedding-3-small", **(embedding or {})},
           "providers": [{"name": "a", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_default_output_is_one_float32_column_with_the_fingerprint_of_before(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, {}))
    assert [(c.column, c.dtype, c.dimensions) for c in job.output.columns] == [("embedding", "float32", None)]
    assert quantize.columns_fingerprint(job) is None


@pytest.mark.parametrize(("output", "embedding", "message"), [
    ({"vector_dtype": "int4"}, None, "output.vector_dtype: 'int4' is not one of float32, float16, int8, binary"),
    ({"vectors": [{"column": "embedding", "dtype": "binary"}]}, None, "output.vectors[0].column: 'embedding' is used twice"),
    ({"vectors": [{"column": "a"}, {"column": "a", "dtype": "int8"}]}, None, "output.vectors[1].column: 'a' is used twice"),
    ({"vectors": [{"column": "title", "dtype": "int8"}]}, None, "output.vectors[0].column: 'title' clashes"),
    ({"vectors": [{"column": "a", "dimensions": 0}]}, None, "output.vectors[0].dimensions"),
    ({"vectors": [{"column": "a", "dimensions": 300}]}, {"dimensions": 256},
     "output.vectors[0].dimensions: 300 is more than embedding.dimensions (256)"),
    ({"vectors": [{"column": "a", "dtype": "binary", "dimensions": 128}]}, None, "a binary column is the sign of every"),
    ({"vectors": [{"dtype": "int8"}]}, None, "output.vectors[0].column"),
    ({"vectors": "embedding_bits"}, None, "output.vectors"),
])
def test_job_keys_that_cannot_work_are_one_line_naming_the_key(tmp_path: Path, output: dict[str, Any],
                                                               embedding: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_job(job_file(tmp_path, output, embedding))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_prefix_longer_than_the_models_vector_is_refused_once_the_length_is_known(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, {"vectors": [{"column": "a", "dimensions": 2000}]}))
    assert known_dimensions(job) == 1536
    with pytest.raises(ConfigError, match=r"output.vectors\[0\].dimensions: 2000 is more than the model's 1536"):
        quantize.check_vector_columns(job, 1536)
    quantize.check_vector_columns(job, 3072)  # text-embedding-3-large would do


# -- the columns a part is written with ----------------------------------------------------


def columns_job(tmp_path: Path) -> Any:
    return load_job(job_file(tmp_path, {"vector_dtype": "float16", "vectors": [
        {"column": "bits", "dtype": "binary"}, {"column": "q", "dtype": "int8"},
        {"column": "p", "dtype": "float32", "dimensions": 5}, {"column": "q5", "dtype": "int8", "dimensions": 5}]}))


def fixed_list(v: np.ndarray, has: np.ndarray) -> pa.FixedSizeListArray:
    return parts.vector_array(v, has, v.shape[1])


def test_every_column_comes_from_the_same_vectors_exactly_and_nulls_stay_null(tmp_path: Path) -> None:
    out = LocalOutput(str(tmp_path / "out"))
    out.prepare(("_manifest.d",))
    cols = VectorColumns(columns_job(tmp_path), out, "epoch-1", 12)
    v = unit_rows(6, 12)
    has = np.array([True, True, False, True, True, True])
    arrays = cols.arrays(fixed_list(v, has))
    assert list(arrays) == ["embedding", "bits", "q", "p", "q5"]
    for name, arr in arrays.items():
        assert arr.null_count == 1 and not arr.is_valid()[2].as_py(), name
    ok = has.nonzero()[0]
    f16 = np.asarray([x for x in arrays["embedding"].to_pylist() if x is not None], dtype=np.float16)
    assert np.array_equal(f16.view(np.uint16), v[ok].astype(np.float16).view(np.uint16))
    bits = [x for x in arrays["bits"].to_pylist() if x is not None]
    assert bits == [row.tobytes() for row in np.packbits(v[ok] > 0, axis=1)]
    p = np.asarray([x for x in arrays["p"].to_pylist() if x is not None], dtype=np.float32)
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-6) and np.allclose(p, quantize.prefix(v[ok], 5), atol=0)
    for name, dims in (("q", 12), ("q5", 5)):
        ranges = Int8Ranges.from_json(json.loads((tmp_path / "out" / ranges_name(name)).read_text()))
        assert ranges.rows == 5 and ranges.dimensions == dims
        q = np.asarray([x for x in arrays[name].to_pylist() if x is not None], dtype=np.int8)
        assert np.array_equal(q, quantize.to_int8(quantize.prefix(v[ok], dims), ranges))


def test_int8_ranges_are_the_first_writers_whichever_writer_asks_later(tmp_path: Path) -> None:
    """Two writers (shards) calibrating at once from different answers: one
    file, and both write with its ranges; a third (a rerun) reads them."""
    job = columns_job(tmp_path)
    out = LocalOutput(str(tmp_path / "out"))
    out.prepare(("_manifest.d",))
    writers = [VectorColumns(job, LocalOutput(str(tmp_path / "out")), "e", 12) for _ in range(8)]
    samples = [unit_rows(20, 12, scale=1 + i) for i in range(8)]
    got: list[Any] = [None] * 8
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        got[i] = writers[i].arrays(fixed_list(samples[i], np.ones(20, dtype=bool)))["q"]

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorded = Int8Ranges.from_json(json.loads((tmp_path / "out" / ranges_name("q")).read_text()))
    for i in range(8):
        expect = quantize.to_int8(samples[i], recorded)
        assert np.array_equal(np.asarray(got[i].to_pylist(), dtype=np.int8), expect)
    rerun = VectorColumns(job, out, "e", 12)
    assert rerun.ranges_known()
    assert read_ranges({k.encode(): v.encode() for k, v in rerun.metadata().items()}, "q") == recorded
    assert not list((tmp_path / "out" / "_manifest.d").glob(".*"))  # no temp file left


def test_ranges_of_another_job_are_not_taken(tmp_path: Path) -> None:
    job = columns_job(tmp_path)
    out = LocalOutput(str(tmp_path / "out"))
    out.prepare(("_manifest.d",))
    VectorColumns(job, out, "old", 12).arrays(fixed_list(unit_rows(4, 12, scale=9), np.ones(4, dtype=bool)))
    fresh = VectorColumns(job, out, "new", 12)
    assert not fresh.ranges_known()
    sample = unit_rows(30, 12)
    fresh.arrays(fixed_list(sample, np.ones(30, dtype=bool)))
    assert json.loads((tmp_path / "out" / ranges_name("q")).read_text())["rows"] == 30


def test_a_part_whose_first_rows_have_no_vector_waits_for_the_ranges_before_its_metadata(tmp_path: Path) -> None:
    job = columns_job(tmp_path)
    out = LocalOutput(str(tmp_path / "out"))
    out.prepare(("_manifest.d", "_rejects.d"))
    cols = VectorColumns(job, out, "e", 12)
    writer = parts.PartWriter(out, job, 0, 5, 12, cols)
    ids = pa.table({"doc_id": ["a", "b", "c", "d"], "title": ["t"] * 4})
    v = unit_rows(4, 12)
    writer.write(ids.slice(0, 2), 0, fixed_list(v[:2], np.zeros(2, dtype=bool)), ["empty", "empty"], [None, None])
    writer.write(ids.slice(2, 2), 2, fixed_list(v[2:], np.ones(2, dtype=bool)), [None, None], [None, None])
    for staged in writer.finish():
        staged.publish()
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    ranges = read_ranges(table.schema.metadata, "q")
    assert ranges is not None and ranges.rows == 2
    assert table.column("q").to_pylist()[:2] == [None, None]
    assert np.array_equal(np.asarray(table.column("q").to_pylist()[2:], np.int8), quantize.to_int8(v[2:], ranges))
    described = json.loads(table.schema.metadata[b"pipeline.columns"])
    assert [(c["column"], c["dtype"], c["dimensions"]) for c in described] == [
        ("embedding", "float16", 12), ("bits", "binary", 12), ("q", "int8", 12), ("p", "float32", 5), ("q5", "int8", 5)]
    assert table.schema.metadata[b"pipeline.vector_dtype"] == b"float16"


def test_the_default_column_is_written_as_before(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, {}))
    out = LocalOutput(str(tmp_path / "out"))
    cols = VectorColumns(job, out, "e", 4)
    arr = fixed_list(unit_rows(3, 4), np.ones(3, dtype=bool))
    assert cols.plain and cols.arrays(arr)["embedding"] is arr


def test_write_once_keeps_the_first_file_and_tells_the_others(tmp_path: Path) -> None:
    out = LocalOutput(str(tmp_path))
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def write(i: int) -> None:
        barrier.wait()
        results.append(out.write_once("f.json", f"{i}".encode()))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert (tmp_path / "f.json").read_text() in {str(i) for i in range(6)}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_write_once_without_hard_links_is_still_an_exclusive_create(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    out = LocalOutput(str(tmp_path))
    assert out.write_once("f.json", b"first") is True
    assert out.write_once("f.json", b"second") is False
    assert (tmp_path / "f.json").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
