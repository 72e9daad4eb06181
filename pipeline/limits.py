"""Pure: a provider's requests-per-minute and tokens-per-minute limits.

A sliding window of the last minute's requests. A request counts from the
moment it is sent; once answered it is stamped with its completion time,
which is no earlier than its arrival at the provider, so no 60-second window
the provider sees ever holds more than the limit, however long a connection
took to open. (A token bucket would allow twice the limit in the first
minute.) A full window frees a slot exactly as an old request ages out, so the
job runs at the limit, less one latency per minute.
"""
from __future__ import annotations

from collections import deque

WINDOW_S = 60.0
SAFETY_S = 0.05  # clock granularity between us and the provider
POLL_S = 0.05  # when the window is full of requests still in flight, look again this soon


class RateWindow:
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        if requests_per_minute is not None and requests_per_minute < 1:
            raise ValueError("requests_per_minute must be at least 1")
        if tokens_per_minute is not None and tokens_per_minute < 1:
            raise ValueError("tokens_per_minute must be at least 1")
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._done: deque[tuple[float, int]] = deque()  # (completed at, tokens), in completion order
        self._done_tokens = 0
        self._in_flight = 0
        self._in_flight_tokens = 0

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def delay_s(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` may be sent (0: now)."""
        self._expire(now)
        wait = 0.0
        if self.rpm is not None:
            over = len(self._done) + self._in_flight + 1 - self.rpm
            if over > 0:
                wait = max(wait, self._age_out_s(over, now, by_tokens=False))
        if self.tpm is not None and (self._done or self._in_flight):
            # A request larger than the whole limit goes alone into an empty window.
            over = self._done_tokens + self._in_flight_tokens + min(tokens, self.tpm) - self.tpm
            if over > 0:
                wait = max(wait, self._age_out_s(over, now, by_tokens=True))
        return wait

    def sent(self, tokens: int) -> None:
        self._in_flight += 1
        self._in_flight_tokens += tokens

    def answered(self, tokens: int, now: float) -> None:
        """A request ended (success or failure: relays count both)."""
        self._in_flight -= 1
        self._in_flight_tokens -= tokens
        self._done.append((now, tokens))
        self._done_tokens += tokens

    def _age_out_s(self, amount: int, now: float, *, by_tokens: bool) -> float:
        """Time until `amount` requests (or tokens) of the window have aged out."""
        freed = 0
        for done_at, tokens in self._done:
            freed += tokens if by_tokens else 1
            if freed >= amount:
                return max(0.0, done_at + WINDOW_S + SAFETY_S - now)
        return POLL_S  # the rest is still in flight: wait for answers

    def _expire(self, now: float) -> None:
        while self._done and self._done[0][0] + WINDOW_S + SAFETY_S <= now:
            self._done_tokens -= self._done.popleft()[1]


LATENCY_RISE_FACTOR = 2.0  # recent latency this many times the usual: the provider is saturating
LATENCY_FAST_ALPHA = 0.3
LATENCY_SLOW_ALPHA = 0.03
LATENCY_MIN_SAMPLES = 20  # no latency judgement before this many answers


class AdaptiveConcurrency:
    """How many requests a provider gets at once: AIMD between 1 and its
    `max_concurrency`. A rate limit halves it, a latency spike trims it, and
    each answered request adds 1/limit (one per window of successes). Only
    successes raise it: fast error responses never speed anything up."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.limit = float(maximum)
        self._fast: float | None = None  # EWMA of recent latencies
        self._slow: float | None = None  # EWMA of usual latencies
        self._samples = 0
        self._since_trim = 0

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def on_success(self, latency_s: float) -> None:
        if not latency_s >= 0:  # nan or negative: a clock glitch, not a signal
            return
        self._samples += 1
        self._since_trim += 1
        self._fast = latency_s if self._fast is None else self._fast + LATENCY_FAST_ALPHA * (latency_s - self._fast)
        self._slow = latency_s if self._slow is None else self._slow + LATENCY_SLOW_ALPHA * (latency_s - self._slow)
        rising = (
            self._samples >= LATENCY_MIN_SAMPLES
            and self._fast > LATENCY_RISE_FACTOR * self._slow
            and self._since_trim >= self.allowed  # at most one trim per window of answers
        )
        if rising:
            self.limit = max(1.0, self.limit * 0.8)
            self._since_trim = 0
        else:
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)

    def on_rate_limited(self) -> None:
        self.limit = max(1.0, self.limit / 2.0)
        self._since_trim = 0
