"""The output opens as it is where the vectors are used: DuckDB (vector
functions on the embedding column), Polars (Array dtype), pandas (the
directory, bookkeeping files skipped) and LanceDB (a vector table straight
from the parts), and each finds a sample row's nearest neighbours. Then the
same for the other dtypes (float16, int8, binary), with the recipe each
reader needs where it needs one (README: "Storage: dtypes and readers")."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import docs_table, provider_entry, run_cli, sample_texts, write_job, write_parquet
from fakeprovider import FakeProvider, vector_for

from pipeline.checkpoint.columns import read_ranges
from pipeline.core import quantize
from pipeline.core.quantize import dequantize

DIM = 8
TEXTS = sample_texts(40)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("readers")
    texts: list[str | None] = list(TEXTS)
    texts[5] = None  # a rejected row: a null vector readers must step over
    write_parquet(tmp / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        result = run_cli("run", str(write_job(tmp, [provider_entry(fp)], keep_columns=["doc_id", "title"])), "--no-progress")
        assert result.returncode == 0, result.stderr
    return tmp / "out"


def expected_neighbours(query: int, k: int) -> list[str]:
    """Nearest rows by cosine, computed from the server's own vectors."""
    ids = [f"id-{i:04d}" for i in range(len(TEXTS)) if i != 5]
    vectors = np.stack([vector_for(TEXTS[i], DIM) for i in range(len(TEXTS)) if i != 5]).astype(np.float64)
    q = vector_for(TEXTS[query], DIM).astype(np.float64)
    sims = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
    return [ids[i] for i in np.argsort(-sims)[:k]]


def test_duckdb_finds_the_nearest_neighbours_with_its_vector_functions(output: Path) -> None:
    parts = str(output / "part-*.parquet")
    rows = duckdb.sql(
        f"""
        WITH q AS (SELECT embedding::FLOAT[{DIM}] AS v FROM read_parquet('{parts}') WHERE doc_id = 'id-0007')
        SELECT doc_id, array_cosine_similarity(embedding::FLOAT[{DIM}], q.v) AS sim
        FROM read_parquet('{parts}'), q
        WHERE embedding IS NOT NULL
        ORDER BY sim DESC LIMIT 5
        """
    ).fetchall()
    assert [r[0] for r in rows] == expected_neighbours(7, 5)
    assert rows[0] == ("id-0007", pytest.approx(1.0, abs=1e-6))
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{parts}') WHERE embedding IS NULL").fetchall() == [(1,)]


def test_polars_reads_the_vectors_as_an_array_column_and_finds_the_same_neighbours(output: Path) -> None:
    df = pl.read_parquet(output / "part-*.parquet")
    assert df.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert df.height == len(TEXTS)
    assert df["doc_id"].to_list() == [f"id-{i:04d}" for i in range(len(TEXTS))]
    present = df.filter(pl.col("embedding").is_not_null())
    matrix = present["embedding"].to_numpy().astype(np.float64)
    q = present.filter(pl.col("doc_id") == "id-0007")["embedding"].to_numpy()[0].astype(np.float64)
    sims = matrix @ q / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
    found = present["doc_id"].gather(np.argsort(-sims)[:5].tolist()).to_list()
    assert found == expected_neighbours(7, 5)


def test_pandas_reads_the_output_directory_and_finds_the_same_neighbours(output: Path) -> None:
    df = pd.read_parquet(output)  # the folder: _manifest.json, _rejects.parquet and _*.d/ are skipped
    assert df["doc_id"].tolist() == [f"id-{i:04d}" for i in range(len(TEXTS))]
    assert df["embedding"].isna().sum() == 1
    present = df[df["embedding"].notna()]
    matrix = np.stack(present["embedding"].to_list()).astype(np.float64)
    assert matrix.shape == (len(TEXTS) - 1, DIM)
    q = matrix[present["doc_id"].tolist().index("id-0007")]
    sims = matrix @ q / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
    assert present["doc_id"].iloc[np.argsort(-sims)[:5]].tolist() == expected_neighbours(7, 5)


def test_lancedb_takes_the_parts_as_a_vector_table_and_finds_the_same_neighbours(output: Path, tmp_path: Path) -> None:
    lancedb = pytest.importorskip("lancedb", reason="lancedb is not installed (pip install -e '.[test]')")
    db = lancedb.connect(str(tmp_path / "lance"))
    table = db.create_table("docs", data=ds.dataset(output, format="parquet"))
    assert table.count_rows() == len(TEXTS)
    query = vector_for(TEXTS[7], DIM)
    hits = table.search(query, vector_column_name="embedding").distance_type("cosine").limit(5).to_list()
    assert [h["doc_id"] for h in hits] == expected_neighbours(7, 5)
    assert hits[0]["_distance"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ the other dtypes
# One job writes every dtype from the same answers (output.vector_dtype and
# output.vectors), at 16 dims: LanceDB takes a float list of 10 or more as a
# vector column, and then refuses null vectors unless told what to do with them.

DTYPE_DIM = 16
DTYPE_OUTPUT = {"vector_dtype": "float16", "vectors": [{"column": "emb_i8", "dtype": "int8"},
                                                       {"column": "emb_bits", "dtype": "binary"}]}


@pytest.fixture(scope="module")
def dtypes_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("readers-dtypes")
    texts: list[str | None] = list(TEXTS)
    texts[5] = None
    write_parquet(tmp / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DTYPE_DIM) as fp:
        job = write_job(tmp, [provider_entry(fp)], keep_columns=["doc_id", "title"], embedding={"dimensions": DTYPE_DIM})
        doc = yaml.safe_load(job.read_text())
        doc["output"].update(DTYPE_OUTPUT)
        job.write_text(yaml.safe_dump(doc))
        result = run_cli("run", str(job), "--no-progress")
        assert result.returncode == 0, result.stderr
    return tmp / "out"


IDS = [f"id-{i:04d}" for i in range(len(TEXTS)) if i != 5]
FLOATS = np.stack([vector_for(TEXTS[i], DTYPE_DIM) for i in range(len(TEXTS)) if i != 5])


def stored_neighbours(matrix: np.ndarray, query: int, k: int) -> list[str]:
    """Nearest rows by cosine of the vectors as stored (float16 rounding, int8 codes mapped back)."""
    m = matrix.astype(np.float64)
    sims = m @ m[query] / (np.linalg.norm(m, axis=1) * np.linalg.norm(m[query]))
    return [IDS[i] for i in np.argsort(-sims, kind="stable")[:k]]


def hamming_neighbours(query: int, k: int) -> list[tuple[str, int]]:
    bits = np.packbits(FLOATS > 0, axis=1)
    dist = np.unpackbits(bits ^ bits[query], axis=1).sum(axis=1)
    order = np.argsort(dist, kind="stable")[:k]
    return [(IDS[i], int(dist[i])) for i in order]


def int8_ranges(output: Path) -> Any:
    metadata = pq.read_schema(sorted(output.glob("part-*.parquet"))[0]).metadata
    return read_ranges(metadata, "emb_i8")


def test_pyarrow_reads_each_dtype_as_written_and_the_metadata_names_them(dtypes_output: Path) -> None:
    table = ds.dataset(dtypes_output, format="parquet").to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), DTYPE_DIM)
    assert table.schema.field("emb_i8").type == pa.list_(pa.int8(), DTYPE_DIM)
    assert table.schema.field("emb_bits").type == pa.binary(DTYPE_DIM // 8)
    present = table.filter(pc.is_valid(table["embedding"]))
    f16 = present["embedding"].combine_chunks().values.to_numpy().reshape(-1, DTYPE_DIM)
    assert np.array_equal(f16.view(np.uint16), FLOATS.astype(np.float16).view(np.uint16))
    assert present["emb_bits"].to_pylist() == [row.tobytes() for row in np.packbits(FLOATS > 0, axis=1)]
    codes = present["emb_i8"].combine_chunks().values.to_numpy().reshape(-1, DTYPE_DIM)
    ranges = int8_ranges(dtypes_output)
    step = (ranges.hi - ranges.lo) / 255
    assert np.all(np.abs(dequantize(codes, ranges) - FLOATS) <= step / 2 + 1e-7)
    described = {c["column"]: c for c in json.loads(table.schema.metadata[b"pipeline.columns"])}
    assert {k: (v["dtype"], v["dimensions"]) for k, v in described.items()} == {
        "embedding": ("float16", DTYPE_DIM), "emb_i8": ("int8", DTYPE_DIM), "emb_bits": ("binary", DTYPE_DIM)}
    assert described["emb_i8"]["int8"]["lo"] == [float(x) for x in ranges.lo]


def test_pandas_reads_each_dtype_into_numpy_arrays(dtypes_output: Path) -> None:
    df = pd.read_parquet(dtypes_output)
    present = df[df["embedding"].notna()]
    f16 = np.stack(present["embedding"].to_list())
    assert f16.dtype == np.float16 and np.array_equal(f16, FLOATS.astype(np.float16))
    # int8 lists come back as float arrays beside the null row: np.stack(...).astype(np.int8) is exact
    codes = np.stack(present["emb_i8"].to_list()).astype(np.int8)
    assert np.array_equal(codes, np.stack([quantize.to_int8(FLOATS, int8_ranges(dtypes_output))])[0])
    arrow = pd.read_parquet(dtypes_output, dtype_backend="pyarrow")  # or keep Arrow's int8 lists as they are
    assert arrow["emb_i8"].dtype.pyarrow_dtype == pa.list_(pa.int8(), DTYPE_DIM)
    bits = np.frombuffer(b"".join(present["emb_bits"].to_list()), dtype=np.uint8).reshape(-1, DTYPE_DIM // 8)
    assert np.array_equal(np.unpackbits(bits, axis=1).astype(bool), FLOATS > 0)


def test_polars_reads_float16_and_int8_as_array_columns_and_bits_as_binary(dtypes_output: Path) -> None:
    df = pl.read_parquet(dtypes_output / "part-*.parquet")
    assert df.schema["embedding"] == pl.Array(pl.Float16, DTYPE_DIM)
    assert df.schema["emb_i8"] == pl.Array(pl.Int8, DTYPE_DIM)
    assert df.schema["emb_bits"] == pl.Binary
    present = df.filter(pl.col("embedding").is_not_null())
    matrix = present["embedding"].to_numpy().astype(np.float32)
    assert stored_neighbours(matrix, 6, 5) == stored_neighbours(FLOATS.astype(np.float16), 6, 5)


def test_duckdb_reads_float16_as_float_lists_and_finds_neighbours_by_hamming_distance(dtypes_output: Path) -> None:
    parts = str(dtypes_output / "part-*.parquet")
    d = DTYPE_DIM
    rows = duckdb.sql(f"""
        WITH q AS (SELECT embedding::FLOAT[{d}] AS v FROM read_parquet('{parts}') WHERE doc_id = 'id-0007')
        SELECT doc_id FROM read_parquet('{parts}'), q WHERE embedding IS NOT NULL
        ORDER BY array_cosine_similarity(embedding::FLOAT[{d}], q.v) DESC LIMIT 5
        """).fetchall()
    assert [r[0] for r in rows] == stored_neighbours(FLOATS.astype(np.float16), 6, 5)  # id-0007: the 7th row kept
    hamming = duckdb.sql(f"""
        WITH q AS (SELECT emb_bits AS b FROM read_parquet('{parts}') WHERE doc_id = 'id-0007')
        SELECT doc_id, bit_count(xor(emb_bits::BITSTRING, q.b::BITSTRING)) AS dist
        FROM read_parquet('{parts}'), q WHERE emb_bits IS NOT NULL ORDER BY dist, doc_id LIMIT 5
        """).fetchall()
    expect = sorted(hamming_neighbours(6, len(IDS)), key=lambda x: (x[1], x[0]))[:5]  # id-0007 is the 7th row kept
    assert hamming == expect
    assert duckdb.sql(f"SELECT typeof(emb_i8) FROM read_parquet('{parts}') LIMIT 1").fetchall() == [("TINYINT[]",)]
    # From memory DuckDB refuses Arrow half floats: cast them in Arrow first (README: readers).
    halves = pq.read_table(sorted(dtypes_output.glob("part-*.parquet"))[0], columns=["doc_id", "embedding"])
    with pytest.raises(duckdb.NotImplementedException):
        duckdb.sql("SELECT * FROM halves").fetchall()
    floats = halves.cast(pa.schema([halves.schema.field("doc_id"), pa.field("embedding", pa.list_(pa.float32(), d))]))
    got = duckdb.sql("SELECT embedding FROM floats WHERE embedding IS NOT NULL").fetchall()
    assert np.array_equal(np.asarray([r[0] for r in got], dtype=np.float32),
                          np.asarray([v for v in halves["embedding"].to_pylist() if v is not None], dtype=np.float32))


def test_lancedb_searches_float16_and_bits_and_int8_mapped_back(dtypes_output: Path, tmp_path: Path) -> None:
    lancedb = pytest.importorskip("lancedb", reason="lancedb is not installed (pip install -e '.[test]')")
    db = lancedb.connect(str(tmp_path / "lance"))
    dataset = ds.dataset(dtypes_output, format="parquet")
    # A rejected row's null vector: LanceDB refuses it unless told (null keeps the row, drop leaves it out).
    table = db.create_table("docs", data=dataset, on_bad_vectors="null")
    assert table.count_rows() == len(TEXTS)
    query = FLOATS[6]  # id-0007
    hits = table.search(query, vector_column_name="embedding").distance_type("cosine").limit(5).to_list()
    assert [h["doc_id"] for h in hits] == stored_neighbours(FLOATS.astype(np.float16), 6, 5)
    # Bits: as fixed_size_list<uint8>, Lance's hamming distance.
    whole = dataset.to_table(columns=["doc_id", "emb_bits"]).combine_chunks()
    bits = whole["emb_bits"].chunk(0)
    as_bytes = pa.FixedSizeListArray.from_arrays(
        pa.Array.from_buffers(pa.uint8(), len(bits) * bits.type.byte_width, [None, bits.buffers()[1]]),
        bits.type.byte_width, mask=bits.is_null())
    bit_table = db.create_table("bits", data=pa.table({"doc_id": whole["doc_id"], "bits": as_bytes}).filter(
        pc.is_valid(as_bytes)))
    q_bits = np.packbits(query > 0)
    found = bit_table.search(q_bits, vector_column_name="bits").distance_type("hamming").limit(len(IDS)).to_list()
    assert sorted((h["doc_id"], int(h["_distance"])) for h in found) == sorted(hamming_neighbours(6, len(IDS)))
    # int8: Lance searches float vectors only; map the codes back with the part's ranges.
    i8 = dataset.to_table(columns=["doc_id", "emb_i8"]).combine_chunks()
    present = i8.filter(pc.is_valid(i8["emb_i8"]))
    floats = dequantize(present["emb_i8"].chunk(0).values.to_numpy().reshape(-1, DTYPE_DIM), int8_ranges(dtypes_output))
    mapped = db.create_table("i8", data=pa.table({"doc_id": present["doc_id"], "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(floats.reshape(-1)), DTYPE_DIM)}))
    hits = mapped.search(query).distance_type("cosine").limit(5).to_list()
    # The five nearest of the mapped-back vectors (rejected rows left out), ties in either order.
    ids = present["doc_id"].to_pylist()
    sims = floats.astype(np.float64) @ query / (np.linalg.norm(floats, axis=1) * np.linalg.norm(query))
    got = [sims[ids.index(h["doc_id"])] for h in hits]
    np.testing.assert_allclose(sorted(got, reverse=True), np.sort(sims)[::-1][:5], atol=1e-6)
