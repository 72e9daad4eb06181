"""The output opens as it is where the vectors are used: DuckDB (vector
functions on the embedding column), Polars (Array dtype), pandas (the
directory, bookkeeping files skipped) and LanceDB (a vector table straight
from the parts), and each finds a sample row's nearest neighbours."""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

from conftest import docs_table, provider_entry, run_cli, sample_texts, write_job, write_parquet
from fakeprovider import FakeProvider, vector_for

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
