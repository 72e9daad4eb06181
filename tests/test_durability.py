"""What schedulers do to jobs: SIGTERM while a provider stalls. Real
subprocesses, real files and a real loopback provider."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from conftest import (
    KEY,
    KEY_VAR,
    REPO,
    assert_vectors_exact,
    docs_table,
    error_lines,
    part_files,
    provider_entry,
    read_parts,
    run_cli,
    sample_texts,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider
from pipeline import sink
from pipeline.runner import GRACE_S as DEFAULT_GRACE_S

DIM = 8
KEEP = ["title"]


# ------------------------------------------------------------------ helpers
def _texts(n: int) -> list[str]:
    """Distinct texts, with a blank one now and then (a rejected row, a null vector)."""
    texts = sample_texts(n)
    for i in range(5, n, 23):
        texts[i] = "   "
    return texts


def _expected(texts: list[str]) -> list[str | None]:
    return [None if not t.strip() else t for t in texts]


def _job(tmp_path: Path, fp: FakeProvider, *, output: str = "out", file_name: str = "job.yaml",
         rows_per_part: int = 3, per_request: int = 1, **provider: Any) -> Path:
    return write_job(
        tmp_path, [provider_entry(fp, **{"max_concurrency": 4, **provider})], keep_columns=KEEP,
        rows_per_part=rows_per_part, embedding={"dimensions": DIM},
        batching={"max_inputs_per_request": per_request}, output=output, file_name=file_name,
    )


def _start(job: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_VAR} | {KEY_VAR: KEY}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "_manifest.json").read_text())


def _committed(out: Path) -> set[int]:
    path = out / "_manifest.json"
    return {int(s) for s in json.loads(path.read_text())["units"]} if path.exists() else set()


def _temps(out: Path) -> set[Path]:
    return {p for p in out.rglob(".*") if sink.TEMP_MARK in p.name}


def _assert_manifest_consistent(out: Path) -> dict[str, Any]:
    """The manifest is whole JSON and every part it lists is there, complete."""
    manifest = _manifest(out)
    for seq, record in [*manifest["units"].items(), *manifest["partial"].items()]:
        part = out / sink.part_name(int(seq))
        assert part.exists(), f"the manifest lists {part.name}, which is missing"
        assert pq.read_table(part).num_rows == record["rows"], f"{part.name} is not what the manifest says"
    return manifest


def _assert_same_output(out: Path, reference: Path) -> None:
    """Same part files, same decoded tables (ids, kept columns, vectors bit for bit, metadata)."""
    names = [p.name for p in part_files(out)]
    assert names == [p.name for p in part_files(reference)]
    for name in names:
        got, want = pq.read_table(out / name), pq.read_table(reference / name)
        assert got.equals(want, check_metadata=True), f"{name} differs from the uninterrupted run's"
        bits = [np.asarray(t.column("embedding").combine_chunks().values, dtype=np.float32).view(np.uint32)
                for t in (got, want)]
        assert np.array_equal(*bits), f"{name}: vectors differ in their bits"
    assert read_parts(out).equals(read_parts(reference))
    assert pq.read_table(out / "_rejects.parquet").equals(pq.read_table(reference / "_rejects.parquet"))


def _sent(fp: FakeProvider, texts: list[str]) -> list[str]:
    """The job's texts the server answered (start-up probes left out)."""
    wanted = set(texts)
    return [t for t in fp.inputs_received if t in wanted]


# ------------------------------------------------------------------ SIGTERM
GRACE_S = 2.0
STOP_MARGIN_S = 4.0  # cancelling, checkpointing and interpreter exit, on a slow 2-core runner


def test_sigterm_with_a_stalled_request_exits_within_the_grace_period_and_a_rerun_completes(tmp_path: Path) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    ok = 8
    with FakeProvider(dim=DIM, script=["ok"] * ok + ["stall:60"] * 100) as fp:
        job = _job(tmp_path, fp, max_concurrency=2, timeout_s=120)
        proc = _start(job, "--grace-seconds", str(GRACE_S))
        _wait_until(lambda: fp.count() >= ok + 2)  # both slots now wait on a provider that stalls for 60 s
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - signalled
    assert proc.returncode == 1, stderr
    assert stopped_s < GRACE_S + STOP_MARGIN_S, f"took {stopped_s:.1f}s to stop after SIGTERM"
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1 and "SIGTERM" in error_lines(stderr)[0], stderr
    manifest = _assert_manifest_consistent(out)
    committed = {int(s) for s in manifest["units"]}
    assert committed, "the answered requests should have completed a part"
    assert not _temps(out)
    assert manifest["runs"][-1]["status"] == "stopped"
    assert not (out / "_SUCCESS").exists()

    with FakeProvider(dim=DIM) as fp2:
        job = _job(tmp_path, fp2)
        rerun = _start(job)
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
        assert Counter(_sent(fp2, texts)) == Counter(t for i, t in enumerate(texts) if i // 3 not in committed and t.strip())
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), _expected(texts), DIM)


def test_a_second_signal_stops_at_once_without_waiting_out_the_grace_period(tmp_path: Path) -> None:
    texts = _texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    ok = 8
    with FakeProvider(dim=DIM, script=["ok"] * ok + ["stall:60"] * 100) as fp:
        job = _job(tmp_path, fp, max_concurrency=2, timeout_s=120)
        proc = _start(job)  # the default grace period: 20 s
        _wait_until(lambda: fp.count() >= ok + 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=DEFAULT_GRACE_S / 2)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1 and "SIGINT" in error_lines(stderr)[0], stderr
    assert _assert_manifest_consistent(out)["units"]
    assert not _temps(out)


def test_grace_seconds_must_be_a_non_negative_number(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "job.yaml"), "--grace-seconds", "-1")
    assert result.returncode == 2
    assert "--grace-seconds" in result.stderr


