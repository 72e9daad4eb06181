"""The batch provider's pure parts, as tables: the polling policy, a batch
file's limits, result lines, the requests file, the pending keys, the spend
against budget_usd, and the job-file keys of `type: openai_batch`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import KEY, KEY_VAR
from pipeline.batch.files import (FIRST_POLL_FACTOR, MAX_POLL_FACTOR, PROBE_ID, BatchFile, BatchLimits, KeySet,
                                custom_id, keys_array, poll_delay_s, request_index, results)
from pipeline.cache.vectors import KEY_BYTES
from pipeline.config.job import load_job
from pipeline.errors import ConfigError
from pipeline.providers.classify import classify
from pipeline.core.money import batch_price, job_price
from pipeline.checkpoint.batch_records import BatchRecord, BatchRequest, parse_requests, requests_bytes
from pipeline.core.money import BudgetExceededError, Spend


# ------------------------------------------------------------------ polling
@pytest.mark.parametrize("age_s, interval_s, factor", [
    (0, 60, FIRST_POLL_FACTOR),  # a young batch is looked at sooner than the interval
    (59.9, 60, FIRST_POLL_FACTOR),
    (60, 60, 1.0),
    (599, 60, 1.0),
    (1200, 60, 2.0),  # older than ten intervals: in proportion to its age
    (6 * 3600, 60, MAX_POLL_FACTOR),  # hours old: at most ten intervals apart
    (-5, 60, FIRST_POLL_FACTOR),  # a clock step back
    (math.nan, 60, FIRST_POLL_FACTOR),
    (math.inf, 60, FIRST_POLL_FACTOR),
    (0.01, 0.05, FIRST_POLL_FACTOR),  # a test's scaled-down time
])
def test_poll_delay_by_age(age_s: float, interval_s: float, factor: float) -> None:
    assert poll_delay_s(age_s, interval_s, rand=lambda: 0.5) == pytest.approx(interval_s * factor)
    low, high = poll_delay_s(age_s, interval_s, rand=lambda: 0.0), poll_delay_s(age_s, interval_s, rand=lambda: 1.0)
    assert low == pytest.approx(interval_s * factor * 0.8) and high == pytest.approx(interval_s * factor * 1.2)


@pytest.mark.parametrize("interval_s", [0, -1, math.nan, math.inf])
def test_poll_delay_refuses_a_nonsense_interval(interval_s: float) -> None:
    with pytest.raises(ValueError):
        poll_delay_s(10, interval_s)


# ------------------------------------------------------------------ a batch file
def _file(tmp_path: Path, **limits: int) -> BatchFile:
    return BatchFile("sub", tmp_path / "b.jsonl", "text-embedding-3-small", 256,
                     BatchLimits(**{"inputs": 50_000, **limits}))


def _request(unit: int, texts: list[str], attempt: int = 1) -> BatchRequest:
    keys = b"".join(bytes([unit % 256, i % 256]) * (KEY_BYTES // 2) for i in range(len(texts)))
    return BatchRequest(unit, attempt, 3 * len(texts), keys)


def test_a_batch_file_holds_openai_request_lines(tmp_path: Path) -> None:
    f = _file(tmp_path)
    f.add_probe(["probe text"])
    f.add(_request(7, ["a", "b"]), ["a", "b"])
    f.add(_request(8, ["c — naïve 世界"]), ["c — naïve 世界"])
    lines = [json.loads(line) for line in f.close().read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == [PROBE_ID, custom_id(0, 7), custom_id(1, 8)]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/embeddings")}
    assert lines[1]["body"] == {"model": "text-embedding-3-small", "encoding_format": "base64", "dimensions": 256,
                                "input": ["a", "b"]}
    assert lines[2]["body"]["input"] == ["c — naïve 世界"]
    assert (f.inputs, f.tokens, len(f), f.units) == (4, 9, 3, {7, 8})
    assert request_index(f.requests) == {custom_id(0, 7): 0, custom_id(1, 8): 1}


@pytest.mark.parametrize("limits, texts, fits", [
    ({"inputs": 3}, ["x"], True),
    ({"inputs": 3}, ["x", "y"], False),  # 2 in the file already: 4 inputs
    ({"requests": 1}, ["x"], False),
    ({"requests": 2}, ["x"], True),
    ({"nbytes": 10**6}, ["x" * 1000], True),
    ({"nbytes": 500}, ["x" * 1000], False),
])
def test_a_batch_file_stays_within_its_limits(tmp_path: Path, limits: dict[str, int], texts: list[str], fits: bool) -> None:
    f = _file(tmp_path, **limits)
    f.add(_request(1, ["a", "b"]), ["a", "b"])
    assert f.fits(texts) is fits
    f.discard()
    assert not (tmp_path / "b.jsonl").exists()


def test_an_empty_batch_file_takes_any_one_line(tmp_path: Path) -> None:
    f = _file(tmp_path, inputs=1, nbytes=10)
    assert f.fits(["x" * 1000, "y"])


# ------------------------------------------------------------------ result lines
def test_result_lines_are_read_in_any_order_and_failures_classified(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "r1-u0", "response": {"status_code": 200, "body": {"data": []}}, "error": None},
        "not json at all",
        {"custom_id": "r0-u0", "response": {"status_code": 500, "body": {"error": {"code": "internal_error", "message": "m"}}}},
        {"custom_id": "r2-u1", "response": None, "error": {"code": "batch_expired", "message": "not run"}},
        {"custom_id": "r3-u1", "response": {"status_code": 400, "body": {"error": {"message": "bad", "type": "invalid_request_error"}}}},
        {"custom_id": "r4-u1", "response": {"status_code": 401, "body": {"error": {"code": "invalid_api_key", "message": "k"}}}},
        {"custom_id": "r5-u1", "response": {"status_code": 200, "body": {"error": {"code": "internal_error"}}}},
        {"no": "custom id"},
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    got = list(results(path))
    assert [r.custom_id for r in got] == ["r1-u0", "r0-u0", "r2-u1", "r3-u1", "r4-u1", "r5-u1"]
    assert [r.ok for r in got] == [True, False, False, False, False, False]
    kinds = [classify(provider="p", status=r.status, body=r.error_body()).kind for r in got[1:]]
    assert kinds == ["transient", "transient", "bad_input", "unusable", "transient"]


# ------------------------------------------------------------------ the checkpoint's side
def test_requests_file_round_trips_and_refuses_a_torn_one() -> None:
    requests = [_request(3, ["a", "b", "c"]), _request(2**40, ["d"], attempt=4), BatchRequest(9, 1, 0, b"")]
    data = requests_bytes(requests)
    assert parse_requests(data) == requests
    for torn in (data[:-1], data[:30], b"junk" + data):
        with pytest.raises(ValueError):
            parse_requests(torn)


def test_batch_record_round_trips_through_json() -> None:
    record = BatchRecord("abc", "shard-1-of-4", "p", "collected", "2026-01-01T00:00:00Z", 3, 9, 40, (1, 5), 5,
                         probe=True, input_file_id="file-1", batch_id="batch_1", status="expired",
                         request_counts=(3, 2, 1), answered=((1, 30),), failed=((5, 2),), isolate=(5,), error="x")
    back = BatchRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert back == record and not back.open
    with pytest.raises(ValueError):
        BatchRecord.from_json({**record.to_json(), "state": "lost"})
    with pytest.raises(ValueError):
        BatchRecord.from_json({**record.to_json(), "format_version": 99})


def test_pending_keys_are_found_a_unit_at_a_time() -> None:
    keys = [bytes([i]) * KEY_BYTES for i in range(0, 200, 2)] + [b"\x00" * KEY_BYTES, b"\xff" * 15 + b"\x00"]
    pending = KeySet(b"".join(keys))
    probe = [b"\x00" * KEY_BYTES, bytes([3]) * KEY_BYTES, b"\xff" * 15 + b"\x00", b"\xff" * KEY_BYTES, bytes([198]) * KEY_BYTES]
    assert pending.contains(keys_array(probe)).tolist() == [True, False, True, False, True]
    assert KeySet(b"").contains(keys_array(probe)).tolist() == [False] * 5
    assert pending.contains(keys_array([])).shape == (0,)
    assert len(pending) == len(set(keys))


# ------------------------------------------------------------------ spend
def test_spend_holds_work_in_flight_and_refuses_what_would_pass_the_budget() -> None:
    spend = Spend(budget_usd=1.0, price=0.5, spent_tokens=1_000_000)  # $0.50 already spent
    with spend.holding(800_000) as paid:  # $0.40 in flight
        with pytest.raises(BudgetExceededError, match="budget_usd"):
            spend.hold(200_001)  # concurrent work is judged with what is in flight
        paid.append(800_000)
    assert (spend.spent, spend.held) == (1_800_000, 0)
    with pytest.raises(RuntimeError), spend.holding(100_000):
        raise RuntimeError("the request failed: nothing paid")
    assert (spend.spent, spend.held) == (1_800_000, 0)
    spend.hold(200_000)  # exactly the budget is allowed
    spend.in_flight(10**9)  # an earlier run's batches: counted, never refused
    unlimited = Spend(None, None, 0)
    unlimited.hold(10**15)


def test_a_budget_needs_a_price() -> None:
    with pytest.raises(ConfigError, match="budget_usd"):
        Spend(budget_usd=5, price=None, spent_tokens=0)


# ------------------------------------------------------------------ the job file
def _job_file(tmp_path: Path, provider: dict[str, Any], **top: Any) -> Path:
    doc = {"name": "j", "input": {"path": "x.parquet", "text_column": "t"}, "output": {"path": "out"},
           "embedding": {"model": "text-embedding-3-small"},
           "providers": [{"name": "b", "type": "openai_batch", "base_url": "https://api.openai.com/v1",
                          "api_key": "${" + KEY_VAR + "}", **provider}], **top}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_batch_provider_keys_and_their_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    job = load_job(_job_file(tmp_path, {}, budget_usd=50))
    (p,) = job.providers
    assert (p.type, p.max_inputs_per_batch, p.poll_interval_s, p.enqueued_tokens_limit, p.keep_files) == \
        ("openai_batch", 50_000, 60.0, None, False)
    assert job.batch_provider is p and job.budget_usd == 50.0
    assert job_price(job) == (0.01, "assumed: half OpenAI's list price (Batch API)") == batch_price(job)
    priced = load_job(_job_file(tmp_path, {"price_per_million_tokens": 0.004}))
    assert job_price(priced) == (0.004, "providers[b].price_per_million_tokens")


@pytest.mark.parametrize("provider, top, where", [
    ({"max_inputs_per_batch": 0}, {}, "providers[0].max_inputs_per_batch"),
    ({"max_inputs_per_batch": 50_001}, {}, "providers[0].max_inputs_per_batch"),
    ({"poll_interval_s": 0}, {}, "providers[0].poll_interval_s"),
    ({"poll_interval_s": "1m"}, {}, "providers[0].poll_interval_s"),
    ({"poll_interval_s": math.inf}, {}, "providers[0].poll_interval_s"),
    ({"enqueued_tokens_limit": 0}, {}, "providers[0].enqueued_tokens_limit"),
    ({"enqueued_tokens_limit": 100}, {}, "providers[0].enqueued_tokens_limit"),  # under one text's 8,192
    ({"keep_files": "yes"}, {}, "providers[0].keep_files"),
    ({"api_key": None}, {}, "providers[0].api_key"),
    ({"enqueued_token_limit": 5}, {}, "providers[0].enqueued_token_limit"),  # misspelt
    ({}, {"budget_usd": -1}, "budget_usd"),
    ({}, {"budget_usd": math.nan}, "budget_usd"),
    ({}, {"providers_extra": True}, "providers_extra"),
])
def test_bad_batch_keys_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: dict[str, Any],
                                     top: dict[str, Any], where: str) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    with pytest.raises(ConfigError) as err:
        load_job(_job_file(tmp_path, provider, **top))
    assert f"{where}:" in str(err.value), str(err.value)


def test_a_batch_provider_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    path = _job_file(tmp_path, {})
    doc = yaml.safe_load(path.read_text())
    doc["providers"].append({"name": "sync", "base_url": "https://relay.example/v1", "api_key": "${" + KEY_VAR + "}"})
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="providers: an openai_batch provider .* runs alone"):
        load_job(path)


def test_a_batch_provider_without_a_list_price_has_no_assumed_price(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    path = _job_file(tmp_path, {})
    path.write_text(path.read_text().replace("text-embedding-3-small", "bge-m3"))
    assert job_price(load_job(path)) == (None, None)
