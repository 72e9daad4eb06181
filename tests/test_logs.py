"""What a scheduler reads: `--log-format json` (one JSON object per stderr
line, errors included, never a key), `_summary.json`, `status --check`, and
no progress bar unless a person is at a terminal."""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import (KEY, REPO, cli_env, docs_table, error_lines, provider_entry, run_cli, sample_texts, write_job,
                      write_parquet)
from fakeprovider import FakeProvider
from pipeline import logfmt
from pipeline.engine.progress import LOG_INTERVAL_S, Progress

N_ROWS = 30


def json_lines(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    return [json.loads(line) for line in lines]  # every line is one JSON object, or this raises


def make_job(tmp_path: Path, fp: FakeProvider | str, texts: list[str | None] | None = None) -> Path:
    write_parquet(tmp_path / "data.parquet", docs_table(texts if texts is not None else sample_texts(N_ROWS)))
    return write_job(tmp_path, [provider_entry(fp)])


def test_json_logs_are_one_object_per_line_with_the_summary_counters(tmp_path: Path) -> None:
    texts: list[str | None] = list(sample_texts(N_ROWS))
    texts[3] = ""  # rejected as empty: counted by reason
    with FakeProvider(dim=8) as fp:
        result = run_cli("--log-format", "json", "run", str(make_job(tmp_path, fp, texts)))
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stderr)
    for r in records:
        assert {"ts", "level", "event", "message"} <= r.keys()
        assert r["ts"].endswith("Z") and r["level"] in ("debug", "info", "warning", "error")
    summary = next(r for r in records if r["event"] == "summary")
    assert summary["status"] == "complete"
    assert summary["rows_embedded"] == N_ROWS - 1 and summary["rows_rejected"] == {"empty": 1}
    assert summary["tokens"] > 0 and summary["requests"] > 0
    assert summary["message"].startswith("complete: 29 rows embedded")
    (provider,) = [r for r in records if r["event"] == "summary.provider"]
    assert provider["provider"] == "fake" and provider["requests"] == summary["requests"]
    assert provider["message"].startswith("  fake: ready;")
    job = next(r for r in records if r["event"] == "summary.job")
    assert job["rows_done"] == N_ROWS and job["message"].startswith("job ")
    sources = next(r for r in records if r["event"] == "summary.sources")
    assert (sources["rows_from_providers"], sources["rows_deduped"], sources["rows_from_cache"]) == (N_ROWS - 1, 0, 0)
    assert sources["message"].startswith("vectors: 29 rows from providers")
    assert KEY not in result.stderr and KEY not in result.stdout


def test_json_log_format_is_accepted_after_the_command_too(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        result = run_cli("run", str(make_job(tmp_path, fp)), "--log-format", "json", "--no-progress")
    assert result.returncode == 0, result.stderr
    events = [r["event"] for r in json_lines(result.stderr)]
    assert events[-4:] == ["summary", "summary.sources", "summary.job", "summary.provider"]


def test_a_bad_job_in_json_mode_is_one_json_error_line_with_exit_2(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        job = make_job(tmp_path, fp)
    result = run_cli("--log-format", "json", "run", str(job), key=None)  # the env var is unset
    assert result.returncode == 2
    (record,) = json_lines(result.stderr)
    assert (record["level"], record["event"], record["exit_code"]) == ("error", "error", 2)
    assert "EMB_TEST_KEY" in record["message"]


def test_a_refused_key_in_json_mode_ends_with_one_error_object_and_never_shows_the_key(tmp_path: Path) -> None:
    wrong_key = "sk-wrong-key-do-not-log-123"
    with FakeProvider(dim=8) as fp:
        result = run_cli("--log-format", "json", "run", str(make_job(tmp_path, fp)), key=wrong_key)
    assert result.returncode == 1
    records = json_lines(result.stderr)
    errors = [r for r in records if r["event"] == "error"]
    assert len(errors) == 1 and errors[0]["exit_code"] == 1 and records[-1] is errors[0]
    assert wrong_key not in result.stderr and wrong_key not in result.stdout
    assert wrong_key not in (tmp_path / "out" / "_summary.json").read_text()


def test_text_errors_stay_one_plain_line(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        job = make_job(tmp_path, fp)
    result = run_cli("run", str(job), key=None)
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1 and result.stderr.count("\n") == 1


def test_the_summary_file_has_rows_tokens_cost_timings_and_per_provider_counters(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        result = run_cli("run", str(make_job(tmp_path, fp)), "--no-progress")
        requests = fp.count()
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    run, job = summary["run"], summary["job"]
    assert summary["status"] == "complete" and summary["model"] == "text-embedding-3-small"
    assert run["rows_embedded"] == run["rows_done"] == job["rows_done"] == N_ROWS
    assert run["tokens"] == job["tokens"] > 0
    assert summary["price_per_million_tokens_usd"] == 0.02
    assert run["cost_usd"] == pytest.approx(run["tokens"] / 1e6 * 0.02, abs=1e-8)
    assert job["cost_usd"] == pytest.approx(job["tokens"] / 1e6 * 0.02, abs=1e-8)
    assert run["elapsed_s"] > 0 and run["started_at"] <= run["finished_at"]
    fake = summary["providers"]["fake"]
    assert fake["requests"] == requests  # the probe included: every request the server saw
    assert fake["inputs"] >= N_ROWS and fake["tokens"] > 0 and fake["latency_p50_s"] is not None


def test_status_check_exits_1_until_the_job_is_complete_then_0(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        job = make_job(tmp_path, fp)
        before = run_cli("status", str(job), "--check")
        assert run_cli("run", str(job), "--no-progress", "--limit", "10").returncode == 0
        partial = run_cli("--log-format", "json", "status", str(job), "--check")
        assert run_cli("run", str(job), "--no-progress").returncode == 0
        after = run_cli("status", str(job), "--check")
    assert before.returncode == 1 and "not started" in error_lines(before.stderr)[0]
    assert partial.returncode == 1
    assert json_lines(partial.stderr)[-1]["exit_code"] == 1
    assert after.returncode == 0 and "complete" in after.stdout and after.stderr == ""


# -- the progress bar -----------------------------------------------------------


def run_with_terminals(job: Path, *, stdout_tty: bool, stderr_tty: bool) -> str:
    """Run the job with stdout and/or stderr on a pseudo-terminal; what reached stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    stderr_file = open(Path(job).parent / "stderr.txt", "w+b")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", str(job)],
            cwd=REPO, env=cli_env(), timeout=60,
            stdout=slave if stdout_tty else subprocess.DEVNULL,
            stderr=slave if stderr_tty else stderr_file,
        )
        assert proc.returncode == 0
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        stderr_file.seek(0)
        return (b"".join(chunks) + stderr_file.read()).decode("utf-8", "replace")
    finally:
        os.close(master)
        stderr_file.close()


@pytest.mark.parametrize(("stdout_tty", "stderr_tty"), [(False, True), (True, False), (False, False)])
def test_no_progress_bar_unless_both_stdout_and_stderr_are_terminals(tmp_path: Path, stdout_tty: bool, stderr_tty: bool) -> None:
    with FakeProvider(dim=8) as fp:
        text = run_with_terminals(make_job(tmp_path, fp), stdout_tty=stdout_tty, stderr_tty=stderr_tty)
    assert "complete: 30 rows embedded" in text
    assert "row/s" not in text and "\r" not in text.replace("\r\n", "\n")


def test_a_progress_bar_when_both_are_terminals(tmp_path: Path) -> None:
    with FakeProvider(dim=8) as fp:
        text = run_with_terminals(make_job(tmp_path, fp), stdout_tty=True, stderr_tty=True)
    assert "complete: 30 rows embedded" in text
    assert "100%" in text and "30/30" in text  # tqdm's bar


def test_json_progress_lines_carry_the_counters_every_interval() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logfmt.configure("json", debug=False, stream=stream)
    try:
        now = [0.0]
        progress = Progress(1000, None, clock=lambda: now[0])
        progress.advance(100, 5000)
        assert stream.getvalue() == ""  # not yet an interval
        now[0] = LOG_INTERVAL_S + 1
        progress.advance(200, 7000)
        (record,) = json_lines(stream.getvalue())
        assert record["event"] == "progress" and record["level"] == "info"
        assert (record["rows"], record["total_rows"], record["tokens"]) == (300, 1000, 12000)
        assert record["rows_per_s"] == pytest.approx(300 / now[0], abs=0.1)
        assert record["eta_s"] == pytest.approx(700 / (300 / now[0]), abs=0.1)
        assert record["message"].startswith("progress: 300/1,000 rows (30%)")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
