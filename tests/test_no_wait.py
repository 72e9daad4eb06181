"""`run --no-wait` on Batch API jobs: each run submits what fits, collects what
finished, writes what is answered and returns (exit 99 while batches run);
runs repeated until one exits 0 give the output one waiting run gives, bit
for bit, with no batch submitted twice, SIGKILLs between and during runs
included. `status --json` lists the running batches and when to look again.
Against the loopback Files + Batches server (tests/fakebatch.py)."""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import docs_table, error_lines, provider_entry, read_parts, run_cli, run_job, start_run, write_parquet
from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider
from pipeline.core.probe import PROBE_TEXTS
from pipeline.errors import EXIT_BATCHES_RUNNING
from test_batch import (DIM, _job, _pieces, _texts, assert_tidy, batch_job, embedded, texts_with_far_repeats,
                        wait_until)
from test_durability import _assert_same_output as assert_same_output

pytestmark = pytest.mark.slow  # subprocess runs (conftest.SLOW_MODULES)

MAX_NO_WAIT_RUNS = 60  # a job of a few batches finishes in far fewer


def submitted(api: FakeBatchAPI) -> Counter[str]:
    return Counter({t: n for t, n in api.submitted.items() if t not in PROBE_TEXTS})


def no_wait_until_done(job: Path, pause_s: float) -> list[int]:
    """`run --no-wait` again and again (as cron would) until one exits 0; the exit statuses."""
    codes: list[int] = []
    while not codes or codes[-1] == EXIT_BATCHES_RUNNING:
        assert len(codes) < MAX_NO_WAIT_RUNS, f"no run finished the job: {codes}"
        result = run_job(job, "--no-wait")
        assert result.returncode in (0, EXIT_BATCHES_RUNNING), result.stderr
        assert "Traceback" not in result.stderr and error_lines(result.stderr) == [], result.stderr
        codes.append(result.returncode)
        time.sleep(pause_s)
    return codes


def waiting_reference(tmp_path: Path, texts: list[str], **provider: Any) -> Path:
    """The same job run once, waiting, on a server of its own: the output to match."""
    with FakeBatchAPI(dim=DIM, duration_s=0.2) as api:
        job = batch_job(tmp_path, api, output="ref", file_name="ref.yaml", **provider)
        result = run_job(job)
        assert result.returncode == 0, result.stderr
    return tmp_path / "ref"


def test_no_wait_runs_until_done_equal_one_waiting_run_and_submit_each_text_once(tmp_path: Path) -> None:
    texts = _texts(60)
    pieces = _pieces(texts)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeBatchAPI(dim=DIM, duration_s=0.6) as api:
        job = batch_job(tmp_path, api, max_inputs_per_batch=12)
        api.hold()  # the first run submits everything and finds nothing finished
        first = run_job(job, "--no-wait")
        assert first.returncode == EXIT_BATCHES_RUNNING, first.stderr
        created = list(api.created)
        assert len(created) >= 2 and set(submitted(api)) == pieces
        assert not (out / "_SUCCESS").exists()
        assert json.loads((out / "_manifest.json").read_text())["runs"][-1]["status"] == "waiting"

        # A second run while they still run submits nothing again and returns at once.
        again = run_job(job, "--no-wait")
        assert again.returncode == EXIT_BATCHES_RUNNING, again.stderr
        assert api.created == created

        api.release()
        codes = no_wait_until_done(job, pause_s=0.2)
    assert codes[-1] == 0 and (out / "_SUCCESS").exists()
    assert api.created == created, "a later run submitted a batch again"
    assert submitted(api) == Counter(pieces) and embedded(api) == Counter(pieces)
    assert_tidy(out, api)
    assert_same_output(out, waiting_reference(tmp_path, texts, max_inputs_per_batch=12))


def test_a_synchronous_job_ignores_no_wait(tmp_path: Path) -> None:
    texts = _texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, provider_entry(fp, name="sync"), output="out", file_name="job.yaml")
        result = run_job(job, "--no-wait")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert read_parts(tmp_path / "out").num_rows == len(texts)


def test_a_full_queue_submits_what_fits_and_later_runs_submit_the_rest(tmp_path: Path) -> None:
    texts = _texts(60)
    pieces = _pieces(texts)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeBatchAPI(dim=DIM, duration_s=0.3) as api:
        api.hold()
        job = batch_job(tmp_path, api, max_inputs_per_batch=8, enqueued_tokens_limit=120)
        first = run_job(job, "--no-wait")
        assert first.returncode == EXIT_BATCHES_RUNNING, first.stderr
        assert 0 < len(submitted(api)) < len(pieces), "the queue limit let everything in, or nothing"
        assert api.max_enqueued <= 120
        api.release()
        codes = no_wait_until_done(job, pause_s=0.2)
    assert codes[-1] == 0
    assert submitted(api) == Counter(pieces) and api.max_enqueued <= 120
    assert_same_output(tmp_path / "out", waiting_reference(tmp_path, texts, max_inputs_per_batch=8))


def test_status_json_lists_the_running_batches_and_when_to_look_again(tmp_path: Path) -> None:
    texts = _texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeBatchAPI(dim=DIM, duration_s=0.3) as api:
        api.hold()
        job = batch_job(tmp_path, api, max_inputs_per_batch=10)
        before = datetime.now(timezone.utc).replace(microsecond=0)
        assert run_job(job, "--no-wait").returncode == EXIT_BATCHES_RUNNING
        report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert sorted(report["batches_running"]) == sorted(api.created)
        soonest = datetime.fromisoformat(report["next_check_at"].replace("Z", "+00:00"))
        per_batch = [datetime.fromisoformat(b["next_check_at"].replace("Z", "+00:00")) for b in report["batches"]]
        assert soonest == min(per_batch) and soonest >= before
        api.release()
        no_wait_until_done(job, pause_s=0.2)
        done = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
    assert done["state"] == "complete" and done["batches_running"] == [] and done["next_check_at"] is None


KILLS = 8
SEED = 20261206


def _records(out: Path) -> list[dict[str, Any]]:
    folder = out / "_manifest.d" / "batches"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.exists() else []


def _killed(proc: Any) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.mark.timeout(240)
def test_no_wait_runs_killed_between_and_during_runs_submit_nothing_twice_and_equal_a_waiting_run(
        tmp_path: Path) -> None:
    rng = random.Random(SEED)
    texts = texts_with_far_repeats(rng, 90)
    pieces = _pieces(texts)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    provider = {"max_inputs_per_batch": 9}
    top = {"cache": str(tmp_path / "cache")}  # a text answered before a kill is never paid again
    with FakeBatchAPI(dim=DIM, duration_s=0.3, script=["ok", "stall_create:60"]) as api:
        job = batch_job(tmp_path, api, rows_per_part=3, top=top, **provider)
        # 1. Killed while the provider creates its second batch: recorded here as `submitting`.
        proc = start_run(job, "--no-wait")
        wait_until(lambda: len(api.created) >= 2)
        _killed(proc)
        assert any(r["state"] == "submitting" and r["input_file_id"] for r in _records(out))
        # 2. Killed while downloading the results of batches that finished between runs.
        api.hold()
        assert run_job(job, "--no-wait").returncode == EXIT_BATCHES_RUNNING  # adopts that batch, submits more
        assert all(r["state"] != "submitting" for r in _records(out))
        api.release()
        time.sleep(0.5)
        api.stall_download_s = 60
        downloads = api.downloads
        proc = start_run(job, "--no-wait")
        wait_until(lambda: api.downloads > downloads)
        _killed(proc)
        api.stall_download_s = 0.05
        # 3. Killed at random instants: starting, submitting, collecting, writing parts; or left to return.
        kills = 0
        for _ in range(KILLS):
            proc = start_run(job, "--no-wait")
            time.sleep(rng.uniform(0.2, 1.2))
            if proc.poll() is None:
                kills += 1
            _killed(proc)
            assert proc.returncode in (0, EXIT_BATCHES_RUNNING, -9)
            if rng.random() < 0.5:  # a pause between runs: batches move on meanwhile
                time.sleep(0.3)
        assert kills >= 2, "the random kills never landed inside a run"
        codes = no_wait_until_done(job, pause_s=0.1)
    assert codes[-1] == 0
    assert submitted(api) == Counter(pieces), "a text was submitted twice (or never)"
    assert set(embedded(api).values()) == {1}
    assert_tidy(out, api)
    reference = tmp_path / "reference"
    with FakeBatchAPI(dim=DIM, duration_s=0.2) as ref_api:
        ref_job = batch_job(tmp_path, ref_api, output="reference", file_name="ref.yaml", rows_per_part=3,
                            top={"cache": str(tmp_path / "ref-cache")}, **provider)
        assert run_job(ref_job).returncode == 0
    assert_same_output(out, reference)
