"""Never paying twice for a text: in-run dedupe, the vector cache across runs,
shards and kills, and `estimate` against a real run. Real runs (`python -m
pipeline`) against the loopback FakeProvider, which counts what it is sent."""
from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import (
    assert_vectors_exact,
    docs_table,
    error_lines,
    provider_entry,
    read_parts,
    read_summary as summary,
    REPO,
    rows_sent,
    run_cli,
    run_job as run,
    sample_texts,
    start_run,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider, vector_for
from pipeline.cache.vectors import CACHE_FILE, VectorCache, text_keys
from pipeline.config.job import EmbeddingConfig
from pipeline.core.probe import PROBE_TEXTS
from pipeline.engine.reuse import Reuse
from pipeline.inputs.texts import prepare

DIM = 8
MODEL = "text-embedding-3-small"


def with_repeats(n: int, share: float, seed: int = 7) -> tuple[list[str], list[str]]:
    """`n` texts of which `share` repeat an earlier one, shuffled; and the distinct ones."""
    rng = random.Random(seed)
    distinct = sample_texts(round(n * (1 - share)))
    texts = distinct + [rng.choice(distinct) for _ in range(n - len(distinct))]
    rng.shuffle(texts)
    return texts, distinct


def cached_job(tmp_path: Path, fp: FakeProvider, **extra: Any) -> Path:
    job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=50, **extra)
    text = job.read_text() + "cache: cache\n"
    job.write_text(text)
    return job


def test_a_corpus_with_30_percent_repeats_sends_30_percent_fewer_inputs_and_every_vector_is_exact(tmp_path: Path) -> None:
    texts, distinct = with_repeats(600, 0.30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    # Latency keeps several parts in flight at once, so repeats also meet texts still being sent.
    with FakeProvider(dim=DIM, latency_s=0.02) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=50)
        result = run(job)
        assert result.returncode == 0, result.stderr
        sent = rows_sent(fp)
    assert sum(sent.values()) == len(distinct) == 0.7 * len(texts)
    assert set(sent) == set(distinct) and max(sent.values()) == 1
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    run_summary = summary(tmp_path / "out")["run"]
    assert run_summary["rows_from_providers"] == len(distinct)
    assert run_summary["rows_deduped"] == len(texts) - len(distinct)
    assert run_summary["rows_from_cache"] == 0
    assert "420 rows from providers, 180 from in-run dedupe, 0 from the cache" in result.stderr


def test_texts_equal_after_truncation_are_sent_once(tmp_path: Path) -> None:
    head = "the same first words for every row of this table"
    texts = [f"{head} then tail number {i} " * 3 for i in range(12)] + ["a short one"]
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    emb = {"max_input_tokens": 8, "too_long": "truncate"}
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], embedding=emb, batching={"max_tokens_per_request": 64})
        result = run(job)
        assert result.returncode == 0, result.stderr
        sent = rows_sent(fp)
    final = prepare(texts, EmbeddingConfig(model=MODEL, **emb), list(range(len(texts)))).pieces
    assert len(set(final)) == 2  # the truncated head, and the short one
    assert sorted(sent.elements()) == sorted(set(final))
    assert_vectors_exact(read_parts(tmp_path / "out"), final, DIM)


def test_a_text_the_provider_refuses_is_refused_for_every_row_that_repeats_it(tmp_path: Path) -> None:
    texts = sample_texts(40)
    for i in (3, 17, 33):  # in three different parts
        texts[i] = "please FORBIDDEN words"
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, reject_marker="FORBIDDEN") as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=10)
        result = run(job)
    assert result.returncode == 0, result.stderr
    rejects = pq.read_table(tmp_path / "out" / "_rejects.parquet").to_pylist()
    assert sorted(r["id"] for r in rejects) == ["id-0003", "id-0017", "id-0033"]
    assert {r["reason"] for r in rejects} == {"provider_rejected"}
    assert_vectors_exact(read_parts(tmp_path / "out"), [None if "FORBIDDEN" in t else t for t in texts], DIM)


def test_backfill_with_a_cache_sends_only_the_changed_and_new_texts(tmp_path: Path) -> None:
    texts = sample_texts(200)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        job = cached_job(tmp_path, fp)
        first = run(job)
        assert first.returncode == 0, first.stderr
        assert set(rows_sent(fp)) == set(texts)

    changed = {i: f"{texts[i]} (edited)" for i in range(0, 200, 20)}  # 5% of the rows
    new = sample_texts(30, prefix="added")
    texts2 = [changed.get(i, t) for i, t in enumerate(texts)] + new
    write_parquet(tmp_path / "data.parquet", docs_table(texts2))
    with FakeProvider(dim=DIM) as fp2:
        job = cached_job(tmp_path, fp2)
        second = run(job, "--restart")  # the input changed: a new output over the same cache
        assert second.returncode == 0, second.stderr
        sent = rows_sent(fp2)
    assert sorted(sent.elements()) == sorted([*changed.values(), *new])
    assert_vectors_exact(read_parts(tmp_path / "out"), texts2, DIM)
    s = summary(tmp_path / "out")["run"]
    assert (s["rows_from_cache"], s["rows_from_providers"]) == (190, 40)
    status = run_cli("status", str(job)).stdout
    assert "reused without a request: 0 rows from in-run dedupe, 190 from the cache" in status


def test_a_cached_vector_of_another_length_is_a_miss_not_a_wrong_vector(tmp_path: Path) -> None:
    texts = sample_texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    for dim in (8, 16):  # the same model name, served at another default length
        with FakeProvider(dim=dim) as fp:
            result = run(cached_job(tmp_path, fp), "--restart")
            assert result.returncode == 0, result.stderr
            assert set(rows_sent(fp)) == set(texts)
        assert_vectors_exact(read_parts(tmp_path / "out"), texts, dim)


@pytest.mark.parametrize("make_bad", [
    pytest.param(lambda p: p.write_text("not a folder"), id="a-file"),
    pytest.param(lambda p: (p.mkdir(), (p / CACHE_FILE).write_bytes(b"garbage" * 100)), id="not-sqlite"),
])
def test_an_unusable_cache_exits_2_with_one_line_naming_it(tmp_path: Path, make_bad: Any) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(5)))
    make_bad(tmp_path / "cache")
    with FakeProvider(dim=DIM) as fp:
        result = run(cached_job(tmp_path, fp))
        assert fp.count() == 0
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "cache:" in lines[0] and "Traceback" not in result.stderr
    checked = run_cli("validate", str(tmp_path / "job.yaml"))
    assert checked.returncode == 2 and "cache:" in checked.stderr and "Traceback" not in checked.stderr


def stored_vectors_match_their_texts(cache_dir: Path, texts: list[str], dim: int, dimensions: int | None = None) -> int:
    """Every vector the cache holds for these texts is the text's own; returns how many it holds."""
    with sqlite3.connect(cache_dir / CACHE_FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cache = VectorCache(cache_dir, readonly=True)
    try:
        found = cache.get(text_keys(texts, MODEL, dimensions), dim)
        by_key = dict(zip(text_keys(texts, MODEL, dimensions), texts))
        for key, vector in found.items():
            assert np.array_equal(vector, vector_for(by_key[key], dim)), f"wrong vector for {by_key[key]!r}"
        return len(found)
    finally:
        cache.close()


WRITER = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
import numpy as np
from fakeprovider import vector_for
from pipeline.cache.vectors import VectorCache, text_keys
cache = VectorCache(Path({folder!r}))
for batch in range(10**6):
    texts = [f"text {{i}}" for i in range(batch * 500, batch * 500 + 500)]
    cache.put(text_keys(texts, {model!r}, None), np.stack([vector_for(t, {dim}) for t in texts]))
    print(batch, flush=True)
"""


def test_a_writer_killed_mid_transaction_leaves_a_readable_cache_with_only_right_vectors(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    dim = 256  # big transactions: a kill lands inside one most of the time
    script = WRITER.format(repo=str(REPO), tests=str(REPO / "tests"), folder=str(folder), model=MODEL, dim=dim)
    rng = random.Random(3)
    for _ in range(4):  # each writer rewrites the same texts (INSERT OR IGNORE) and goes further
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # one batch committed
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    texts = [f"text {i}" for i in range(200_000)]
    held = stored_vectors_match_their_texts(folder, texts, dim)
    assert held >= 500 and held % 500 == 0  # whole transactions only


def test_shards_sharing_a_cache_one_killed_leave_it_consistent_and_the_rerun_pays_nothing_twice(tmp_path: Path) -> None:
    texts, distinct = with_repeats(800, 0.25, seed=11)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, latency_s=0.03) as fp:
        job = cached_job(tmp_path, fp)
        shards = [start_run(job, "--shard", f"{k}/4") for k in range(4)]
        deadline = time.monotonic() + 30
        while len(rows_sent(fp)) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        shards[1].send_signal(signal.SIGKILL)
        for k, proc in enumerate(shards):
            proc.communicate(timeout=60)
            assert proc.returncode == (-signal.SIGKILL if k == 1 else 0)
        assert stored_vectors_match_their_texts(tmp_path / "cache", distinct, DIM) > 0
        before = rows_sent(fp)
        rerun = run(job, "--shard", "1/4")
        assert rerun.returncode == 0, rerun.stderr
        final = run(job)  # all shards done: writes _SUCCESS
        assert final.returncode == 0, final.stderr
        after = rows_sent(fp)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    # What the killed shard had stored is not paid again: only what was in
    # flight at the kill (answered by the server, never received) can be.
    in_flight_at_kill = 4 * 5  # max_concurrency x max_inputs_per_request
    assert len(set(after - before) & set(before)) <= in_flight_at_kill
    assert stored_vectors_match_their_texts(tmp_path / "cache", distinct, DIM) == len(distinct)


def estimate(job: Path) -> dict[str, Any]:
    result = run_cli("estimate", str(job), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_estimate_matches_a_real_run_then_counts_the_cache(tmp_path: Path) -> None:
    texts, distinct = with_repeats(300, 0.3, seed=5)
    texts[4] = texts[150] = "   "  # empty
    texts[9] = "word " * 40  # too long: truncated
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    emb = {"max_input_tokens": 16, "too_long": "truncate"}
    with FakeProvider(dim=DIM) as fp:
        job = cached_job(tmp_path, fp, embedding=emb, batching={"max_tokens_per_request": 64})
        plan = estimate(job)
        assert fp.count() == 0  # no API call
        result = run(job)
        assert result.returncode == 0, result.stderr
        run_requests = sum(1 for body in fp.requests if body.get("input") != list(PROBE_TEXTS))
    s = summary(tmp_path / "out")
    final = [t for t in prepare(texts, EmbeddingConfig(model=MODEL, **emb), list(range(300))).pieces]
    assert plan["rows"] == s["job"]["rows_done"] == 300
    assert plan["rows_rejected_by_policy"] == {"empty": 2}
    assert plan["distinct_texts"] == len(set(final))
    assert plan["tokens"] == s["run"]["tokens"]
    units = 300 // 50
    assert abs(plan["requests"] - run_requests) <= units  # each part packs its own requests
    assert plan["cost_usd"] == pytest.approx(plan["tokens"] / 1e6 * 0.02, abs=1e-6)

    again = estimate(job)  # everything is in the cache now
    assert again["cache_hits"] == again["distinct_texts"] == plan["distinct_texts"]
    assert (again["tokens"], again["requests"], again["cost_usd"]) == (0, 0, 0.0)


def test_estimate_uses_the_providers_price_and_says_where_it_came_from(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    job = write_job(tmp_path, [provider_entry("http://127.0.0.1:9/v1", price_per_million_tokens=1.5)])
    plan = estimate(job)
    assert plan["cost_usd"] == pytest.approx(plan["tokens"] * 1.5 / 1e6, abs=1e-4)
    assert plan["price_source"] == "providers[fake].price_per_million_tokens"
    lines = run_cli("estimate", str(job)).stdout
    assert "30 texts, 30 distinct, 0 in the cache: 30 to send" in lines
    assert json.loads(run_cli("plan", str(job), "--json").stdout) == plan  # the alias


def test_kills_with_a_cache_and_repeats_give_the_uninterrupted_output_and_pay_about_once_per_text(
        tmp_path: Path) -> None:
    texts, distinct = with_repeats(600, 0.3, seed=13)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    rng = random.Random(5)
    kills = 0
    # 84 requests, 4 at a time: a run kept 0.3 s at most before its kill does a
    # quarter of them, so at least three runs are killed before one can finish
    with FakeProvider(dim=DIM, latency_s=0.05) as fp, FakeProvider(dim=DIM) as ref_fp:
        job = cached_job(tmp_path, fp)
        for _ in range(6):
            requests = fp.count()
            proc = start_run(job)
            deadline = time.monotonic() + 20
            while fp.count() <= requests + 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is not None:
                break
            proc.kill()
            proc.wait(timeout=10)
            kills += 1
        final = run(job)
        assert final.returncode == 0, final.stderr
        sent = rows_sent(fp)
        ref_job = write_job(tmp_path, [provider_entry(ref_fp)], rows_per_part=50, output="ref", file_name="ref.yaml")
        assert run(ref_job).returncode == 0
    assert kills >= 3
    assert read_parts(tmp_path / "out").equals(read_parts(tmp_path / "ref"))
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, DIM)
    assert set(sent) == set(distinct)
    in_flight_at_a_kill = 4 * 5  # max_concurrency x max_inputs_per_request: answered, never received
    assert sum(sent.values()) - len(distinct) <= kills * in_flight_at_a_kill


def test_recent_hits_of_one_slice_keep_their_own_vectors_when_the_ring_is_full() -> None:
    """Each hit is remembered again as it is taken, which takes the ring's next
    slot: with the ring full, that slot may hold another hit of the same slice."""
    dim = 2**20  # a few slots of 4 MiB: the ring is full after a handful of keys
    reuse = Reuse("m", None, dim, None)
    capacity = reuse._recent.capacity
    assert 2 <= capacity < 50
    keys = [bytes([i]) * 16 for i in range(capacity)]
    vectors = np.random.default_rng(7).random((capacity, dim), dtype=np.float32)

    async def scenario() -> list[np.ndarray]:
        first = await reuse.claim(keys)
        assert sorted(first.send) == list(range(capacity))
        await reuse.answered(keys, vectors)
        # key 1's hit takes the next slot, key 0's: key 0 must already be copied out
        again = await reuse.claim([keys[1], keys[0], keys[2]])
        assert again.send == [] and not again.waits
        return [again.found[i] for i in range(3)]

    found = asyncio.run(scenario())
    for got, want in zip(found, [vectors[1], vectors[0], vectors[2]]):
        assert np.array_equal(got, want)
