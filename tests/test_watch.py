"""batch/watch.py: when a running batch is worth a look (status --json's next_check_at,
the deferrable operator's log), and which variable the job reads a batch key from."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.batch.files import BACKOFF_AFTER_INTERVALS, FIRST_POLL_FACTOR, MAX_POLL_FACTOR
from pipeline.batch.watch import epoch_s, key_variable, next_check_s, provider_entry, utc_stamp, written_fields
from pipeline.checkpoint.batch_records import BatchRecord
from pipeline.config.job import ProviderConfig

NOW = 1_800_000_000.0
INTERVAL = 60.0


def record(state: str = "submitted", status: str | None = "in_progress", age_s: float | None = 0.0) -> BatchRecord:
    created = utc_stamp(NOW - age_s) if age_s is not None else "not a time"
    return BatchRecord("sub1", "all", "batch", state, created, 1, 1, 10, (0,), 0,  # type: ignore[arg-type]
                       batch_id="batch_1" if state == "submitted" else None, status=status)


@pytest.mark.parametrize(("rec", "after_s"), [
    (record(age_s=0), FIRST_POLL_FACTOR * INTERVAL),  # young: a quarter interval
    (record(age_s=INTERVAL * 2), INTERVAL),  # past its first interval: every interval
    (record(age_s=INTERVAL * BACKOFF_AFTER_INTERVALS * 4), 4 * INTERVAL),  # old: in proportion to its age
    (record(age_s=INTERVAL * 10_000), MAX_POLL_FACTOR * INTERVAL),  # ... up to the cap
    (record(age_s=-3600), FIRST_POLL_FACTOR * INTERVAL),  # a clock behind the record's: young
    (record(status="completed", age_s=INTERVAL * 100), 0.0),  # finished: a run has work now
    (record(status="expired"), 0.0),
    (record(status="failed"), 0.0),
    (record(state="submitting", status=None), 0.0),  # half-submitted: a run settles it now
    (record(age_s=None), 0.0),  # an unreadable stamp: look now rather than guess
])
def test_a_running_batch_is_worth_a_look_when_a_waiting_run_would_poll_it(rec: BatchRecord, after_s: float) -> None:
    assert next_check_s(rec, INTERVAL, NOW) == pytest.approx(NOW + after_s)


@pytest.mark.parametrize("stamp", ["", "2026-13-01T00:00:00Z", "yesterday", "2026-01-01 00:00:00"])
def test_stamps_that_are_not_utc_times_read_as_none(stamp: str) -> None:
    assert epoch_s(stamp) is None


def test_stamps_round_trip() -> None:
    assert epoch_s(utc_stamp(NOW)) == NOW


def provider(name: str = "openai-batch") -> ProviderConfig:
    return ProviderConfig(name=name, type="openai_batch", base_url="https://api.example/v1", api_key="sk-resolved")


@pytest.mark.parametrize(("text", "expected"), [
    ("providers:\n  - name: openai-batch\n    api_key: ${OPENAI_API_KEY}\n", "OPENAI_API_KEY"),
    ("providers:\n  - {name: other, api_key: '${A}'}\n  - {name: openai-batch, api_key: '${B_2}'}\n", "B_2"),
    ("providers:\n  - name: other\n    api_key: ${A}\n", None),  # no such provider
    ("providers: {openai-batch: {api_key: ${A}}}\n", None),  # not a list
    ("providers: [\n", None),  # not YAML
    ("", None),
])
def test_the_key_variable_is_read_by_name_from_the_job_file(tmp_path: Path, text: str, expected: str | None) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert key_variable(provider_entry(job, provider())) == expected
    assert key_variable(provider_entry(tmp_path / "missing.yaml", provider())) is None


def test_headers_and_query_are_read_as_written_with_their_variables_unfilled(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("providers:\n  - name: openai-batch\n    api_key: ${K}\n"
                   "    headers: {X-Org: '${ORG_ID}', X-Team: data, X-Seq: 7}\n"
                   "    query: {api-version: 2024-10-21, sig: 'a${SIG}b'}\n")
    entry = provider_entry(job, provider())
    assert written_fields(entry, "headers") == {"X-Org": "${ORG_ID}", "X-Team": "data", "X-Seq": "7"}
    assert written_fields(entry, "query") == {"api-version": "2024-10-21", "sig": "a${SIG}b"}  # a YAML date as text
    assert written_fields({}, "headers") == {}
