"""Shared helpers: small input files, job files, and the CLI run as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pipeline` is imported from the checkout, installed or not
    sys.path.insert(0, str(REPO))

from fakeprovider import FakeProvider, vector_for  # noqa: E402
from pipeline.core.probe import PROBE_TEXTS  # noqa: E402
KEY_VAR = "EMB_TEST_KEY"
KEY = "sk-test-key"  # FakeProvider's default key
MODEL = "text-embedding-3-small"
FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}
CLI_TIMEOUT_S = 60


def sample_texts(n: int, prefix: str = "doc") -> list[str]:
    """Distinct, non-blank texts with the characters CSV and JSON find awkward."""
    extras = ["", ", with a comma", ' and "quotes"', "\nand a second line", " — naïve café 世界 🙂", "\ttabbed"]
    return [f"{prefix} {i}: text number {i}{extras[i % len(extras)]}" for i in range(n)]


def docs_table(texts: list[str | None], *, ids: list[str] | None = None) -> pa.Table:
    n = len(texts)
    ids = ids if ids is not None else [f"id-{i:04d}" for i in range(n)]
    titles = [None if i % 5 == 3 else f"title {i}" for i in range(n)]
    return pa.table(
        {"doc_id": pa.array(ids, pa.string()), "title": pa.array(titles, pa.string()),
         "body": pa.array(texts, pa.string())}
    )


def write_parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path, row_group_size=11)
    return path


def write_csv(path: Path, table: pa.Table) -> Path:
    pacsv.write_csv(table, path)
    return path


def provider_entry(fp: FakeProvider | str, name: str = "fake", **extra: Any) -> dict[str, Any]:
    base_url = fp if isinstance(fp, str) else fp.base_url
    entry = {"name": name, "base_url": base_url, "api_key": "${" + KEY_VAR + "}",
             "timeout_s": 5, "max_concurrency": 4}
    entry.update(extra)
    return entry


def write_job(
    directory: Path,
    providers: list[dict[str, Any]],
    *,
    input_path: str = "data.parquet",
    text_column: str | None = "body",
    id_column: str | None = "doc_id",
    keep_columns: list[str] | None = None,
    rows_per_part: int = 7,
    embedding: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    job_name: str = "test-job",
    file_name: str = "job.yaml",
    output: str = "out",
) -> Path:
    inp: dict[str, Any] = {"path": input_path}
    if text_column is not None:
        inp["text_column"] = text_column
    if id_column is not None:
        inp["id_column"] = id_column
    if keep_columns is not None:
        inp["keep_columns"] = keep_columns
    job = {
        "name": job_name,
        "input": inp,
        "output": {"path": output, "rows_per_part": rows_per_part},
        "embedding": {"model": MODEL, **(embedding or {})},
        "batching": {"max_inputs_per_request": 5, **(batching or {})},
        "providers": providers,
        "retry": retry or FAST_RETRY,
    }
    path = directory / file_name
    path.write_text(yaml.safe_dump(job, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def cli_env(key: str | None = KEY, env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the key (or none) in KEY_VAR."""
    env = {k: v for k, v in os.environ.items() if k != KEY_VAR}
    if key is not None:
        env[KEY_VAR] = key
    env.update(env_extra or {})
    return env


def run_cli(*args: str, key: str | None = KEY, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` from the repository root, the key in KEY_VAR."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO, env=cli_env(key, env_extra), capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )


def run_job(job: Path, *args: str, key: str | None = KEY,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline run JOB --no-progress ARGS`, to its end."""
    return run_cli("run", str(job), "--no-progress", *args, key=key, env_extra=env_extra)


def read_summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "_summary.json").read_text())


def start_run(job: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m pipeline run JOB --no-progress ARGS` in the background, to signal or kill it."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"), key=lambda p: p.name)


def read_parts(out: Path) -> pa.Table:
    parts = part_files(out)
    assert parts, f"no part files in {out}"
    return pa.concat_tables([pq.read_table(p) for p in parts])


def assert_vectors_exact(table: pa.Table, texts: list[str | None], dim: int, column: str = "embedding") -> None:
    """Each row's vector is exactly vector_for(text, dim); a None text expects a null vector."""
    vectors = table.column(column).to_pylist()
    assert len(vectors) == len(texts)
    for i, (vec, text) in enumerate(zip(vectors, texts)):
        if text is None:
            assert vec is None, f"row {i}: expected a null vector"
            continue
        assert vec is not None, f"row {i}: vector is null"
        got = np.asarray(vec, dtype=np.float32)
        assert np.array_equal(got, vector_for(text, dim)), f"row {i}: vector differs from vector_for"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def rows_sent(fp: FakeProvider) -> Counter[str]:
    """Texts the server answered, without each run's start-up probe (the vector-space check)."""
    return Counter(t for t in fp.inputs_received if t not in PROBE_TEXTS)


def read_checkpoint(out: Path) -> Any:
    """The output's checkpoint as every reader takes it (snapshots and records), or None."""
    from pipeline.checkpoint.manifest import Checkpoint
    from pipeline.storage import LocalOutput

    return Checkpoint.read(LocalOutput(str(out)))


def committed_units(out: Path) -> set[int]:
    """Units the output's checkpoint lists as committed."""
    checkpoint = read_checkpoint(out)
    return set(checkpoint.ledger.committed_seqs()) if checkpoint is not None else set()


# Modules whose tests run the CLI as a subprocess (a second or more each: whole
# jobs, kills and reruns, a moto S3 server, the local model, Airflow).
# `pytest -m "not slow"` is the inner loop (the pure policies and the in-process
# pieces); CI runs everything.
SLOW_MODULES = {"test_run", "test_chaos", "test_logs", "test_reuse", "test_vector_space", "test_packaging",
                "test_durability", "test_s3", "test_s3_cache", "test_readers", "test_sample_job",
                "test_local_provider", "test_airflow"}


def pytest_collection_modifyitems(items: list[Any]) -> None:
    import pytest

    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll `condition` every 5 ms; fail the test if it is not true within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
