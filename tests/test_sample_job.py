"""The README's sample job: it validates, and the Parquet and CSV copies of the
sample corpus give the same rows and the same vectors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SAMPLE_JOB = REPO / "jobs" / "sample.yaml"
ROWS = 120  # enough to cross a part boundary with rows_per_part 50


def _sample_job_reading(tmp_path: Path, input_path: str, name: str) -> Path:
    text = SAMPLE_JOB.read_text()
    assert "../sample_data/docs/*.parquet" in text and "../out/sample-docs" in text
    text = text.replace("../sample_data/docs/*.parquet", input_path).replace("../out/sample-docs", str(tmp_path / name))
    text = text.replace("rows_per_part: 1000", "rows_per_part: 50")
    job = tmp_path / f"{name}.yaml"
    job.write_text(text)
    return job


def _pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_sample_job_validates_as_shipped() -> None:
    proc = _pipeline("validate", str(SAMPLE_JOB))
    assert proc.returncode == 0, proc.stderr
    assert "ok: 2 input file(s)" in proc.stdout


def test_sample_corpus_as_parquet_and_as_csv_gives_the_same_rows_and_vectors(tmp_path: Path) -> None:
    outputs = {}
    for name, path in (("parquet", str(REPO / "sample_data/docs/*.parquet")), ("csv", str(REPO / "sample_data/docs.csv"))):
        proc = _pipeline("run", str(_sample_job_reading(tmp_path, path, name)), "--limit", str(ROWS), "--no-progress")
        assert proc.returncode == 0, proc.stderr
        out = tmp_path / name
        assert not (out / "_SUCCESS").exists()  # --limit never claims the whole job
        outputs[name] = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    parquet, csv = outputs["parquet"], outputs["csv"]
    expected_ids = pq.read_table(REPO / "sample_data/docs/part-a.parquet", columns=["doc_id"]).column("doc_id").to_pylist()[:ROWS]
    assert parquet.column("doc_id").to_pylist() == expected_ids
    assert csv.column("doc_id").to_pylist() == expected_ids
    assert parquet.column("title").to_pylist() == csv.column("title").to_pylist()
    pv, cv = parquet.column("embedding").to_pylist(), csv.column("embedding").to_pylist()
    assert [v is None for v in pv] == [v is None for v in cv]
    assert any(v is None for v in pv), "the sample's first rows include an empty body"
    for a, b in zip(pv, cv):
        if a is not None:
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
