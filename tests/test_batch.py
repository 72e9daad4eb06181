"""`type: openai_batch` end to end: `python -m pipeline` subprocesses against a
loopback Files + Batches server (tests/fakebatch.py, time scaled down), every
output compared bit for bit with a synchronous run against fakeprovider (both
answer vector_for), real SIGKILLs while batches run."""
from __future__ import annotations

import json
import random
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import (
    wait_until,
    FAST_RETRY,
    assert_vectors_exact,
    docs_table,
    error_lines,
    provider_entry,
    read_parts,
    read_summary,
    rows_sent,
    run_cli,
    run_job,
    sample_texts,
    start_run,
    write_job,
    write_parquet,
)
from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider
from pipeline.core.probe import PROBE_TEXTS
from pipeline.storage.output import TEMP_MARK
from test_durability import _assert_same_output as assert_same_output

pytestmark = pytest.mark.slow  # subprocess runs: not in the `-m "not slow"` inner loop (conftest.SLOW_MODULES)

DIM = 8
POLL_S = 0.05  # the job's poll_interval_s: the fake's batches take a few tenths of a second
MAX_TOKENS = 24  # embedding.max_input_tokens: the long rows are chunked (chunk_mean), as in a real backfill


def _texts(n: int) -> list[str]:
    """Distinct texts, blank ones (rejected rows), repeats (in-run dedupe) and long ones (several chunks)."""
    texts = sample_texts(n)
    for i in range(5, n, 17):
        texts[i] = "   "
    for i in range(9, n, 13):
        texts[i] = texts[i - 6]
    for i in range(3, n, 19):
        texts[i] = " ".join(f"long row {i} word {w}" for w in range(20))
    return texts


def _job(tmp_path: Path, entry: dict[str, Any], *, output: str, file_name: str, rows_per_part: int = 6,
         **top: Any) -> Path:
    path = write_job(tmp_path, [entry], keep_columns=["title"], rows_per_part=rows_per_part,
                     embedding={"dimensions": DIM, "max_input_tokens": MAX_TOKENS, "too_long": "chunk_mean"},
                     batching={"max_inputs_per_request": 4}, output=output, file_name=file_name)
    if top:
        import yaml

        doc = yaml.safe_load(path.read_text())
        doc.update(top)
        path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return path


def batch_job(tmp_path: Path, api: FakeBatchAPI, *, output: str = "out", file_name: str = "job.yaml",
              rows_per_part: int = 6, top: dict[str, Any] | None = None, **provider: Any) -> Path:
    entry = provider_entry(api.base_url, name="batch", type="openai_batch", poll_interval_s=POLL_S, **provider)
    return _job(tmp_path, entry, output=output, file_name=file_name, rows_per_part=rows_per_part, **(top or {}))


def sync_job(tmp_path: Path, fp: FakeProvider, *, output: str = "ref", **top: Any) -> Path:
    return _job(tmp_path, provider_entry(fp, name="sync"), output=output, file_name=f"{output}.yaml", **top)


def embedded(api: FakeBatchAPI) -> Counter[str]:
    return Counter({t: n for t, n in api.embedded.items() if t not in PROBE_TEXTS})


def _expected(texts: list[str]) -> list[str | None]:
    return [t if t.strip() else None for t in texts]


def batch_temp_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("pipeline-batch-*"))


def assert_tidy(out: Path, api: FakeBatchAPI) -> None:
    """Nothing left behind: provider files, batch records and journals, temp files."""
    assert api.live_files() == [], "input or result files left on the provider"
    assert not list((out / "_manifest.d" / "batches").iterdir()), "batch records left after the job completed"
    assert not list((out / "_journal.d").iterdir()), "journals left after the job completed"
    assert not [p for p in out.rglob("*") if TEMP_MARK in p.name]



def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    return errors[0]


# ------------------------------------------------------------------ the output
def test_batch_output_is_bit_identical_to_a_synchronous_run_at_half_the_price(tmp_path: Path) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    temps_before = batch_temp_dirs()
    with FakeBatchAPI(dim=DIM, duration_s=0.4) as api, FakeProvider(dim=DIM) as fp:
        done = run_job(batch_job(tmp_path, api, max_inputs_per_batch=20))
        assert done.returncode == 0, done.stderr
        ref = run_job(sync_job(tmp_path, fp))
        assert ref.returncode == 0, ref.stderr
        sent_sync = rows_sent(fp)
    out = tmp_path / "out"
    assert_same_output(out, tmp_path / "ref")
    assert (out / "_SUCCESS").exists()
    # Each distinct text went into a batch once (dedupe across parts and batches), as the synchronous run sent it.
    assert embedded(api) == Counter(set(sent_sync)) and set(sent_sync.values()) == {1}
    assert len(api.created) >= 3  # max_inputs_per_batch 20: several batches
    assert {"in_progress", "completed"} <= api.statuses_seen
    assert_tidy(out, api)
    assert batch_temp_dirs() <= temps_before, "the run's local temp folder is left"
    batch, sync = read_summary(out), read_summary(tmp_path / "ref")
    assert batch["price_per_million_tokens_usd"] == 0.01 and sync["price_per_million_tokens_usd"] == 0.02
    assert batch["run"]["tokens"] == sync["run"]["tokens"] > 0
    assert batch["run"]["cost_usd"] == pytest.approx(sync["run"]["cost_usd"] / 2)
    assert batch["job"]["cost_usd"] == pytest.approx(batch["run"]["tokens"] * 0.01 / 1e6)
    report = batch["providers"]["batch"]
    assert report["batches_submitted"] == report["batches_collected"] == len(api.created)
    assert batch["run"]["rows_deduped"] == sync["run"]["rows_deduped"] > 0
    assert batch["run"]["rows_from_journal"] == 0


def test_failed_lines_expired_batches_and_refused_rows_are_recovered_exactly(tmp_path: Path) -> None:
    texts = _texts(40)
    texts[8] = "row 8 is BLOCKED by the content filter"
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    lines = ["ok", "500", "ok", "429", "ok", "ok", "500", "ok", "ok", "ok", "500"]
    with FakeBatchAPI(dim=DIM, duration_s=0.3, script=["expire"], line_script=lines, reject_marker="BLOCKED") as api, \
            FakeProvider(dim=DIM, reject_marker="BLOCKED") as fp:
        done = run_job(batch_job(tmp_path, api, max_inputs_per_batch=15))
        assert done.returncode == 0, done.stderr
        assert run_job(sync_job(tmp_path, fp)).returncode == 0
        statuses = [api.batch(b)["status"] for b in api.created]
    out = tmp_path / "out"
    assert_same_output(out, tmp_path / "ref")  # the parts and _rejects.parquet
    rejects = pq.read_table(out / "_rejects.parquet").to_pylist()
    assert [(r["id"], r["reason"], r["error_code"]) for r in rejects if r["reason"] == "provider_rejected"] == \
        [("id-0008", "provider_rejected", "400")]
    assert statuses[0] == "expired" and "completed" in statuses
    # Lines that failed or never ran were sent again; nothing was answered twice.
    assert set(embedded(api).values()) == {1}
    report = read_summary(out)["providers"]["batch"]
    assert report["retries"] > 0 and report["failures"]["transient"] >= 3 and report["failures"]["rate_limited"] >= 1
    assert_tidy(out, api)


def test_a_full_queue_is_waited_out_and_enqueued_tokens_limit_keeps_under_it(tmp_path: Path) -> None:
    texts = sample_texts(48)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    # The provider refuses batches past its queue (token_limit_exceeded): they go again as running ones finish.
    with FakeBatchAPI(dim=DIM, duration_s=0.3, queue_limit=250) as api:
        done = run_job(batch_job(tmp_path, api, max_inputs_per_batch=12))
        assert done.returncode == 0, done.stderr
        refused = [api.batch(b) for b in api.created if api.batch(b)["status"] == "failed"]
    assert refused and {b["errors"]["data"][0]["code"] for b in refused} == {"token_limit_exceeded"}
    assert set(embedded(api).values()) == {1}
    assert read_summary(tmp_path / "out")["providers"]["batch"]["rate_limited"] == len(refused)
    assert_vectors_exact(read_parts(tmp_path / "out"), _expected(texts), DIM)
    # With the queue's limit in the job, what is enqueued stays under it and nothing is refused.
    with FakeBatchAPI(dim=DIM, duration_s=0.3, queue_limit=250) as api:
        done = run_job(batch_job(tmp_path, api, output="out2", file_name="job2.yaml", max_inputs_per_batch=12,
                                 enqueued_tokens_limit=250))
        assert done.returncode == 0, done.stderr
        statuses = {api.batch(b)["status"] for b in api.created}
    assert statuses == {"completed"} and 0 < api.max_enqueued <= 250
    assert_vectors_exact(read_parts(tmp_path / "out2"), _expected(texts), DIM)


def _pieces(texts: list[str]) -> set[str]:
    """The texts a job sends for these rows (chunks of the long ones)."""
    from pipeline.config.job import EmbeddingConfig
    from pipeline.inputs.texts import prepare

    cfg = EmbeddingConfig(model="text-embedding-3-small", dimensions=DIM, max_input_tokens=MAX_TOKENS, too_long="chunk_mean")
    return set(prepare(list(texts), cfg, list(range(len(texts)))).pieces)


def _records(out: Path) -> list[dict[str, Any]]:
    folder = out / "_manifest.d" / "batches"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.exists() else []


@pytest.mark.timeout(120)
def test_sigkill_while_batches_run_rerun_submits_nothing_again_and_output_is_bit_identical(tmp_path: Path) -> None:
    texts = _texts(48)
    pieces = _pieces(texts)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeBatchAPI(dim=DIM, duration_s=0.3, script=["ok", "stall_create:60"]) as api, FakeProvider(dim=DIM) as fp:
        job = batch_job(tmp_path, api, max_inputs_per_batch=12)
        # 1. Killed while the provider creates the second batch: it exists there, recorded here as `submitting`.
        proc = start_run(job)
        wait_until(lambda: len(api.created) >= 2)
        proc.kill()
        proc.wait(timeout=10)
        assert any(r["state"] == "submitting" and r["input_file_id"] for r in _records(out))
        # 2. The rerun adopts that batch (found by its input file), submits the rest, and is killed while all run.
        api.hold()
        proc = start_run(job)
        wait_until(lambda: set(api.submitted) >= pieces and _records(out)
                   and all(r["state"] != "submitting" for r in _records(out)))
        proc.kill()
        proc.wait(timeout=10)
        created = list(api.created)
        # 3. The batches finish while nobody polls; a run is killed while it downloads their results.
        api.release()
        api.stall_download_s = 60
        downloads = api.downloads
        proc = start_run(job)
        wait_until(lambda: api.downloads > downloads)
        proc.kill()
        proc.wait(timeout=10)
        # 4. The last run collects them, submits nothing, and finishes.
        api.stall_download_s = 0
        final = run_job(job)
        assert final.returncode == 0, final.stderr
        assert run_job(sync_job(tmp_path, fp)).returncode == 0
    assert api.created == created, "the runs after a kill submitted batches again"
    assert Counter(t for t in api.submitted.elements() if t not in PROBE_TEXTS) == Counter(pieces)
    assert embedded(api) == Counter(pieces), "a text was embedded twice"
    assert_same_output(out, tmp_path / "ref")
    assert_tidy(out, api)


KILLS = 6
SEED = 20260105


def texts_with_far_repeats(rng: random.Random, n: int) -> list[str]:
    """_texts(n) with every 7th row a repeat of a random other row: repeats near and far."""
    texts = _texts(n)
    for i in range(0, len(texts), 7):
        texts[i] = texts[rng.randrange(len(texts))]
    return texts


@pytest.mark.timeout(180)
def test_sigkill_at_random_instants_with_failing_lines_pays_each_text_once_and_equals_a_synchronous_run(
        tmp_path: Path) -> None:
    rng = random.Random(SEED)
    texts = texts_with_far_repeats(rng, 1500)  # enough work that every kill lands on a live run
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    lines = [rng.choice(["ok"] * 8 + ["500"]) for _ in range(5000)]
    with FakeBatchAPI(dim=DIM, duration_s=0.15, line_script=lines, stall_download_s=0.05) as api, \
            FakeProvider(dim=DIM) as fp:
        # With a cache a text is never paid twice, whatever the kills (without one, a repeat far apart may be).
        job = batch_job(tmp_path, api, rows_per_part=3, max_inputs_per_batch=9,
                        top={"cache": str(tmp_path / "cache"), "retry": {**FAST_RETRY, "max_attempts": 20}})
        for k in range(KILLS):
            proc = start_run(job)
            time.sleep(rng.uniform(1.0, 2.5))  # start-up, submitting, polling, collecting, writing parts
            assert proc.poll() is None, f"the run ended before kill {k + 1}: give it more rows"
            proc.kill()
            proc.wait(timeout=10)
        final = run_job(job)
        assert final.returncode == 0, final.stderr
        assert run_job(_job(tmp_path, provider_entry(fp, name="sync"), output="ref", file_name="ref.yaml",
                            rows_per_part=3)).returncode == 0
    assert_same_output(tmp_path / "out", tmp_path / "ref")
    assert set(embedded(api).values()) == {1}, "a text was answered twice"
    assert_tidy(tmp_path / "out", api)


def test_sigterm_leaves_batches_running_status_lists_them_and_restart_cancels_them(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeBatchAPI(dim=DIM, duration_s=0.3) as api:
        api.hold()
        job = batch_job(tmp_path, api, max_inputs_per_batch=10)
        proc = start_run(job)
        wait_until(lambda: set(api.submitted) >= set(texts) and all(r["state"] == "submitted" for r in _records(out)))
        proc.send_signal(signal.SIGTERM)  # the batches never finish (held): only a stop of the polling ends the run
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "SIGTERM" in one_error(stderr), stderr
        first = list(api.created)
        assert api.open_batches() == first, "a stopped run must leave its batches running"

        report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        listed = {b["id"]: b for b in report["batches"]}
        assert set(listed) == set(first)
        assert {b["state"] for b in listed.values()} == {"submitted"}
        assert {b["status"] for b in listed.values()} <= {"validating", "in_progress"}
        assert sum(b["requests"] for b in listed.values()) == sum(api.batch(b)["request_counts"]["total"] for b in first)
        text = run_cli("status", str(job), key=None).stdout
        assert f"batches: {len(first)} submitted" in text and all(b in text for b in first)

        # --restart cancels the recorded batches before it discards their progress, then starts over.
        rerun = start_run(job, "--restart")
        wait_until(lambda: len(api.cancelled) == len(first))
        api.release()
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
    assert sorted(api.cancelled) == sorted(first)
    assert_vectors_exact(read_parts(out), texts, DIM)
    assert set(embedded(api).values()) == {1}


def test_budget_stops_a_batch_job_before_submitting_past_it(tmp_path: Path) -> None:
    texts = sample_texts(40)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    budget = 1.5e-6  # USD: about half of the job at $0.01 per million tokens
    with FakeBatchAPI(dim=DIM, duration_s=0.2) as api:
        stopped = run_job(batch_job(tmp_path, api, max_inputs_per_batch=8, top={"budget_usd": budget}))
        assert stopped.returncode == 1
        assert one_error(stopped.stderr).startswith("error: budget_usd:"), stopped.stderr
        assert 0 < api.tokens_enqueued * 0.01 / 1e6 <= budget  # submitted, to be paid: within the budget
        assert api.tokens_enqueued < sum(len(t) for t in texts) // 4  # ... and not the whole job
        rerun = run_job(batch_job(tmp_path, api, max_inputs_per_batch=8, top={"budget_usd": 1.0}))
        assert rerun.returncode == 0, rerun.stderr
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    assert set(embedded(api).values()) == {1}


def test_budget_stops_synchronous_requests_before_spending_past_it(tmp_path: Path) -> None:
    texts = sample_texts(40)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    budget = 3e-6  # USD: about half of the job at $0.02 per million tokens
    with FakeProvider(dim=DIM) as fp:
        stopped = run_job(sync_job(tmp_path, fp, output="out", budget_usd=budget))
        paid = sum(len(FakeProvider._parse_input(body["input"])[1:]) and FakeProvider._parse_input(body["input"])[1]
                   for body, d in zip(fp.requests, fp.directives) if d == "ok" and body.get("input") != list(PROBE_TEXTS))
    assert stopped.returncode == 1
    assert one_error(stopped.stderr).startswith("error: budget_usd:"), stopped.stderr
    assert 0 < paid * 0.02 / 1e6 <= budget
    assert read_summary(tmp_path / "out")["status"] == "stopped"


def test_estimate_shows_the_batch_price_beside_the_synchronous_one_and_the_24_hour_window(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(40)))
    job = batch_job(tmp_path, FakeBatchAPI(), max_inputs_per_batch=10, enqueued_tokens_limit=100, top={"budget_usd": 0.5})
    shown = run_cli("estimate", str(job), key=None)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(run_cli("estimate", str(job), "--json", key=None).stdout)
    assert report["price_per_million_tokens_usd"] == 0.01 and report["sync_price_per_million_tokens_usd"] == 0.02
    assert report["cost_usd"] == pytest.approx(report["sync_cost_usd"] / 2)
    assert report["batches"] == 4 and report["batch_window_hours"] == 24 and report["budget_usd"] == 0.5
    assert report["queue_rounds"] == -(-report["tokens"] // 100)
    assert "half OpenAI's list price" in shown.stdout and "within 24 hours" in shown.stdout
    assert "synchronously it would cost" in shown.stdout and "budget_usd: $0.5000 for what is left (within it" in shown.stdout
    with FakeProvider(dim=DIM) as fp:
        sync = run_cli("estimate", str(sync_job(tmp_path, fp)), key=None).stdout
    assert "through OpenAI's Batch API instead" in sync


def test_a_rejected_key_stops_the_batch_provider_at_once_and_is_never_written(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(10)))
    wrong = "sk-wrong-SECRET-0123456789"
    for sync in (True, False):  # refused by the synchronous probe, or by the first upload
        with FakeBatchAPI(dim=DIM, sync=sync) as api:
            name = f"job-{sync}.yaml"
            done = run_job(batch_job(tmp_path, api, output=f"out-{sync}", file_name=name), key=wrong)
            assert done.returncode == 1
            line = one_error(done.stderr)
            assert "no provider can take work (batch:" in line and "Incorrect API key" in line, line
            assert wrong not in done.stderr and not api.created
        assert all(wrong not in p.read_text(errors="ignore") for p in (tmp_path / f"out-{sync}").rglob("*") if p.is_file())


def test_two_shards_each_submit_and_collect_their_own_batches(tmp_path: Path) -> None:
    texts = sample_texts(48)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeBatchAPI(dim=DIM, duration_s=0.3) as api:
        job = batch_job(tmp_path, api, max_inputs_per_batch=10, keep_files=True)
        shards = [start_run(job, "--shard", f"{k}/2") for k in range(2)]
        for proc in shards:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
        writers = {b: api.batch(b)["metadata"]["pipeline_writer"] for b in api.created}
        kept = set(api.live_files())
        batches = [api.batch(b) for b in api.created]
    assert sorted(set(writers.values())) == ["shard-0-of-2", "shard-1-of-2"]
    assert kept == {f for b in batches for f in (b["input_file_id"], b["output_file_id"])}  # keep_files: true
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    assert set(embedded(api).values()) == {1}


def test_without_a_synchronous_endpoint_the_first_batch_carries_the_probe(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeBatchAPI(dim=DIM, duration_s=0.2, sync=False) as api:
        job = batch_job(tmp_path, api)
        first = run_job(job, "--limit", "12")
        assert first.returncode == 0, first.stderr
        assert api.sync_calls == 1 and api.submitted.keys() >= set(PROBE_TEXTS)  # the probe's 404, then a probe line
    with FakeBatchAPI(dim=DIM, duration_s=0.2, sync=False, serves="another-model") as api:
        job = batch_job(tmp_path, api)
        swapped = run_job(job)
        assert swapped.returncode == 1
        assert "serves a different model" in one_error(swapped.stderr)
    table = read_parts(tmp_path / "out")
    assert table.num_rows == 12
    assert_vectors_exact(table, texts[:12], DIM)


def test_a_text_failing_in_every_batch_stops_after_retry_max_attempts_and_a_rerun_tries_again(tmp_path: Path) -> None:
    texts = sample_texts(8)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    # One request line a batch fails (500) three times running: retry.max_attempts is 3 in these jobs.
    with FakeBatchAPI(dim=DIM, duration_s=0.1, line_script=["ok", "500", "500", "500"]) as api:
        job = batch_job(tmp_path, api, rows_per_part=8)
        stopped = run_job(job)
        assert stopped.returncode == 1
        line = one_error(stopped.stderr)
        assert "failed in 3 batches (retry.max_attempts)" in line and "internal_error" in line, line
        assert len(api.created) == 3
        rerun = run_job(job)  # attempts count per run: the rerun sends the failed texts again
        assert rerun.returncode == 0, rerun.stderr
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    assert set(embedded(api).values()) == {1}
