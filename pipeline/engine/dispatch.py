"""Routing, per-provider limits, retries, circuits and accounting.

One request is one call of `Dispatcher.embed`: it picks a provider, waits for
a slot there (adaptive concurrency) and for room in its RPM/TPM window (the
job's figures, split among shards, or the share of the key the provider's
`x-ratelimit-*` headers leave this process), sends, and on failure reads the
failure's class to decide between retrying (after a backoff, preferably
elsewhere), routing around a provider that is unusable for this job, or
handing the failure back. A provider that keeps failing is opened as a
circuit (`limits.Circuit`), rested, then probed with one request.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Literal

import numpy as np

from ..config.job import RetryConfig
from ..core.limits import AdaptiveConcurrency, Circuit, Permit, RateWindow
from ..core.retry import retry_delay_s
from ..errors import BadResponseError, ProviderError, ProviderUnusableError, WorkLeftError
from ..providers import EmbedResult, Provider
from ..providers.classify import classify

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 2048  # latencies kept per provider for p50/p95
CIRCUIT_FAILURES = 5  # consecutive failed answers that open a provider's circuit
CIRCUIT_COOLDOWN_BACKOFFS = 4  # an open circuit rests this many initial backoffs, doubling per reopening
CIRCUIT_OPENS_TO_GIVE_UP = 4  # its probe failed after this many rests in a row: down for this run

ProviderState = Literal["ready", "cooling", "open", "unusable"]


@dataclass(frozen=True)
class NotSent:
    """An attempt that sent nothing: while it waited for a slot the provider
    became unusable, began resting (a Retry-After, an open circuit), or
    another request took the one probe of its half-open circuit."""

    why: Literal["unusable", "resting", "probing"]


Outcome = EmbedResult | ProviderError | NotSent


@dataclass
class ProviderStats:
    requests: int = 0
    inputs: int = 0
    tokens: int = 0  # paid for what it answered: its usage where it reports it, else our exact count (the embedder's)
    usage_tokens: int = 0  # what the provider reported billing
    retries: int = 0
    rate_limited: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        lat = np.asarray(self.latencies_s) if self.latencies_s else None
        return {
            "requests": self.requests,
            "inputs": self.inputs,
            "tokens": self.tokens,
            "usage_tokens": self.usage_tokens,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "failures": dict(sorted(self.failures.items())),
            "latency_p50_s": None if lat is None else round(float(np.percentile(lat, 50)), 4),
            "latency_p95_s": None if lat is None else round(float(np.percentile(lat, 95)), 4),
        }


class Route:
    """A provider and what the dispatcher knows about it."""

    def __init__(self, provider: Provider, retry: RetryConfig, shards: int) -> None:
        cfg = provider.config
        self.provider = provider
        self.name = provider.name
        self.priority = cfg.priority
        self.concurrency = AdaptiveConcurrency(cfg.max_concurrency)
        # A key's figures are shared by the job's shards unless each shard has a key of its own.
        self.rate = RateWindow(cfg.requests_per_minute, cfg.tokens_per_minute,
                               shards=1 if cfg.limits_per_shard else shards, window_s=cfg.rate_window_s)
        self.circuit = Circuit(
            failures_to_open=CIRCUIT_FAILURES,
            first_rest_s=retry.initial_backoff_s * CIRCUIT_COOLDOWN_BACKOFFS,
            max_rest_s=retry.max_backoff_s,
            opens_to_give_up=CIRCUIT_OPENS_TO_GIVE_UP,
        )
        self.in_flight = 0
        self._waiting: list[_Waiter] = []  # in arrival order
        # Parts are written in order, so requests go out in order; but once the
        # last are made the largest go first. A provider's time follows a
        # request's size, and in arrival order the job's last large request,
        # answered alone, left the other slots idle: 12% of a 20,000-document
        # run at 16 in flight (bench latency-real).
        self.largest_first = False
        self.rate_limited_until = 0.0  # resting out a 429 until then
        self.unusable_reason: str | None = None
        self.stats = ProviderStats()

    def state(self, now: float) -> ProviderState:
        if self.unusable_reason is not None:
            return "unusable"
        if self.circuit.state() != "closed":
            return "open"
        return "cooling" if now < self.rate_limited_until else "ready"

    def available_at(self, now: float) -> float:
        """When this provider can take a request (now or later)."""
        return max(self.rate_limited_until, self.circuit.available_at(now))

    async def acquire(self, tokens: int) -> None:
        """A slot for a request of `tokens`: at once if one is free and none
        waits, else the next slot freed goes to the oldest waiting request,
        or, once the job's last requests are made, to the largest."""
        if not self._waiting and self.in_flight < self.concurrency.allowed:
            self.in_flight += 1
            return
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release()  # granted as it was cancelled: the slot goes to the next
            else:
                self._waiting.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        while self._waiting and self.in_flight < self.concurrency.allowed:
            chosen = 0
            if self.largest_first:
                chosen = max(range(len(self._waiting)), key=lambda i: self._waiting[i].tokens)  # the first of equals
            self.in_flight += 1
            self._waiting.pop(chosen).granted.set_result(None)


@dataclass(frozen=True)
class _Waiter:
    tokens: int
    granted: asyncio.Future[None]


class Dispatcher:
    def __init__(
        self,
        providers: list[Provider],
        retry: RetryConfig,
        *,
        shards: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.routes = [Route(p, retry, shards) for p in providers]  # shards: processes of this job sharing its keys
        self.dimensions: int | None = None  # once known, every answer must match it
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._rand = rand

    def last_requests_made(self) -> None:
        """No request but those already waiting or to come from open parts:
        the largest go first, so the job's last round is its shortest."""
        for route in self.routes:
            route.largest_first = True

    def input_cap(self, max_inputs: int) -> int:
        """`max_inputs`, lowered to the most a usable provider has said it
        takes (a cap learned from a "too many inputs" answer, OpenAIProvider.max_inputs)."""
        learned = [cap for r in self.routes if r.unusable_reason is None
                   and (cap := getattr(r.provider, "max_inputs", None)) is not None]
        return min([max_inputs, *learned])

    def usable(self) -> bool:
        return any(r.unusable_reason is None for r in self.routes)

    def reasons(self) -> dict[str, str]:
        return {r.name: r.unusable_reason for r in self.routes if r.unusable_reason}

    def billed(self, provider: str | None, tokens: int) -> None:
        """What an answer of `provider` cost: the tokens its usage reported, else
        our exact count (the request was paced by bounds, which overstate it)."""
        for route in self.routes:
            if route.name == provider:
                route.stats.tokens += tokens

    def mark_unusable(self, route: Route, reason: str) -> None:
        if route.unusable_reason is None:
            route.unusable_reason = reason
            log.warning("provider %s is unusable for this job: %s", route.name, reason)

    async def embed(self, texts: list[str], tokens: int) -> EmbedResult:
        """Embed one request's texts, retrying across providers.

        Raises BadInputError when the rows themselves are refused (the caller
        isolates them), WorkLeftError when attempts or providers run out.
        """
        return await self._with_retries(texts, tokens, pinned=None)

    async def embed_on(self, route: Route, texts: list[str], tokens: int) -> EmbedResult:
        """Embed on this provider alone (the start-up probe), with its retries;
        raises the provider's own error when it cannot answer."""
        return await self._with_retries(texts, tokens, pinned=route)

    async def _with_retries(self, texts: list[str], tokens: int, pinned: Route | None) -> EmbedResult:
        last: ProviderError | None = None
        avoid: Route | None = None
        attempt = 0  # requests sent that count towards retry.max_attempts
        while attempt < self._retry.max_attempts:
            route = pinned or self._pick(avoid)
            if route is None or route.unusable_reason is not None:
                if pinned is not None:
                    raise ProviderUnusableError(pinned.unusable_reason or "unusable", provider=pinned.name)
                raise WorkLeftError(self.no_provider_message())
            # Rest out a rate limit or an open circuit, or wait while another
            # request probes a half-open one: waiting costs no attempt.
            while (wait := route.available_at(self._clock()) - self._clock()) > 0 and route.unusable_reason is None:
                await self._sleep(wait)
            outcome = await self._attempt(route, texts, tokens, retry=attempt > 0)
            if isinstance(outcome, NotSent):
                avoid = route
                continue
            if isinstance(outcome, EmbedResult):
                return outcome
            last = err = outcome
            if err.kind == "bad_input":
                raise err
            if err.kind == "unusable":
                if pinned is not None:
                    raise err
                continue  # routing around a provider that can never work is not a retry
            attempt += 1
            delay = retry_delay_s(attempt, err, self._retry, self._rand)
            if err.kind == "rate_limited":
                route.rate_limited_until = max(route.rate_limited_until, self._clock() + delay)
            log.debug("retry %d after %s (%s); waiting %.2fs", attempt, err.kind, err, delay)
            avoid = route
            if attempt < self._retry.max_attempts and (pinned or self._pick(avoid)) is route:
                # Nowhere else to go: back off here (a rest already ahead counts towards it).
                remaining = delay - max(0.0, route.available_at(self._clock()) - self._clock())
                if remaining > 1e-6:
                    await self._sleep(remaining)
        if pinned is not None and last is not None:
            raise last
        if last is not None and not self.usable():
            raise WorkLeftError(self.no_provider_message())
        raise WorkLeftError(f"a request failed {self._retry.max_attempts} times (retry.max_attempts); last: {last}")

    async def _attempt(self, route: Route, texts: list[str], tokens: int, *, retry: bool) -> Outcome:
        """One request to one provider: its result, its classified failure, or
        NotSent when something that happened while it waited for a slot or for
        room in the rate window means it must not go there now."""
        await route.acquire(tokens)
        try:
            await self._wait_for_rate(route, tokens)
            # Checked after every wait and with no await before the send, so
            # nothing that happened meanwhile (a 429, an opened circuit) is missed.
            if route.unusable_reason is not None:
                return NotSent("unusable")
            if self._clock() < route.rate_limited_until:
                return NotSent("resting")
            permit = route.circuit.admit(self._clock())
            if permit is None:
                return NotSent("probing" if route.circuit.probing else "resting")
            try:
                return await self._send(route, permit, texts, tokens, retry=retry)
            finally:
                route.circuit.release(permit)
        finally:
            route.release()

    async def _send(self, route: Route, permit: Permit, texts: list[str], tokens: int, *, retry: bool) -> Outcome:
        ticket = route.rate.sent(tokens, self._clock())
        route.stats.requests += 1
        if retry:  # counted when sent: a request held back is no retry
            route.stats.retries += 1
        started = self._clock()
        try:
            result = await route.provider.embed(texts)
        except Exception as exc:  # noqa: BLE001 - classified in one place
            err = classify(provider=route.name, exc=exc)
            route.rate.answered(ticket, tokens, self._clock(), err.limits)
            self._record_failure(route, err, permit)
            return err
        except BaseException:  # cancelled: it leaves the window's requests in flight all the same
            route.rate.answered(ticket, tokens, self._clock())
            raise
        route.rate.answered(ticket, tokens, self._clock(), result.limits, result.usage_tokens)
        if self.dimensions is not None and result.vectors.shape[1] != self.dimensions:
            err = BadResponseError(
                f"vectors of length {result.vectors.shape[1]}, this job's are {self.dimensions}", provider=route.name
            )
            self._record_failure(route, err, permit)
            return err
        self._record_success(route, len(texts), tokens, result, self._clock() - started)
        return replace(result, provider=route.name)

    def _record_failure(self, route: Route, err: ProviderError, permit: Permit) -> None:
        route.stats.failures[err.kind] += 1
        if err.kind == "unusable":
            # reasons are keyed by provider already: drop the "name: " that str(err) starts with
            self.mark_unusable(route, str(err).removeprefix(f"{route.name}: "))
        elif err.kind == "rate_limited":
            route.stats.rate_limited += 1
            route.concurrency.on_rate_limited()
        elif err.kind in ("transient", "bad_response"):
            rest = route.circuit.failed(permit, self._clock())
            if rest is None:
                return
            log.warning("provider %s: circuit open for %.2fs after %s (%s)", route.name, rest, err.kind, err)
            if route.circuit.state() == "down":
                # Every probe after every rest failed: give it up for this run.
                failures = route.circuit.failures_in_a_row
                self.mark_unusable(route, f"down: {failures} failures in a row; last: {err.message}")

    async def _wait_for_rate(self, route: Route, tokens: int) -> None:
        """Hold the request until the provider's RPM/TPM window has room for it."""
        while (delay := route.rate.delay_s(tokens, self._clock())) > 0:
            await self._sleep(delay)

    def _pick(self, avoid: Route | None) -> Route | None:
        """The best usable provider: one that can take a request now before
        one resting; then the lowest priority; then the least loaded against
        its current concurrency. Another provider is preferred over `avoid`
        (the one that just failed)."""
        now = self._clock()
        candidates = [r for r in self.routes if r.unusable_reason is None]
        if not candidates:
            return None
        if avoid is not None and len(candidates) > 1:
            candidates = [r for r in candidates if r is not avoid] or candidates
        return min(
            candidates,
            key=lambda r: (r.available_at(now) > now, r.priority, r.in_flight / r.concurrency.allowed, r.available_at(now)),
        )

    def _record_success(self, route: Route, n: int, tokens: int, result: EmbedResult, latency: float) -> None:
        if route.circuit.succeeded():
            log.info("provider %s: circuit closed again", route.name)
        route.concurrency.on_success(latency, tokens)
        s = route.stats
        s.inputs += n
        s.usage_tokens += result.usage_tokens or 0
        if len(s.latencies_s) >= LATENCY_SAMPLES:
            s.latencies_s[int(self._rand() * LATENCY_SAMPLES) % LATENCY_SAMPLES] = latency
        else:
            s.latencies_s.append(latency)

    def no_provider_message(self) -> str:
        reasons = "; ".join(f"{name}: {why}" for name, why in self.reasons().items())
        return f"no provider can take work ({reasons})"

    def provider_report(self) -> dict[str, dict[str, object]]:
        now = self._clock()
        return {
            r.name: {"state": r.state(now), "reason": r.unusable_reason, **r.stats.to_json()} for r in self.routes
        }

