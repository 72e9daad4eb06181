"""What schedulers do to jobs: SIGTERM while a provider stalls, N shards on
one output (one of them killed), a second writer. Real subprocesses, real
files and a real loopback provider; outputs compared row for row and bit for bit."""
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
import pytest

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
from pipeline.manifest import RunLock
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


# ------------------------------------------------------------------ sharding
@pytest.mark.timeout(120)
def test_four_concurrent_shards_one_killed_and_rerun_alone_give_the_unsharded_output(tmp_path: Path) -> None:
    texts = _texts(160)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out, ref = tmp_path / "out", tmp_path / "ref"
    with FakeProvider(dim=DIM, latency_s=0.03) as fp, FakeProvider(dim=DIM) as ref_fp:
        job = _job(tmp_path, fp, rows_per_part=4, per_request=2, max_concurrency=1)
        shards = {k: _start(job, "--shard", f"{k}/4") for k in range(4)}
        _wait_until(lambda: any(s % 4 == 2 for s in _committed(out)))
        assert shards[2].poll() is None, "shard 2 finished before it could be killed; give it more rows"
        shards[2].kill()
        shards[2].wait(timeout=10)
        killed_with = {s for s in _committed(out) if s % 4 == 2}
        for k in (0, 1, 3):
            _, stderr = shards[k].communicate(timeout=60)
            assert shards[k].returncode == 0, stderr
        assert not (out / "_SUCCESS").exists(), "_SUCCESS written while shard 2 still had work"
        assert {s for s in range(40) if s % 4 != 2} <= _committed(out)

        report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert report["state"] == "incomplete" and not report["running"]
        by_shard = {tuple(s["shard"]): s for s in report["shards"]}
        assert set(by_shard) == {(k, 4) for k in range(4)}
        assert all(by_shard[(k, 4)]["last_run"]["status"] == "done" for k in (0, 1, 3))
        assert by_shard[(2, 4)]["last_run"] is None and by_shard[(2, 4)]["units_done"] == len(killed_with)
        assert not any(s["running"] for s in report["shards"])

        rerun = _start(job, "--shard", "2/4")
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
        sent = _sent(fp, texts)

        ref_job = _job(tmp_path, ref_fp, output="ref", file_name="ref.yaml", rows_per_part=4, per_request=2)
        unsharded = run_cli("run", str(ref_job), "--no-progress")
        assert unsharded.returncode == 0, unsharded.stderr

    assert (out / "_SUCCESS").exists()
    _assert_same_output(out, ref)
    assert_vectors_exact(read_parts(out), _expected(texts), DIM)
    # Only shard 2's rows in flight at its kill were sent twice; every other row once.
    twice = {t for t, n in Counter(sent).items() if n > 1}
    assert set(sent) == {t for t in texts if t.strip()}
    assert all(i // 4 % 4 == 2 for i, t in enumerate(texts) if t in twice)
    text = run_cli("status", str(job), key=None)
    assert text.returncode == 0 and "complete" in text.stdout
    assert all(f"shard {k}/4" in text.stdout for k in range(4)), text.stdout


def test_status_shows_which_shards_hold_their_lock_now(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(12)))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp)
        assert run_cli("run", str(job), "--no-progress", "--shard", "0/3").returncode == 0
        with RunLock(out, (1, 3)):
            report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
            text = run_cli("status", str(job), key=None).stdout
    assert report["running"] is True
    assert {tuple(s["shard"]): s["running"] for s in report["shards"]} == {(0, 3): False, (1, 3): True, (2, 3): False}
    assert "shard 1/3" in text and "running now" in text
    shard0 = next(line for line in text.splitlines() if "shard 0/3" in line)
    assert "done" in shard0 and "running now" not in shard0


# ------------------------------------------------------------------ one writer
@pytest.mark.parametrize("shard", [None, "1/2"], ids=["unsharded", "same_shard"])
def test_second_run_on_a_live_output_refuses_at_once_and_a_killed_holder_frees_it(tmp_path: Path, shard: str | None) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    extra = ["--shard", shard] if shard else []
    with FakeProvider(dim=DIM, latency_s=0.2) as fp:
        job = _job(tmp_path, fp, max_concurrency=1)
        first = _start(job, *extra)
        _wait_until(lambda: fp.count() >= 2)  # it holds the output
        second = run_cli("run", str(job), "--no-progress", *extra)
        status = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert first.poll() is None
        first.kill()
        first.wait(timeout=10)
        third = _start(job, *extra)
        _, stderr = third.communicate(timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert "in use" in lines[0] and str(out) in lines[0], lines[0]
    assert status["running"] is True
    assert third.returncode == 0, stderr
