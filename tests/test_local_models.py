"""A local model other than the bundled one: tiny BERT sentence-transformers
models built and saved by the tests themselves (random weights, a WordPiece
vocabulary written here, nothing downloaded), loaded from a folder or from a
Hugging Face cache laid out on disk, their vectors against
sentence-transformers' own `encode`, `text_prefix` applied."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, error_lines
from pipeline.config.job import ProviderConfig
from pipeline.errors import ConfigError
from pipeline.providers import local_onnx
from pipeline.providers.local import LocalProvider
from test_local_provider import _embed as embed_with

pytestmark = pytest.mark.slow  # builds models, loads torch, runs the CLI

MIN_COSINE = 0.999  # issue 23: a local model's vectors against sentence-transformers' own encode
HIDDEN = 32
MAX_SEQ = 40  # tokens: the longer texts below are cut, by both sides alike
PREFIX = "passage: "
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "passage", "query", ":", "the", "a", "sea", "otter", "floats",
         "on", "its", "back", "data", "pipeline", ".", ","] + list("abcdefghijklmnopqrstuvwxyz") \
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
TEXTS = ["The sea otter floats on its back.", "data pipeline", "a", "", "unknown wörds 数据 🙂",
         "the data " * 60, "query: a back"]


def save_tiny_model(folder: Path, pooling: str = "cls", normalize: bool = True) -> Path:
    """A BERT sentence-transformers model of random weights (seeded), saved to `folder`."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    raw = folder.parent / f"{folder.name}-transformer"
    raw.mkdir(parents=True)
    (raw / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(raw / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=HIDDEN, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                initializer_range=0.3))  # BERT's 0.02 makes every text's vector nearly the same
    bert.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    modules: list[Any] = [models.Transformer(str(raw), max_seq_length=MAX_SEQ),
                          models.Pooling(HIDDEN, pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    shutil.rmtree(raw)
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("models")
    save_tiny_model(base / "bge-like", pooling="cls")  # BGE: CLS pooling, then unit length
    save_tiny_model(base / "e5-like", pooling="mean")  # E5: mean pooling
    save_tiny_model(base / "raw-mean", pooling="mean", normalize=False)  # no Normalize module
    save_tiny_model(base / "max-pooled", pooling="max")  # pooling the graph does not reproduce
    return base


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(local_onnx.CACHE_ENV, str(tmp_path / "graphs"))
    return tmp_path / "graphs"


def reference(folder: Path, texts: list[str], normalize: bool = True) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=normalize,
                                                                  convert_to_numpy=True)


def embed(folder: Path | str, texts: list[str], **extra: Any) -> tuple[np.ndarray, LocalProvider]:
    provider = LocalProvider(ProviderConfig(name="local", type="local", model=str(folder), device="cpu", **extra),
                             None)
    return embed_with(provider, texts), provider


def min_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.min(np.sum(got * expected, axis=1)
                        / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)))


@pytest.mark.parametrize("name", ["bge-like", "e5-like"])
def test_a_bert_model_from_a_folder_runs_on_openvino_equal_to_sentence_transformers_with_its_prefix(
        models_dir: Path, graph_cache: Path, name: str) -> None:
    got, provider = embed(models_dir / name, TEXTS, text_prefix=PREFIX)
    assert provider.backend == "openvino"
    assert got.shape == (len(TEXTS), HIDDEN) and got.dtype == np.float32
    expected = reference(models_dir / name, [PREFIX + t for t in TEXTS])
    assert min_cosine(got, expected) >= MIN_COSINE
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the prefix is applied: the texts without it make other vectors
    unprefixed = reference(models_dir / name, TEXTS)
    assert min_cosine(got, unprefixed) < 0.99
    assert [p.name.startswith(name) for p in graph_cache.iterdir()] == [True]  # its own cached graph


def test_normalize_false_keeps_the_models_own_lengths(models_dir: Path) -> None:
    folder = models_dir / "raw-mean"
    got, provider = embed(folder, TEXTS, normalize=False)
    assert provider.backend == "openvino"
    expected = reference(folder, TEXTS, normalize=False)
    assert min_cosine(got, expected) >= MIN_COSINE
    assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=0.01)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    unit, _ = embed(folder, TEXTS)  # normalize defaults to true
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_a_model_the_graph_cannot_reproduce_runs_on_torch_with_a_one_line_note(
        models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    got, provider = embed(models_dir / "max-pooled", TEXTS)
    assert provider.backend == "torch"
    notes = [r.getMessage() for r in caplog.records if r.name == "pipeline" and "torch" in r.getMessage()]
    assert notes == ["local model max-pooled: runs on torch (the OpenVINO path takes BERT-family models: max pooling)"]
    assert min_cosine(got, reference(models_dir / "max-pooled", TEXTS)) >= MIN_COSINE


def test_an_id_in_the_local_hugging_face_cache_loads_offline(models_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    commit = "0" * 39 + "1"
    snapshot = hub / "models--test-org--tiny-bge" / "snapshots" / commit
    shutil.copytree(models_dir / "bge-like", snapshot)
    (hub / "models--test-org--tiny-bge" / "refs").mkdir()
    (hub / "models--test-org--tiny-bge" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    got, provider = embed("test-org/tiny-bge", TEXTS[:3])
    assert provider.backend == "openvino"
    assert min_cosine(got, reference(models_dir / "bge-like", TEXTS[:3])) >= MIN_COSINE


def test_dimensions_other_than_the_models_are_refused(models_dir: Path) -> None:
    provider = LocalProvider(ProviderConfig(name="local", type="local", model=str(models_dir / "e5-like"),
                                            device="cpu"), 64)
    with pytest.raises(ConfigError) as info:
        asyncio.run(provider.start())
    assert str(info.value) == f"embedding.dimensions: the local model {models_dir / 'e5-like'} makes 32, not 64"


# ------------------------------------------------------------------ whole jobs
def run_cli(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               **env_extra)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def write_local_job(tmp_path: Path, provider: str) -> Path:
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: local-model
input: {{path: in.parquet, text_column: text}}
output: {{path: out, rows_per_part: 4}}
embedding: {{model: tiny-bge}}
providers: [{provider}]
""")
    return job


def test_a_job_with_a_model_folder_beside_it_writes_its_vectors_and_a_new_prefix_needs_restart(
        models_dir: Path, tmp_path: Path, graph_cache: Path) -> None:
    shutil.copytree(models_dir / "bge-like", tmp_path / "models" / "bge")
    job = write_local_job(tmp_path, '{name: local, type: local, model: ./models/bge, text_prefix: "passage: "}')
    env = {local_onnx.CACHE_ENV: str(graph_cache)}
    result = run_cli("run", str(job), "--no-progress", env_extra=env)
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), HIDDEN)
    vectors = table.column("embedding").to_pylist()
    kept = [i for i, t in enumerate(TEXTS) if t]
    assert [i for i, v in enumerate(vectors) if v is not None] == kept  # the empty text is skipped
    got = np.asarray([vectors[i] for i in kept], dtype=np.float32)
    assert min_cosine(got, reference(tmp_path / "models" / "bge", [PREFIX + TEXTS[i] for i in kept])) >= MIN_COSINE
    assert "torch" not in result.stderr

    job.write_text(job.read_text().replace('"passage: "', '"query: "'))
    refused = run_cli("run", str(job), "--no-progress", env_extra=env)
    assert refused.returncode == 2
    assert "text_prefix" in refused.stderr and "--restart" in refused.stderr


def test_an_id_not_in_the_local_cache_exits_2_saying_how_to_fetch_it_and_downloads_nothing(tmp_path: Path) -> None:
    job = write_local_job(tmp_path, "{name: local, type: local, model: BAAI/bge-small-en-v1.5}")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for command in ("validate", "run"):
        result = run_cli(command, str(job), env_extra=env)
        assert result.returncode == 2, result.stderr
        assert error_lines(result.stderr) == [
            f"error: providers[local].model: 'BAAI/bge-small-en-v1.5' is neither a folder nor in the local Hugging "
            f"Face cache ({tmp_path / 'hf' / 'hub'}); fetch it once with: hf download BAAI/bge-small-en-v1.5 (or give "
            f"the folder of a saved sentence-transformers model)"], result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf" / "hub" / "models--BAAI--bge-small-en-v1.5").exists()
