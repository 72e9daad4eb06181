"""Dispatcher: retries, backoff, routing and limits, with real OpenAIProviders
talking to FakeProviders over HTTP. Sleep and clock are injected: delays are
recorded and the clock moves by them, so nothing waits."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import numpy as np
import pytest

from fakeprovider import FakeProvider, vector_for
from pipeline.config.job import ProviderConfig, RetryConfig
from pipeline.engine.dispatch import CIRCUIT_FAILURES, CIRCUIT_OPENS_TO_GIVE_UP, Dispatcher
from pipeline.errors import BadInputError, WorkLeftError
from pipeline.providers.openai import OpenAIProvider

MODEL = "text-embedding-3-small"
TEXTS = ["one", "two", "three"]
RETRY = RetryConfig(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


class FakeTime:
    """A clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def provider(fp: FakeProvider, name: str, **extra: Any) -> OpenAIProvider:
    values: dict[str, Any] = dict(name=name, base_url=fp.base_url, api_key=fp.api_key, model=MODEL,
                                  timeout_s=5.0, max_concurrency=4)
    values.update(extra)
    return OpenAIProvider(ProviderConfig(**values), None)


def dispatch(providers: list[OpenAIProvider], action: Callable[[Dispatcher], Awaitable[Any]],
             retry: RetryConfig = RETRY, time: FakeTime | None = None) -> Any:
    async def main() -> Any:
        t = time or FakeTime()
        d = Dispatcher(providers, retry, clock=t.clock, sleep=t.sleep)
        await asyncio.gather(*(p.start() for p in providers))
        try:
            return await action(d)
        finally:
            await asyncio.gather(*(p.close() for p in providers))

    return asyncio.run(main())


def embed_once(d: Dispatcher, texts: list[str] = TEXTS) -> Awaitable[Any]:
    return d.embed(texts, tokens=len(texts))


def assert_exact(vectors: np.ndarray, texts: list[str], dim: int) -> None:
    assert vectors.shape == (len(texts), dim)
    for row, text in zip(vectors, texts):
        assert np.array_equal(row, vector_for(text, dim))


def report_of(d: Dispatcher, out: dict[str, Any]) -> None:
    out.update(d.provider_report())


# ------------------------------------------------------------------ retries
def test_500_then_ok_is_retried_once_and_the_result_is_exact() -> None:
    t = FakeTime()
    report: dict[str, Any] = {}
    with FakeProvider(dim=8, script=["500"]) as fp:
        async def action(d: Dispatcher) -> Any:
            result = await embed_once(d)
            report_of(d, report)
            return result

        result = dispatch([provider(fp, "a")], action, time=t)
        assert fp.count() == 2
    assert_exact(result.vectors, TEXTS, 8)
    assert report["a"]["requests"] == 2
    assert report["a"]["retries"] == 1
    assert report["a"]["failures"] == {"transient": 1}
    assert report["a"]["inputs"] == 3
    assert len(t.sleeps) == 1 and 0 <= t.sleeps[0] <= RETRY.initial_backoff_s


def test_429_retry_after_is_honoured_before_the_retry() -> None:
    t = FakeTime()
    report: dict[str, Any] = {}
    with FakeProvider(dim=8, script=["429:2"]) as fp:
        async def action(d: Dispatcher) -> Any:
            result = await embed_once(d)
            report_of(d, report)
            return result

        result = dispatch([provider(fp, "a")], action, time=t)
        assert fp.count() == 2
    assert_exact(result.vectors, TEXTS, 8)
    assert t.sleeps and max(t.sleeps) >= 2.0
    assert sum(t.sleeps) < 2.5  # waited once, not twice
    assert report["a"]["rate_limited"] == 1 and report["a"]["retries"] == 1


def test_rate_limited_provider_hands_the_retry_to_another_without_waiting() -> None:
    t = FakeTime()
    with FakeProvider(dim=8, script=["429:30"]) as slow, FakeProvider(dim=8) as other:
        result = dispatch([provider(slow, "slow", priority=0), provider(other, "other", priority=1)],
                          embed_once, time=t)
        assert slow.count() == 1 and other.count() == 1
    assert_exact(result.vectors, TEXTS, 8)
    assert sum(t.sleeps) < 1.0


def test_exhausted_attempts_raise_work_left_after_exactly_max_attempts_requests() -> None:
    t = FakeTime()
    retry = RetryConfig(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    with FakeProvider(dim=8, script=["500", "502", "drop", "ok"]) as fp:
        async def action(d: Dispatcher) -> None:
            with pytest.raises(WorkLeftError, match="max_attempts"):
                await embed_once(d)

        dispatch([provider(fp, "a")], action, retry=retry, time=t)
        assert fp.count() == 3
    assert len(t.sleeps) == 2  # between attempts, none after the last
    assert all(0 <= s <= retry.max_backoff_s for s in t.sleeps)


def test_backoff_grows_with_attempts_and_stays_under_the_cap() -> None:
    retry = RetryConfig(max_attempts=6, initial_backoff_s=0.01, max_backoff_s=0.03)

    t = FakeTime()
    with FakeProvider(dim=8, script=["500"] * 5) as fp:
        async def main() -> Any:
            p = provider(fp, "a")
            d = Dispatcher([p], retry, clock=t.clock, sleep=t.sleep, rand=lambda: 1.0)
            await p.start()
            try:
                return await embed_once(d)
            finally:
                await p.close()

        result = asyncio.run(main())
        assert fp.count() == 6
    assert_exact(result.vectors, TEXTS, 8)
    assert t.sleeps == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03])


# ------------------------------------------------------------------ routing
def test_bad_key_provider_is_tried_once_then_never_again() -> None:
    report: dict[str, Any] = {}
    with FakeProvider(dim=8, api_key="sk-other") as bad_fp, FakeProvider(dim=8) as good_fp:
        bad = provider(bad_fp, "bad", priority=0, api_key="sk-wrong-key-for-bad")
        good = provider(good_fp, "good", priority=1)

        async def action(d: Dispatcher) -> list[Any]:
            results = [await d.embed([f"text {i}"], 1) for i in range(4)]
            report_of(d, report)
            return results

        results = dispatch([bad, good], action)
        assert bad_fp.count() == 1
        assert good_fp.count() == 4
        assert good_fp.inputs_received == [f"text {i}" for i in range(4)]
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"text {i}"], 8)
    assert report["bad"]["state"] == "unusable"
    assert "invalid_api_key" in report["bad"]["reason"]
    assert "sk-wrong-key-for-bad" not in report["bad"]["reason"]
    assert report["good"]["state"] == "ready" and report["good"]["reason"] is None
    assert report["good"]["requests"] == 4


def test_routing_around_an_unusable_provider_does_not_use_up_the_requests_attempts() -> None:
    with FakeProvider(dim=8, api_key="sk-other") as bad_fp, FakeProvider(dim=8) as good_fp:
        bad = provider(bad_fp, "bad", priority=0, api_key="sk-wrong-key-for-bad")
        good = provider(good_fp, "good", priority=1)
        result = dispatch([bad, good], embed_once, retry=RetryConfig(max_attempts=1))
        assert bad_fp.count() == 1 and good_fp.count() == 1
    assert_exact(result.vectors, TEXTS, 8)


def test_all_providers_unusable_raises_work_left_naming_each() -> None:
    with FakeProvider(dim=8, api_key="sk-x") as fp1, FakeProvider(dim=8, api_key="sk-y") as fp2:
        async def action(d: Dispatcher) -> str:
            with pytest.raises(WorkLeftError) as info:
                await embed_once(d)
            assert not d.usable()
            return str(info.value)

        message = dispatch([provider(fp1, "relay-one", api_key="sk-1"), provider(fp2, "relay-two", api_key="sk-2")],
                           action)
        assert fp1.count() == 1 and fp2.count() == 1
    assert message.count("relay-one") == 1 and message.count("relay-two") == 1  # each named once
    assert message.count("invalid_api_key") == 2


def test_400_bad_input_is_raised_to_the_caller_without_retry() -> None:
    t = FakeTime()
    with FakeProvider(dim=8, script=["400"]) as fp, FakeProvider(dim=8) as other:
        async def action(d: Dispatcher) -> None:
            with pytest.raises(BadInputError):
                await embed_once(d)

        dispatch([provider(fp, "a", priority=0), provider(other, "b", priority=1)], action, time=t)
        assert fp.count() == 1
        assert other.count() == 0
    assert t.sleeps == []


def test_spent_quota_moves_traffic_to_the_other_provider() -> None:
    report: dict[str, Any] = {}
    with FakeProvider(dim=8, quota_requests=2) as quota_fp, FakeProvider(dim=8) as other_fp:
        async def action(d: Dispatcher) -> list[Any]:
            results = [await d.embed([f"row {i}"], 1) for i in range(5)]
            report_of(d, report)
            return results

        results = dispatch([provider(quota_fp, "quota", priority=0), provider(other_fp, "other", priority=1)], action)
        assert quota_fp.count() == 3  # two answered, the third refused for quota
        assert quota_fp.inputs_received == ["row 0", "row 1"]
        assert other_fp.count() == 3
        assert other_fp.inputs_received == ["row 2", "row 3", "row 4"]
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"row {i}"], 8)
    assert report["quota"]["state"] == "unusable"
    assert "insufficient_user_quota" in report["quota"]["reason"]


def test_equal_priorities_share_the_load() -> None:
    with FakeProvider(dim=8, latency_s=0.05) as fp1, FakeProvider(dim=8, latency_s=0.05) as fp2:
        async def action(d: Dispatcher) -> list[Any]:
            return await asyncio.gather(*(d.embed([f"t{i}"], 1) for i in range(8)))

        results = dispatch([provider(fp1, "a", max_concurrency=2), provider(fp2, "b", max_concurrency=2)], action)
        assert fp1.count() + fp2.count() == 8
        assert fp1.count() >= 2 and fp2.count() >= 2
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"t{i}"], 8)


@pytest.mark.parametrize("last", [False, True], ids=["in_order", "last_requests_largest_first"])
def test_waiting_requests_go_in_order_until_the_last_are_made_then_the_largest_first(last: bool) -> None:
    """Parts are written in order, so requests go in order; the job's last
    round goes largest first, so its slowest answers do not finish alone."""
    sizes = [5, 40, 10, 30, 20]  # tokens of the requests waiting behind the first

    async def main() -> None:
        p = provider(fp, "a", max_concurrency=1)
        d = Dispatcher([p], RETRY)
        await p.start()
        try:
            first = asyncio.create_task(d.embed(["first"], 1))
            while fp.count() == 0:  # it holds the only slot while the others queue
                await asyncio.sleep(0.005)
            waiting = [asyncio.create_task(d.embed([f"size {n}"], n)) for n in sizes]
            await asyncio.sleep(0.01)
            if last:
                d.last_requests_made()
            await asyncio.gather(first, *waiting)
        finally:
            await p.close()

    with FakeProvider(dim=8, latency_s=0.05) as fp:
        asyncio.run(main())
        sent = [r["input"][0] for r in fp.requests][1:]
    expected = sorted(sizes, reverse=True) if last else sizes
    assert sent == [f"size {n}" for n in expected]


def test_a_request_cancelled_while_waiting_for_a_slot_gives_its_turn_to_the_next() -> None:
    async def main() -> list[Any]:
        p = provider(fp, "a", max_concurrency=1)
        d = Dispatcher([p], RETRY)
        await p.start()
        try:
            first = asyncio.create_task(d.embed(["first"], 1))
            while fp.count() == 0:
                await asyncio.sleep(0.005)
            cancelled = asyncio.create_task(d.embed(["cancelled"], 9))
            later = asyncio.create_task(d.embed(["later"], 1))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            results = await asyncio.gather(first, later)
            assert cancelled.cancelled()
            assert [r.in_flight for r in d.routes] == [0]
            return results
        finally:
            await p.close()

    with FakeProvider(dim=8, latency_s=0.05) as fp:
        results = asyncio.run(main())
        assert [r["input"][0] for r in fp.requests] == ["first", "later"]
    assert_exact(results[1].vectors, ["later"], 8)


def test_max_concurrency_bounds_requests_in_flight() -> None:
    async def main() -> list[Any]:
        p = provider(fp, "a", max_concurrency=2)
        d = Dispatcher([p], RETRY)  # real clock and sleep: the latency is what we measure
        await p.start()
        try:
            return await asyncio.gather(*(d.embed([f"t{i}"], 1) for i in range(8)))
        finally:
            await p.close()

    with FakeProvider(dim=8, latency_s=0.05) as fp:
        results = asyncio.run(main())
        assert fp.count() == 8
        assert fp.max_in_flight == 2
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"t{i}"], 8)


def test_answer_of_another_length_than_the_jobs_dimensions_is_not_accepted() -> None:
    with FakeProvider(dim=8) as fp:
        async def action(d: Dispatcher) -> None:
            d.dimensions = 16  # learned earlier from another answer
            with pytest.raises(WorkLeftError):
                await embed_once(d)

        dispatch([provider(fp, "a")], action, retry=RetryConfig(max_attempts=2, initial_backoff_s=0.01,
                                                                 max_backoff_s=0.05))
        assert fp.count() == 2


# ------------------------------------------------------------------ circuits
def test_a_provider_failing_in_a_row_is_opened_rested_then_probed_by_one_request_and_closed_on_success() -> None:
    retry = RetryConfig(max_attempts=1, initial_backoff_s=0.5, max_backoff_s=60)
    t = FakeTime()
    seen: dict[str, Any] = {}
    with FakeProvider(dim=8, script=["500"] * 5 + ["stall:0.3"]) as fp:

        async def action(d: Dispatcher) -> list[Any]:
            for _ in range(5):  # five answers in a row fail: the circuit opens
                with pytest.raises(WorkLeftError):
                    await embed_once(d)
            seen["after_failures"] = d.provider_report()["a"]["state"]
            opened_at = t.now
            # Three requests arrive while it rests: one probes, the others wait for its answer.
            results = await asyncio.gather(*(d.embed([f"t{i}"], 1) for i in range(3)))
            seen["rested_s"] = t.now - opened_at
            seen["after_probe"] = d.provider_report()["a"]["state"]
            return results

        results = dispatch([provider(fp, "a")], action, retry=retry, time=t)
        assert fp.count() == 5 + 3  # no request was lost or sent twice, and none while open
        assert fp.max_in_flight == 1  # the half-open probe went alone
    assert seen["after_failures"] == "open"
    assert seen["rested_s"] >= 0.5 * 4  # CIRCUIT_COOLDOWN_BACKOFFS initial backoffs
    assert seen["after_probe"] == "ready"
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"t{i}"], 8)


def test_a_provider_whose_probes_keep_failing_is_given_up_and_the_job_stops_with_work_left() -> None:
    retry = RetryConfig(max_attempts=10, initial_backoff_s=0.01, max_backoff_s=0.05)
    with FakeProvider(dim=8, script=["500"] * 100) as fp:
        with pytest.raises(WorkLeftError, match="down"):
            dispatch([provider(fp, "a")], lambda d: asyncio.gather(*(d.embed([f"t{i}"], 1) for i in range(4))), retry=retry)
        sent = fp.count()
    # Bounded: the failures that open the circuit, one failed probe per further rest, and the
    # other requests in flight when it opened (their failures are not failed probes).
    assert sent <= CIRCUIT_FAILURES + (CIRCUIT_OPENS_TO_GIVE_UP - 1) + 3


# ------------------------------------------------------------------ a key shared with others
from pipeline.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize(
    "shards, per_shard, expected",
    [(1, False, (120, 60_000)), (4, False, (30, 15_000)), (4, True, (120, 60_000)), (3, False, (40, 20_000))],
)
def test_shards_split_the_keys_figures_unless_each_has_a_key_of_its_own(
    shards: int, per_shard: bool, expected: tuple[int, int]
) -> None:
    cfg = ProviderConfig(name="a", base_url="http://127.0.0.1:9/v1", api_key="k", model=MODEL,
                         requests_per_minute=120, tokens_per_minute=60_000, limits_per_shard=per_shard)
    route = Dispatcher([OpenAIProvider(cfg, None)], RETRY, shards=shards).routes[0]
    assert (route.rate.requests.cap(0.0), route.rate.tokens.cap(0.0)) == expected


def test_limits_per_shard_must_be_true_or_false() -> None:
    with pytest.raises(ConfigError, match="limits_per_shard"):
        ProviderConfig(name="a", base_url="http://x/v1", api_key="k", model=MODEL, limits_per_shard="yes")  # type: ignore[arg-type]


@pytest.mark.slow  # a few windows of real time
@pytest.mark.parametrize("headers", [True, False])
def test_a_providers_limit_headers_pace_a_job_that_names_no_limits(headers: bool) -> None:
    """The job names no RPM; the provider allows 5 requests a (2-second)
    window and says so: paced by what it says, nothing is refused. The same
    provider keeping quiet refuses what the job sends too fast."""
    n = 15

    async def main(fp: FakeProvider) -> list[Any]:
        p = provider(fp, "a", max_concurrency=4, rate_window_s=2.0)
        d = Dispatcher([p], RetryConfig(max_attempts=20, initial_backoff_s=0.05, max_backoff_s=0.2))
        await p.start()
        try:
            return await asyncio.gather(*(d.embed([f"t{i}"], 1) for i in range(n)))
        finally:
            await p.close()

    with FakeProvider(dim=8, rpm=5, window_s=2.0, limit_headers=headers) as fp:
        results = asyncio.run(main(fp))
        refused = [accepted for _, _, accepted in fp.metered].count(False)
    for i, r in enumerate(results):
        assert_exact(r.vectors, [f"t{i}"], 8)
    if headers:
        assert refused == 0
    else:
        assert refused > 0
