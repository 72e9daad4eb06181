"""Chaos suite: `python -m pipeline run` against real loopback servers that
misbehave on purpose (tests/fakeprovider.py).

Wherever one provider works, the job must end with exit 0, `_SUCCESS`, every
row once in input order and every vector exactly `vector_for(text, dim)`;
each row is paid for once; every injected failure costs exactly one retry and
is counted under its class; a provider classified unusable gets no request
after that beyond those already in flight. Where none works: exit 1, one
`error:` line naming each provider, a manifest that a rerun continues without
resending what was committed.
"""
from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from conftest import (
    assert_vectors_exact,
    committed_units,
    docs_table,
    error_lines,
    part_files,
    provider_entry,
    read_parts,
    rows_sent,
    run_job as run,
    sample_texts,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider
from pipeline.engine.dispatch import CIRCUIT_FAILURES, CIRCUIT_OPENS_TO_GIVE_UP
from pipeline.core.probe import PROBE_TEXTS

DIM = 8
ROWS_PER_PART = 10
PER_REQUEST = 5  # write_job's batching.max_inputs_per_request
# Enough attempts that no request of these scenarios runs out of them: a
# request may meet several of a provider's injected failures in a row.
RETRY = {"max_attempts": 10, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}
BLIP_LATENCY_S = 0.3  # long enough that a burst's requests are all in flight together


def directive_kind(directive: str) -> str | None:
    """The failure class the client must give an injected directive (None: a clean answer)."""
    name = directive.split(":", 1)[0]
    if name == "ok":
        return None
    if name in ("429", "429-cn"):
        return "rate_limited"
    if name in ("truncated", "count", "nan", "dimlen"):
        return "bad_response"
    if name in ("401", "403"):
        return "unusable"
    if name == "400":
        return "bad_input"
    return "transient"  # 500, 502, drop, error200:CODE, stall:S (every stall here outlasts timeout_s)


def injected(fp: FakeProvider) -> Counter[str]:
    return Counter(k for d in fp.directives if (k := directive_kind(d)) is not None)


# ------------------------------------------------------------------ scenarios
@dataclass(frozen=True)
class Relay:
    name: str
    fake: dict[str, Any] = field(default_factory=dict)  # FakeProvider keyword arguments
    entry: dict[str, Any] = field(default_factory=dict)  # extra keys of its job entry


Check = Callable[[dict[str, FakeProvider], dict[str, Any]], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    relays: tuple[Relay, ...]
    check: Check = lambda fakes, summary: None
    rows: int = 100


def _storm_recovers(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    assert s["providers"]["solo"]["rate_limited"] == 4  # the burst, every 429 counted once
    assert s["run"]["retries"] == 4
    arrivals = fakes["solo"].arrivals
    assert arrivals[5] - arrivals[4] >= 1.0  # the last 429's Retry-After: 1 was sat out


def _storm_other_takes_the_work(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    stormy = fakes["stormy"]
    assert rows_sent(stormy) == Counter()
    # After its first 429 (Retry-After: 5) nothing new goes there, not even a request that was
    # already waiting for one of its slots: only what was in flight (its max_concurrency, 2).
    assert 1 <= stormy.count() - 1 <= 2
    assert s["providers"]["stormy"]["rate_limited"] == stormy.count() - 1
    # Nobody sat out the Retry-After (5 s): the calm provider took all the work before it ran out.
    first_429 = stormy.arrivals[1]  # after its start-up probe
    assert fakes["calm"].arrivals[-1] < first_429 + 5


def _five_percent(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    assert injected(fakes["flaky"])["transient"] >= 2  # seed 5: the 7th, 17th and 27th requests


def _circuit_recovers(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    fp = fakes["blip"]
    # 40 rows: 8 requests, all in flight when the burst hits them; the 3 failures after
    # the 5th that opened the circuit do not count as failed probes (4 opens give up).
    assert fp.max_in_flight == 8, "the burst should hit requests in flight together"
    assert fp.directives == ["ok"] + ["500"] * 8 + ["ok"] * 8
    # After the rest one request probes the half-open circuit and the others wait for its
    # answer (or for one sent before the circuit opened): a pause of nearly a latency.
    # Probes sent together would leave no such pause.
    after_burst = fp.arrivals[9:]
    assert max(b - a for a, b in zip(after_burst, after_burst[1:])) >= BLIP_LATENCY_S / 2
    assert s["providers"]["blip"]["state"] == "ready"
    assert s["providers"]["blip"]["failures"] == {"transient": 8}


def _bad_key(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    assert fakes["wrong-key"].count() == 1  # the start-up probe, nothing after
    report = s["providers"]["wrong-key"]
    assert report["state"] == "unusable" and "invalid_api_key" in report["reason"]
    assert s["run"]["retries"] == 0


def _key_revoked(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    fp = fakes["revoked"]
    refused = fp.directives.count("401")
    assert 1 <= refused <= 3  # its max_concurrency: only requests already in flight
    assert fp.directives == ["ok"] * 4 + ["401"] * refused
    report = s["providers"]["revoked"]
    assert report["state"] == "unusable" and "invalid_api_key" in report["reason"]
    assert s["run"]["retries"] == 0  # routing around an unusable provider is no retry


def _quota(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    fp = fakes["metered"]
    over_quota = fp.count() - 4  # quota_requests=4: the probe and three requests succeed
    assert len(fp.inputs_received) == len(PROBE_TEXTS) + 3 * PER_REQUEST
    assert 1 <= over_quota <= 3  # its max_concurrency: only requests already in flight
    report = s["providers"]["metered"]
    assert report["state"] == "unusable" and "insufficient_user_quota" in report["reason"]
    assert report["failures"] == {"unusable": over_quota}
    assert s["run"]["retries"] == 0


def _ctyun(fakes: dict[str, FakeProvider], s: dict[str, Any]) -> None:
    assert sum(rows_sent(fakes["ctyun"]).values()) > 0  # its `embeddings` answers reached the output
    assert s["providers"]["ctyun"]["rate_limited"] == 1


SCENARIOS = [
    Scenario("429_storm_with_retry_after_then_recovery",
             (Relay("solo", {"script": ["ok"] + ["429:1"] * 4}),), _storm_recovers),
    Scenario("429_storm_on_one_of_two_providers",
             # both slow enough that requests queue for their slots
             (Relay("stormy", {"script": ["ok"], "fail_rate": 1.0, "fail_with": "429:5", "latency_s": 0.05},
                    {"max_concurrency": 2}),
              Relay("calm", {"latency_s": 0.05}, {"max_concurrency": 2})), _storm_other_takes_the_work),
    Scenario("five_percent_500s",
             (Relay("flaky", {"fail_rate": 0.05, "fail_with": "500", "seed": 5}),), _five_percent, rows=120),
    Scenario("burst_of_500s_in_flight_together_opens_the_circuit_then_recovers",
             (Relay("blip", {"script": ["ok"] + ["500"] * 8, "latency_s": BLIP_LATENCY_S}, {"max_concurrency": 8}),),
             _circuit_recovers, rows=40),
    Scenario("stalls_past_the_timeout",
             (Relay("staller", {"script": ["ok", "stall:3", "ok", "ok", "stall:3"]}, {"timeout_s": 0.5}),)),
    Scenario("dropped_connections",
             (Relay("dropper", {"script": ["ok", "drop", "ok", "drop", "drop", "ok", "drop"]}),)),
    Scenario("truncated_json",
             (Relay("truncator", {"script": ["ok", "truncated", "ok", "truncated"]}),)),
    Scenario("wrong_vector_count",
             (Relay("miscounter", {"script": ["ok", "count", "ok", "ok", "count"]}),)),
    Scenario("nan_in_base64_vectors",
             (Relay("nan-b64", {"script": ["ok", "nan", "ok", "nan"]}),)),
    Scenario("nan_in_float_vectors",
             (Relay("nan-float", {"script": ["ok", "nan", "nan"], "base64": "ignore"}),)),
    Scenario("wrong_vector_length",
             (Relay("short", {"script": ["ok", "dimlen", "ok", "dimlen"]}),)),
    Scenario("http_200_with_an_error_body",
             (Relay("sly", {"script": ["ok", "error200:internal_error", "ok", "error200:500001"]}),)),
    Scenario("provider_with_a_bad_key",
             (Relay("wrong-key", {"api_key": "sk-not-this-one"}), Relay("good")), _bad_key),
    Scenario("key_revoked_mid_run",
             (Relay("revoked", {"script": ["ok"] * 4, "fail_rate": 1.0, "fail_with": "401"}, {"max_concurrency": 3}),
              Relay("good")), _key_revoked),
    Scenario("quota_runs_out_mid_run",
             (Relay("metered", {"quota_requests": 4}, {"max_concurrency": 3}), Relay("good")), _quota),
    Scenario("ctyun_dialect_with_its_failures_beside_an_openai_relay",
             (Relay("ctyun", {"dialect": "ctyun", "script": ["ok", "error200:500001", "429-cn", "ok", "500"]}),
              Relay("openai")), _ctyun),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.name for sc in SCENARIOS])
def test_chaos_with_a_working_provider_exits_0_with_every_vector_exact(tmp_path: Path, sc: Scenario) -> None:
    texts = sample_texts(sc.rows)
    table = docs_table(texts)
    write_parquet(tmp_path / "data.parquet", table)
    out = tmp_path / "out"
    with ExitStack() as stack:
        fakes = {r.name: stack.enter_context(FakeProvider(dim=DIM, **r.fake)) for r in sc.relays}
        entries = [provider_entry(fakes[r.name], name=r.name, **r.entry) for r in sc.relays]
        job = write_job(tmp_path, entries, rows_per_part=ROWS_PER_PART, retry=RETRY)
        result = run(job)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "_summary.json").read_text())

        # Every row paid for once, whoever answered it.
        assert sum((rows_sent(fp) for fp in fakes.values()), Counter()) == Counter(texts)
        # Every injected failure counted under its class, and retried exactly once.
        retried = 0
        for name, fp in fakes.items():
            report = summary["providers"][name]
            kinds = injected(fp)
            assert report["requests"] == fp.count(), name
            assert {k: v for k, v in report["failures"].items() if k != "unusable"} == {
                k: v for k, v in kinds.items() if k != "unusable"}, name
            assert report["rate_limited"] == kinds["rate_limited"], name
            retried += sum(v for k, v in kinds.items() if k != "unusable")
        assert summary["run"]["retries"] == retried
        sc.check(fakes, summary)

    assert (out / "_SUCCESS").exists()
    assert summary["status"] == "complete" and summary["run"]["rows_embedded"] == sc.rows
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == table.column("doc_id").to_pylist()
    assert_vectors_exact(parts, texts, DIM)


# ------------------------------------------------------------------ all down
def closed_port_url() -> str:
    dead = FakeProvider(dim=DIM).start()
    dead.stop()  # nothing listens on its port now
    return dead.base_url


DOWN = {
    # both fail every request from the start: one answers 500, the other refuses connections
    "from_the_start": [{"fail_rate": 1.0, "fail_with": "500"}, None],
    # both work a while, then one answers 500 and the other drops every connection
    "mid_run": [{"script": ["ok"] * 7, "fail_rate": 1.0, "fail_with": "500"},
                {"script": ["ok"] * 7, "fail_rate": 1.0, "fail_with": "drop"}],
}
DOWN_CONCURRENCY = 2


@pytest.mark.parametrize("when", list(DOWN))
def test_all_providers_down_exits_1_naming_each_and_a_rerun_sends_only_uncommitted_rows(
    tmp_path: Path, when: str
) -> None:
    texts = sample_texts(100)
    table = docs_table(texts)
    write_parquet(tmp_path / "data.parquet", table)
    out = tmp_path / "out"
    names = ["down-a", "down-b"]
    with ExitStack() as stack:
        targets = [closed_port_url() if spec is None else stack.enter_context(FakeProvider(dim=DIM, **spec))
                   for spec in DOWN[when]]
        entries = [provider_entry(t, name=n, max_concurrency=DOWN_CONCURRENCY) for t, n in zip(targets, names)]
        # attempts to spare: the run ends because every provider is down, not because one request gave up
        job = write_job(tmp_path, entries, rows_per_part=ROWS_PER_PART, retry={**RETRY, "max_attempts": 100})
        result = run(job)
        answered_first = sum((rows_sent(t) for t in targets if isinstance(t, FakeProvider)), Counter())
        for fake in (t for t in targets if isinstance(t, FakeProvider)):
            # Given up once its circuit's probes failed, and sent nothing after: the failures that
            # opened it, one failed probe per further rest, what else was in flight when it opened.
            failed = len(fake.directives) - fake.directives.count("ok")
            assert failed <= CIRCUIT_FAILURES + CIRCUIT_OPENS_TO_GIVE_UP - 1 + DOWN_CONCURRENCY - 1
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert error_lines(result.stderr) == [last]
    assert all(name in last for name in names), last
    assert not (out / "_SUCCESS").exists()

    committed = committed_units(out)  # the checkpoint reads whole
    assert {p.name for p in part_files(out)} == {f"part-{seq:05d}.parquet" for seq in committed}
    for seq in committed:  # what is committed is whole and exact
        part = pq.read_table(out / f"part-{seq:05d}.parquet")
        rows = range(seq * ROWS_PER_PART, (seq + 1) * ROWS_PER_PART)
        assert part.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in rows]
        assert_vectors_exact(part, [texts[i] for i in rows], DIM)
    if when == "mid_run":
        assert committed, "expected parts finished before both providers went down"
    else:
        assert not committed

    with FakeProvider(dim=DIM) as a, FakeProvider(dim=DIM) as b:
        job = write_job(tmp_path, [provider_entry(a, name=names[0]), provider_entry(b, name=names[1])],
                        rows_per_part=ROWS_PER_PART, retry=RETRY)
        rerun = run(job)
        assert rerun.returncode == 0, rerun.stderr
        resent = rows_sent(a) + rows_sent(b)
    # Rows of unfinished parts only, and none answered before the outage (their part's journal kept them).
    assert set(resent) <= {t for i, t in enumerate(texts) if i // ROWS_PER_PART not in committed}
    assert resent == Counter(texts) - answered_first
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == table.column("doc_id").to_pylist()
    assert_vectors_exact(parts, texts, DIM)
