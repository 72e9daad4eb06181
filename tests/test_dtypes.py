"""Output dtypes end to end (`python -m pipeline run` subprocesses): every
column exact against the float32 answer on the synchronous and the Batch API
paths, int8 ranges identical in every part across a SIGKILL and a rerun and
across shards, a column added later written from the cache without a request,
and what `validate` and `estimate` say."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    wait_until,
    committed_units,
    docs_table,
    error_lines,
    part_files,
    provider_entry,
    read_parts,
    rows_sent,
    run_cli,
    run_job,
    sample_texts,
    start_run,
    write_job,
    write_parquet,
)
from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider, vector_for

from pipeline.checkpoint.columns import ranges_name, read_ranges
from pipeline.core.quantize import Int8Ranges

pytestmark = pytest.mark.slow  # subprocess runs: not in the `-m "not slow"` inner loop

DIM = 8
PREFIX = 4
COLUMNS = [
    {"column": "bits", "dtype": "binary"},
    {"column": "q", "dtype": "int8"},
    {"column": "full", "dtype": "float32"},
    {"column": "p", "dtype": "float32", "dimensions": PREFIX},
    {"column": "p16", "dtype": "float16", "dimensions": PREFIX},
    {"column": "q4", "dtype": "int8", "dimensions": PREFIX},
]


def _texts(n: int) -> list[str | None]:
    texts: list[str | None] = list(sample_texts(n))
    for i in range(4, n, 11):
        texts[i] = "   "  # a rejected row: null in every column
    return texts


def with_output(path: Path, **output: Any) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["output"].update(output)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return path


def sync_job(tmp_path: Path, fp: FakeProvider, *, rows_per_part: int = 6, output: str = "out", **provider: Any) -> Path:
    path = write_job(tmp_path, [provider_entry(fp, **provider)], rows_per_part=rows_per_part,
                     embedding={"dimensions": DIM}, batching={"max_inputs_per_request": 2}, output=output,
                     file_name=f"{output}.yaml")
    return with_output(path, vector_dtype="float16", vectors=COLUMNS)


def batch_job(tmp_path: Path, api: FakeBatchAPI) -> Path:
    entry = provider_entry(api.base_url, name="batch", type="openai_batch", poll_interval_s=0.05,
                           max_inputs_per_batch=12)
    path = write_job(tmp_path, [entry], rows_per_part=6, embedding={"dimensions": DIM},
                     batching={"max_inputs_per_request": 4})
    return with_output(path, vector_dtype="float16", vectors=COLUMNS)


def prefix64(v: np.ndarray, n: int) -> np.ndarray:
    head = v[:n].astype(np.float64)
    return (head / np.linalg.norm(head)).astype(np.float32)


def int8_codes(v: np.ndarray, ranges: Int8Ranges) -> np.ndarray:
    """The documented mapping, written out again: round((v - lo) / (hi - lo) * 255) - 128, clipped."""
    steps = np.rint((v.astype(np.float32) - ranges.lo) * (np.float32(255) / (ranges.hi - ranges.lo)))
    return (np.clip(steps, 0, 255) - 128).astype(np.int8)


def part_ranges(out: Path, column: str) -> list[Int8Ranges | None]:
    return [read_ranges(pq.read_schema(p).metadata, column) for p in part_files(out)]


def recorded_ranges(out: Path, column: str) -> Int8Ranges:
    return Int8Ranges.from_json(json.loads((out / ranges_name(column)).read_text()))


def assert_columns_exact(out: Path, texts: list[str | None]) -> None:
    """Every column of every row as specified from vector_for(text): float16
    bit-equal to numpy's cast, bits to packbits(v > 0), prefixes unit length
    within 1e-6, int8 the documented codes with the output's one set of ranges."""
    table = read_parts(out)
    assert table.num_rows == len(texts)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), DIM)
    assert table.schema.field("bits").type == pa.binary(1)
    assert table.schema.field("q").type == pa.list_(pa.int8(), DIM)
    assert table.schema.field("p16").type == pa.list_(pa.float16(), PREFIX)
    ranges = {c: recorded_ranges(out, c) for c in ("q", "q4")}
    for c, r in ranges.items():
        assert part_ranges(out, c) == [r] * len(part_files(out)), f"{c}: parts disagree on the int8 ranges"
    cols = {name: table.column(name).to_pylist() for name in ["embedding", *(c["column"] for c in COLUMNS)]}
    for i, text in enumerate(texts):
        if text is None or not text.strip():
            assert all(cols[name][i] is None for name in cols), f"row {i}: a rejected row has a vector"
            continue
        v = vector_for(text, DIM)
        f16 = np.asarray(cols["embedding"][i], dtype=np.float16)
        assert np.array_equal(f16.view(np.uint16), v.astype(np.float16).view(np.uint16)), f"row {i}: float16"
        assert cols["bits"][i] == np.packbits(v > 0).tobytes(), f"row {i}: bits"
        assert np.array_equal(np.asarray(cols["full"][i], dtype=np.float32), v), f"row {i}: float32"
        p = np.asarray(cols["p"][i], dtype=np.float32)
        assert abs(float(np.linalg.norm(p.astype(np.float64))) - 1) <= 1e-6
        assert np.allclose(p, v[:PREFIX] / np.linalg.norm(v[:PREFIX].astype(np.float64)), atol=1e-6, rtol=0)
        p16 = np.asarray(cols["p16"][i], dtype=np.float16)
        assert np.array_equal(p16.view(np.uint16), prefix64(v, PREFIX).astype(np.float16).view(np.uint16))
        assert cols["q"][i] == int8_codes(v, ranges["q"]).tolist(), f"row {i}: int8"
        assert cols["q4"][i] == int8_codes(prefix64(v, PREFIX), ranges["q4"]).tolist(), f"row {i}: int8 prefix"


@pytest.mark.parametrize("path", ["sync", "batch"])
def test_every_dtype_is_exact_against_the_float32_answer(tmp_path: Path, path: str) -> None:
    texts = _texts(40)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    if path == "sync":
        with FakeProvider(dim=DIM) as fp:
            done = run_job(sync_job(tmp_path, fp))
            sent = rows_sent(fp)
    else:
        with FakeBatchAPI(dim=DIM, duration_s=0.2) as api:
            done = run_job(batch_job(tmp_path, api))
            sent = api.embedded
            assert len(api.created) >= 2
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and len(part_files(out)) == 7
    assert_columns_exact(out, texts)
    # One paid call feeds every column: each text sent once.
    assert {t: n for t, n in sent.items() if t in texts} == {t: 1 for t in texts if t and t.strip()}



def test_int8_ranges_are_identical_in_every_part_across_a_sigkill_and_rerun(tmp_path: Path) -> None:
    texts = _texts(48)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM, latency_s=0.05) as fp:
        job = sync_job(tmp_path, fp, rows_per_part=3, max_concurrency=1)
        proc = start_run(job)
        wait_until(lambda: len(committed_units(out)) >= 3, timeout_s=60)
        proc.kill()
        proc.wait(timeout=10)
        before = {c: recorded_ranges(out, c) for c in ("q", "q4")}
        parts_before = {p.name: read_ranges(pq.read_schema(p).metadata, "q") for p in part_files(out)}
        assert 3 <= len(parts_before) < 16 and all(r == before["q"] for r in parts_before.values())
        done = run_job(job)
        assert done.returncode == 0, done.stderr
    assert {c: recorded_ranges(out, c) for c in ("q", "q4")} == before
    assert before["q"].rows in (2, 3)  # from the first slice written: its three rows, less a blank one
    assert_columns_exact(out, texts)


def test_shards_running_side_by_side_use_one_set_of_int8_ranges(tmp_path: Path) -> None:
    texts = _texts(36)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, latency_s=0.02) as fp:
        job = sync_job(tmp_path, fp, rows_per_part=3)
        procs = [start_run(job, "--shard", f"{k}/3") for k in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_columns_exact(out, texts)


def test_a_column_added_over_a_complete_output_is_written_from_the_cache_without_a_request(tmp_path: Path) -> None:
    texts = _texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=6, embedding={"dimensions": DIM})
        doc = yaml.safe_load(job.read_text())
        doc["cache"] = ".cache/vectors"
        job.write_text(yaml.safe_dump(doc))
        assert run_job(job).returncode == 0
        paid = sum(rows_sent(fp).values())
        assert paid == 27
        with_output(job, vector_dtype="float16", vectors=COLUMNS)
        refused = run_job(job)
        assert refused.returncode == 2
        assert len(error_lines(refused.stderr)) == 1 and "--restart" in refused.stderr and "cache" in refused.stderr
        done = run_job(job, "--restart")
        assert done.returncode == 0, done.stderr
        assert sum(rows_sent(fp).values()) == paid, "a text was sent again"
    assert_columns_exact(tmp_path / "out", texts)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["run"]["rows_from_cache"] == 27 and summary["run"]["tokens"] == 0


@pytest.mark.parametrize(("output", "embedding", "message"), [
    ({"vectors": [{"column": "small", "dimensions": 2000}]}, {},
     "output.vectors[0].dimensions: 2000 is more than the model's 1536 dimensions"),
    ({"vectors": [{"column": "small", "dimensions": 300}]}, {"dimensions": 256},
     "output.vectors[0].dimensions: 300 is more than embedding.dimensions (256)"),
    ({"vectors": [{"column": "bits", "dtype": "binary", "dimensions": 512}]}, {}, "a binary column is the sign"),
    ({"vectors": [{"column": "v", "dtype": "int8"}, {"column": "v", "dtype": "binary"}]}, {},
     "output.vectors[1].column: 'v' is used twice"),
])
def test_validate_refuses_columns_that_cannot_work_in_one_line_exit_2(tmp_path: Path, output: dict[str, Any],
                                                                      embedding: dict[str, Any], message: str) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(5)))
    job = write_job(tmp_path, [provider_entry("http://127.0.0.1:9/v1")], embedding=embedding)
    with_output(job, **output)
    for command in ("validate", "estimate"):
        result = run_cli(command, str(job))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_estimate_shows_the_output_size_of_each_column_and_each_dtype(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(12)))  # 11 rows with a text, one blank
    job = write_job(tmp_path, [provider_entry("http://127.0.0.1:9/v1")])
    with_output(job, vector_dtype="int8", vectors=[{"column": "bits", "dtype": "binary"},
                                                    {"column": "e256", "dtype": "float16", "dimensions": 256}])
    result = run_cli("estimate", str(job), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output_vectors"] == [
        {"column": "embedding", "dtype": "int8", "dimensions": 1536, "bytes_per_row": 1536.0, "bytes": 16896},
        {"column": "bits", "dtype": "binary", "dimensions": 1536, "bytes_per_row": 192.0, "bytes": 2112},
        {"column": "e256", "dtype": "float16", "dimensions": 256, "bytes_per_row": 512.0, "bytes": 5632},
    ]
    text = run_cli("estimate", str(job)).stdout
    assert "embedding int8 x 1,536: 1.5 kB/row, 16.9 kB" in text
    assert "embedding in each output.vector_dtype: float32 67.6 kB, float16 33.8 kB, int8 16.9 kB, binary 2.1 kB" in text


@pytest.mark.parametrize("path", ["sync", "batch"])
def test_a_prefix_longer_than_an_unknown_models_answer_stops_the_run_with_exit_2(tmp_path: Path, path: str) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(6)))
    server = FakeProvider(dim=DIM, model="house-model") if path == "sync" else \
        FakeBatchAPI(dim=DIM, model="house-model", duration_s=0.1)
    with server as fp:
        extra = {} if path == "sync" else {"type": "openai_batch", "poll_interval_s": 0.05}
        job = write_job(tmp_path, [provider_entry(fp, **extra)], embedding={"model": "house-model"})
        with_output(job, vectors=[{"column": "small", "dimensions": 2 * DIM}])
        assert run_cli("validate", str(job)).returncode == 0  # the model's length is not known before an answer
        result = run_job(job)
        assert rows_sent(fp) == {}  # only the start-up probe
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        f"error: output.vectors[0].dimensions: {2 * DIM} is more than the provider's {DIM} dimensions"]
    assert not part_files(tmp_path / "out")
