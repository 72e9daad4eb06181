"""Requests- and tokens-per-minute: never over the limit in any window, and no slower than it allows."""
from __future__ import annotations

import asyncio
import bisect

import pytest

import pipeline.limits as limits
from fakeprovider import FakeProvider, vector_for
from pipeline.config import ProviderConfig, RetryConfig
from pipeline.dispatch import Dispatcher
from pipeline.limits import RateWindow
from pipeline.providers.openai import OpenAIProvider

W = limits.WINDOW_S + limits.SAFETY_S


def _max_in_any_window(times: list[float], window: float, weights: list[int] | None = None) -> int:
    """The most sends (or tokens) that fall in any half-open window of `window` seconds."""
    weights = weights or [1] * len(times)
    best = 0
    for i, start in enumerate(times):
        j = bisect.bisect_left(times, start + window)
        best = max(best, sum(weights[i:j]))
    return best


def _drive(window: RateWindow, sizes: list[int], latency_s: float = 0.0) -> list[float]:
    """Send requests of `sizes` tokens one after another as early as the window
    allows, on a simulated clock; each is answered `latency_s` later."""
    now = 0.0
    times = []
    for tokens in sizes:
        now += window.delay_s(tokens, now)
        assert window.delay_s(tokens, now) == 0.0
        ticket = window.sent(tokens, now)
        times.append(now)
        now += latency_s
        window.answered(ticket, tokens, now)
    return times


def test_requests_in_flight_count_against_the_window_until_answered() -> None:
    window = RateWindow(2, None)
    first, second = window.sent(1, 0.0), window.sent(1, 0.0)
    assert window.delay_s(1, 0.0) > 0  # both still in flight: no room, whatever the clock says
    window.answered(first, 1, 5.0)
    window.answered(second, 1, 5.0)
    assert window.delay_s(1, 5.0 + limits.WINDOW_S) > 0  # stamped at their answer, not at their send
    assert window.delay_s(1, 5.0 + W) == 0.0


@pytest.mark.parametrize("rpm, n", [(1, 3), (10, 35), (3000, 7000)])
def test_requests_per_minute_never_exceeded_in_any_window_and_runs_at_the_limit(rpm: int, n: int) -> None:
    times = _drive(RateWindow(rpm, None), [1] * n)
    assert _max_in_any_window(times, limits.WINDOW_S) <= rpm
    # At the limit: the k-th full window starts exactly when the first send of the previous one ages out.
    full_windows = (n - 1) // rpm
    assert times[-1] == pytest.approx(full_windows * W)


@pytest.mark.parametrize(
    "tpm, sizes",
    [
        (1000, [100] * 25),
        (1000, [999, 2, 999, 1]),
        (50, [80, 10, 80]),  # a request over the whole limit goes alone into an empty window
        (10_000, [1, 9_999, 1, 5_000, 5_000, 5_001]),
    ],
)
def test_tokens_per_minute_never_exceeded_except_by_a_lone_oversize_request(tpm: int, sizes: list[int]) -> None:
    times = _drive(RateWindow(None, tpm), sizes)
    for i, t in enumerate(times):
        in_window = [s for s, at in zip(sizes, times) if t <= at < t + limits.WINDOW_S]
        assert sum(in_window) <= tpm or in_window == [sizes[i]]


def test_both_limits_apply_together() -> None:
    window = RateWindow(5, 100)
    times = _drive(window, [30] * 12)
    assert _max_in_any_window(times, limits.WINDOW_S) <= 3  # 3 x 30 tokens fit 100, a 4th does not
    assert window.delay_s(30, times[-1]) > 0


@pytest.mark.parametrize("rpm, tpm", [(0, None), (None, 0), (-5, None)])
def test_zero_or_negative_limits_are_refused(rpm: int | None, tpm: int | None) -> None:
    with pytest.raises(ValueError):
        RateWindow(rpm, tpm)


def test_unlimited_window_never_delays() -> None:
    window = RateWindow(None, None)
    for i in range(1000):
        assert window.delay_s(10**9, float(i)) == 0.0
        window.sent(10**9, float(i))


def test_provider_rpm_holds_over_real_http_as_the_server_counts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "WINDOW_S", 2.0)  # a 2-second "minute" keeps the test short
    monkeypatch.setattr(limits, "SAFETY_S", 0.02)
    rpm, n = 8, 30

    async def run(base_url: str) -> None:
        provider = OpenAIProvider(
            ProviderConfig(name="p", base_url=base_url, api_key="sk-test-key", model="text-embedding-3-small",
                           max_concurrency=4, requests_per_minute=rpm), None)
        await provider.start()
        try:
            dispatcher = Dispatcher([provider], RetryConfig())
            results = await asyncio.gather(*(dispatcher.embed([f"text {i}"], 2) for i in range(n)))
            for i, result in enumerate(results):
                assert (result.vectors[0] == vector_for(f"text {i}", 16)).all()
        finally:
            await provider.close()

    with FakeProvider() as server:
        asyncio.run(run(server.base_url))
        arrivals = server.arrivals
    assert len(arrivals) == n
    assert _max_in_any_window(arrivals, limits.WINDOW_S) <= rpm
    # No slower than the limit allows (the pace itself is proven on an injected
    # clock above): each window's whole allowance went out together, as soon as
    # the window had room, none of it held back or trickled.
    groups = [arrivals[i:i + rpm] for i in range(0, n, rpm)]
    assert all(group[-1] - group[0] < limits.WINDOW_S / 2 for group in groups)
    assert sum(1 for t in arrivals if t < arrivals[0] + limits.WINDOW_S) == rpm


# ---------------------------------------------------------------- adaptive concurrency
from pipeline.limits import LATENCY_MIN_SAMPLES, AdaptiveConcurrency  # noqa: E402


def test_rate_limits_halve_concurrency_down_to_one_and_successes_grow_it_back_to_the_maximum() -> None:
    c = AdaptiveConcurrency(16)
    assert c.allowed == 16
    for expected in (8, 4, 2, 1, 1):
        c.on_rate_limited()
        assert c.allowed == expected
    answers = 0
    while c.allowed < 16:
        c.on_success(0.1)
        answers += 1
    # Additive increase: about one step per window of answers, so 1 -> 16 takes ~sum(1..15) answers.
    assert 100 <= answers <= 140
    for _ in range(1000):
        c.on_success(0.1)
    assert c.allowed == 16 and c.limit == 16.0


def test_rising_latency_trims_concurrency_but_steady_latency_does_not() -> None:
    steady = AdaptiveConcurrency(10)
    for _ in range(200):
        steady.on_success(0.2)
    assert steady.allowed == 10
    rising = AdaptiveConcurrency(10)
    for _ in range(LATENCY_MIN_SAMPLES + 10):
        rising.on_success(0.2)
    for _ in range(5):
        rising.on_success(2.0)  # ten times slower: the provider is saturating
    assert rising.allowed < 10


@pytest.mark.parametrize("latency", [float("nan"), -1.0])
def test_nonsense_latencies_change_nothing(latency: float) -> None:
    c = AdaptiveConcurrency(4)
    c.on_rate_limited()
    before = c.limit
    c.on_success(latency)
    assert c.limit == before


def test_a_maximum_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveConcurrency(0)
