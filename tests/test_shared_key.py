"""Many processes, one key: `--shard K/N` runs of one job, and different jobs,
against one loopback server that enforces the key's RPM and TPM over a
sliding window, stay under it together and still use it.

The server and the runs are told the same short window (a 4-second "minute",
the client through its provider's `rate_window_s`) so a few windows pass in seconds.
Figures come from what the server counted: the requests it refused (429) over
the whole run, and the requests and tokens it accepted in whole windows once
every run is under way (one window after the last run's start-up probe: a run
that starts spends its first second loading, not sending).
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, docs_table, provider_entry, read_parts, write_job, write_parquet
from fakeprovider import FakeProvider
from pipeline.core.probe import PROBE_TEXTS

WINDOW_S = 5.0  # what "per minute" means to the server and to the runs here
RPM = 100  # requests a window, for the whole key
TPM = 10_000  # tokens a window: with ~125-token requests this binds first (80 requests)
WARM_UP_WINDOWS = 1  # after the last run's first request, before the pace is measured
MEASURED_WINDOWS = 2  # pace measured over this many whole windows once every run is sending
ROWS_PER_REQUEST = 5
CONCURRENCY = 4  # requests in flight per run
ROWS_PER_PART = 100
RUN_TIMEOUT_S = 120

pytestmark = pytest.mark.slow  # whole runs as subprocesses, over several windows

MAX_REFUSED_SHARE = 0.02
MIN_PACE = 0.85  # of the tightest limit, over the measured windows


def texts_for(n: int, prefix: str, seed: int) -> list[str]:
    """Distinct texts of 12 to 40 cl100k tokens (about 25 on average)."""
    rng = random.Random(seed)
    words = "river stone cloud lamp orbit meadow signal harbor copper lantern whisper glacier".split()
    return [f"{prefix} {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(10, 38))) for i in range(n)]


def make_job(directory: Path, fp: FakeProvider, name: str, rows: int, seed: int, *, rpm: int = RPM,
             tpm: int | None = TPM) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_parquet(directory / "data.parquet", docs_table(texts_for(rows, name, seed)))
    limits = {"requests_per_minute": rpm, **({"tokens_per_minute": tpm} if tpm else {})}
    provider = provider_entry(fp, **limits, max_concurrency=CONCURRENCY, rate_window_s=WINDOW_S, timeout_s=10)
    return write_job(directory, [provider], rows_per_part=ROWS_PER_PART, job_name=name,
                     batching={"max_inputs_per_request": ROWS_PER_REQUEST},
                     retry={"max_attempts": 6, "initial_backoff_s": 0.2, "max_backoff_s": 2})


def run_together(runs: list[tuple[Path, list[str]]]) -> list[subprocess.CompletedProcess[str]]:
    """Start every `run JOB ARGS` at once (their providers count over the short window); wait for all."""
    env = cli_env()
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for job, args in runs]
    done = []
    for (job, args), proc in zip(runs, procs):
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def refused_share(fp: FakeProvider) -> float:
    metered = fp.metered
    return sum(1 for _, _, accepted in metered if not accepted) / len(metered)


def server_figures(fp: FakeProvider, runs: int) -> tuple[float, float]:
    """(share of requests refused, pace: what was accepted over the measured
    windows once every run is under way, as a share of the tightest limit)."""
    metered = fp.metered
    refused = refused_share(fp)
    probes = [at for at, body in zip(fp.arrivals, fp.requests) if body.get("input", [None])[0] == PROBE_TEXTS[0]]
    assert len(probes) == runs
    start = probes[-1] + WARM_UP_WINDOWS * WINDOW_S
    end = start + MEASURED_WINDOWS * WINDOW_S
    assert metered[-1][0] >= end, "the runs finished before the measured windows were over"
    inside = [(tokens, accepted) for at, tokens, accepted in metered if start <= at < end]
    requests = sum(1 for _, accepted in inside if accepted) / (RPM * MEASURED_WINDOWS)
    tokens = sum(t for t, accepted in inside if accepted) / (TPM * MEASURED_WINDOWS)
    return refused, max(requests, tokens)


def rows_for(windows: float) -> int:
    """Rows that take about `windows` windows at the TPM limit (25 tokens a row)."""
    return int(windows * TPM / 25) // ROWS_PER_PART * ROWS_PER_PART


def assert_complete(result: subprocess.CompletedProcess[str], out: Path, rows: int) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "_SUCCESS").exists()
    assert read_parts(out).num_rows == rows


@pytest.mark.parametrize("headers", [True, False], ids=["with_headers", "without_headers"])
def test_four_shards_each_naming_the_keys_whole_limit_stay_under_it_together(tmp_path: Path, headers: bool) -> None:
    # without headers only refusals are counted: a window and a half of work holds every shard to its quarter
    rows = rows_for(WARM_UP_WINDOWS + MEASURED_WINDOWS + 1 if headers else 1.5)
    with FakeProvider(dim=8, rpm=RPM, tpm=TPM, window_s=WINDOW_S, limit_headers=headers) as fp:
        job = make_job(tmp_path, fp, "shards", rows, seed=1)
        results = run_together([(job, ["--shard", f"{k}/4"]) for k in range(4)])
        refused, pace = server_figures(fp, 4) if headers else (refused_share(fp), None)
    print(f"4 shards, headers={headers}: {refused:.2%} refused" + (f", pace {pace:.1%} of the tightest limit" if pace else ""))
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    assert_complete(results[0], tmp_path / "out", rows)
    assert refused <= MAX_REFUSED_SHARE
    if pace is not None:  # without headers each shard keeps to a quarter: safe, not necessarily the whole key
        assert pace >= MIN_PACE


def test_two_jobs_on_one_key_share_it_by_its_headers(tmp_path: Path) -> None:
    rows = rows_for((WARM_UP_WINDOWS + MEASURED_WINDOWS + 1) / 2)
    with FakeProvider(dim=8, rpm=RPM, tpm=TPM, window_s=WINDOW_S) as fp:
        jobs = [make_job(tmp_path / name, fp, name, rows, seed=i) for i, name in enumerate(["docs", "tickets"])]
        results = run_together([(job, []) for job in jobs])
        refused, pace = server_figures(fp, 2)
    print(f"2 jobs: {refused:.2%} refused, pace {pace:.1%} of the tightest limit")
    for job, result in zip(jobs, results):
        assert_complete(result, job.parent / "out", rows)
    assert refused <= MAX_REFUSED_SHARE
    assert pace >= MIN_PACE


KEY_RPM = 120  # issue 25: two unrelated jobs, 2,400 and 600 rows, each naming the key's whole RPM
MIN_PACE_TOGETHER = 0.95
MAX_REFUSED_TOGETHER = 0.01


def test_two_jobs_of_four_to_one_rows_use_the_whole_key_with_the_smaller_gone(tmp_path: Path) -> None:
    """When the smaller job ends, its requests age out of the key's window
    over the next one; the other takes that room as it frees (it took a
    window to grow into it: 88% of the key's pace together). Pace: every
    request the key accepted, probes included, from the first arrival to the
    last, against the key's RPM over that span."""
    sizes = {"docs": 2400, "tickets": 600}
    with FakeProvider(dim=8, rpm=KEY_RPM, window_s=WINDOW_S) as fp:
        jobs = [make_job(tmp_path / name, fp, name, rows, seed=i, rpm=KEY_RPM, tpm=None)
                for i, (name, rows) in enumerate(sizes.items())]
        results = run_together([(job, []) for job in jobs])
        metered = fp.metered
    for job, result, rows in zip(jobs, results, sizes.values()):
        assert_complete(result, job.parent / "out", rows)
    refused = refused_share(fp)
    span = metered[-1][0] - metered[0][0]
    pace = sum(1 for _, _, accepted in metered if accepted) / (KEY_RPM * span / WINDOW_S)
    print(f"2 jobs 4:1 on {KEY_RPM} RPM: {refused:.2%} refused of {len(metered)}, pace {pace:.1%} over {span:.1f} s")
    assert refused <= MAX_REFUSED_TOGETHER
    assert pace >= MIN_PACE_TOGETHER
