"""Pure: how fast and how much a provider gets. Fed outcomes and `now`; no I/O.

- `RateWindow`: the requests- and tokens-per-minute of one provider key. Own
  requests are kept over a sliding window; a request counts from the moment it
  is sent and, once answered, is stamped with its completion time, which is no
  earlier than its arrival at the provider, so no 60-second window the
  provider sees holds more than this process's figure (a token bucket would
  allow twice the limit in the first minute).
- `KeyShare`: what one process may take of a key that others use too (shards
  of a job, other jobs), read from the provider's `x-ratelimit-*` headers.
- `AdaptiveConcurrency`: AIMD on requests in flight, judging latency against
  what a request of that size usually takes.
- `Circuit`: consecutive failures open it, it rests, one probe closes it.

A little over 400 lines: the four policies that decide how much a provider
gets, pure and side by side, read more easily together than apart.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

WINDOW_S = 60.0  # what "per minute" means: RPM/TPM and the providers' x-ratelimit figures (a provider's rate_window_s)
SAFETY_S = 0.05  # clock granularity between us and the provider
POLL_S = 0.05  # when the window is full of requests still in flight, look again this soon
LATE_FORGIVEN_S = 0.02  # a send this late against the pacing (the event loop's wake-up) does not delay the next

# Sharing a key. Each process takes its share of the key's use times the
# limit less a margin, plus a small step: the shares of all processes add up
# to the limit less the margin plus their steps, whatever their number.
MARGIN_SHARE = 0.03  # of the key's limit left unclaimed: others' requests in flight that no answer shows yet
MARGIN_ALONE = 0.01  # the margin is others' use, between this and MARGIN_SHARE: alone, nobody else has any in flight
SHARERS_PROVIDED_FOR = 8  # steps are the margin / this, and any process may take 1/this of the key:
#                           so many processes together stay under the limit and none is starved
MIN_REQUEST_STEP = 1.0  # requests move by whole requests
# Shards of one job know how many they are (shares alone keep whatever split
# processes start with: the first to start took 2-5x the others and finished
# early, leaving a dip): a shard grows from 1/N at most SHARD_GROWTH-fold a
# window, and one holding more than 1/N of a full key while others use it
# too gives back part of the excess.
SHARD_YIELD = 0.5  # of the excess over 1/N given back, on a key that is full
SHARD_YIELD_FROM = 0.9  # a key used to this share of its limit less the margin starts to count as full
SHARD_GROWTH = 2.0  # a shard over its 1/N at most doubles its use a window: the first to start does not take all
SHARD_OTHERS_MIN = 1 / 16  # others' use under this share of the key: counts that disagree, not someone waiting
# A key freed is a key used: while others' use of the key falls (one of them
# ended, and its requests age out of the window), a process paces at its cap
# plus its share of the room the key shows times this gain, not at its cap
# alone, which took a whole window to grow into what the other left (91% of
# the key's pace over two jobs of 4:1 rows in tests/test_limits.py's
# simulation, 95% with it, no 429s). The cap still bounds the window, so the
# room is taken as it frees; weighting by share keeps many processes that
# see a dip together from all rushing into it: the noise in their readings
# looks like a fall (eight processes on a key, 0.1-0.7% of requests refused
# at 6; gains of 8 and more, up to 1.8%).
PACE_ROOM_GAIN = 6.0
OTHERS_FALL = 0.03  # of the limit: others' use this far under its peak over the last window is falling
LOG_PRUNE_AT = 64  # sends kept before the log of sends is pruned
READING_LIFE_WINDOWS = 5  # a reading this old is dropped: the key may have changed hands since
ANSWERS_WITHOUT_READING = 3  # answers in a row without a reading: the provider stopped sending them
LATENCY_EWMA_ALPHA = 0.2  # weight of each answer in the recent latency that pacing allows for
TOKEN_SCALE_ALPHA = 0.1  # weight of each answer's usage in the provider's tokens per token we counted
TOKEN_SCALE_RANGE = (1e-3, 1e3)  # a usage further from our count than this is nonsense, not a scale


@dataclass(frozen=True)
class LimitReading:
    """One of a provider's limits as an answer stated it (`x-ratelimit-*-requests` or `-tokens`)."""

    limit: float  # per minute, for the whole key
    remaining: float  # left in the key's current window, everyone's use counted
    reset_s: float | None  # until the key's use is back to none


@dataclass(frozen=True)
class KeyReading:
    """What one answer said about the key's limits; a dimension it did not state is None."""

    requests: LimitReading | None = None
    tokens: LimitReading | None = None


class KeyShare:
    """One limit (requests or tokens) of a key, as this process may use it.

    Without readings from the provider: the job's figure, split evenly among
    `shards` (processes of one job each take 1/N). With them: the provider's
    limit (the job's figure when tighter), shared with whoever else uses the
    key. A reading says how much of the key's window is used (`limit -
    remaining`); this process knows how much of that was its own, so it takes
    that share of the limit less a margin, plus a step. Every process doing
    the same converges to the limit together without knowing of the others: a
    process that used more than its share sees its share shrink, and one that
    joins a busy key may take an eighth of it at once (what it then uses is
    its share). Shares alone keep whatever split processes started with;
    shards of one job know they are N: each grows from 1/N of the key at
    most doubling its use a window (the first to start would otherwise take
    all of it before its siblings' first answers), and one holding more
    than 1/N of a full key that others use gives part of the excess back,
    so shards end up even however they started. A reading showing no more
    use than this process's own (a key it has to itself, a bucket refilled)
    leaves it the whole limit, less a smaller margin. Readings
    are ordered by when their request was sent, so a late answer to an early
    request does not overwrite a fresher one. The reset times are not needed:
    shares are measured over the window itself.
    """

    def __init__(self, figure: float | None, shards: int = 1, *, min_step: float = 0.0,
                 window_s: float | None = None) -> None:
        if figure is not None and not figure >= 1:
            raise ValueError("a rate limit must be at least 1")
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.figure = figure
        self.static = None if figure is None else max(1.0, figure / shards)
        self._shards = shards
        self._min_step = min_step
        self._window_s = WINDOW_S if window_s is None else window_s
        self._seq = -1  # the request whose answer gave the current reading
        self._at = -math.inf
        self._limit = 0.0
        self._used = 0.0  # of the key's window, everyone's use, as last read
        self._others = 0.0  # ... and the part of it that is not this process's
        self._peaks: deque[tuple[float, float]] = deque()  # (at, others' use): its maximum over a window first
        self._unread = 0  # answers since the last reading that carried none
        self.share = 1.0  # of the key's use that is this process's, as last measured

    def observe(self, seq: int, reading: LimitReading, own: float, now: float) -> None:
        """`reading` came with the answer to request `seq`; `own` is this
        process's use of the window it describes (its requests up to `seq`)."""
        if seq <= self._seq:
            return  # older news than what we have
        self._seq, self._at = seq, now
        self._unread = 0
        self._limit = reading.limit
        used = reading.limit - reading.remaining
        self._used = used
        self._others = max(0.0, used - own)
        while self._peaks and self._peaks[-1][1] <= self._others:
            self._peaks.pop()
        self._peaks.append((now, self._others))
        while self._peaks[0][0] < now - self._window_s:
            self._peaks.popleft()
        self.share = 1.0 if own >= used else max(0.0, own) / used

    def unread(self) -> None:
        """An answer came without a reading of this limit."""
        self._unread += 1

    def live(self, now: float) -> bool:
        """The provider speaks for the key: its answers carry readings, the latest a recent one."""
        return self._unread < ANSWERS_WITHOUT_READING and now - self._at < READING_LIFE_WINDOWS * self._window_s

    def _limit_target(self) -> tuple[float, float]:
        """(the limit, the limit less the margin left for others' requests in flight)."""
        limit = self._limit if self.figure is None else min(self.figure, self._limit)
        return limit, limit - min(MARGIN_SHARE * limit, max(MARGIN_ALONE * limit, self._others))

    def cap(self, now: float) -> float | None:
        """How much of this limit this process may have in a window now (None: no limit)."""
        if not self.live(now):
            return self.static
        limit, target = self._limit_target()
        step = max(self._min_step, MARGIN_SHARE * limit / SHARERS_PROVIDED_FOR)
        cap = max(target / SHARERS_PROVIDED_FOR, self._shard_share(target) * target + step)
        if self._shards > 1:  # siblings may be starting too: grow from 1/N, not from all of it
            cap = min(cap, max(target / self._shards, SHARD_GROWTH * (self._used - self._others) + step))
        return min(cap, limit)  # a step of a whole request is not to take a key alone past its limit

    def pace(self, now: float) -> float | None:
        """How much of this limit to spread evenly over a window: the cap;
        while others' use is falling (one ended: its requests age out of the
        window as fast as it used to send them), the cap plus a multiple of
        this process's share of the room the key shows, so the room is taken
        as it frees, not a window later. At start-up others' use rises, and
        the cap alone paces."""
        cap = self.cap(now)
        if cap is None or not self.live(now):
            return cap
        limit, target = self._limit_target()
        if self._shards > 1 or not self._others_falling(limit):
            return cap
        return min(limit, cap + PACE_ROOM_GAIN * self.share * max(0.0, target - self._used))

    def _others_falling(self, limit: float) -> bool:
        """Others' use of the key is well under its peak over the last window:
        one of them ended or slowed, and its requests are ageing out. (Shards
        of one job even out by their own rule: the room one yields is a
        sibling's.)"""
        return self._shards == 1 and bool(self._peaks) and self._others < self._peaks[0][1] - OTHERS_FALL * limit

    def _shard_share(self, target: float) -> float:
        """The share to take of `target` (the limit less the margin): the
        measured one, less part of what a shard holds over its 1/N while the
        key is full and others use it. Where nobody takes what it gives back,
        the key is no longer full and the shard takes it again."""
        fair = 1.0 / self._shards
        if self._shards == 1 or self.share <= fair or self._others < SHARD_OTHERS_MIN * target:
            return self.share
        full = min(1.0, max(0.0, (self._used / target - SHARD_YIELD_FROM) / (1.0 - SHARD_YIELD_FROM)))
        return self.share - SHARD_YIELD * full * (self.share - fair)


class RateWindow:
    """This process's requests against one key's RPM and TPM.

    Its own requests are kept under the current figure (`KeyShare.cap`: the
    job's figures split among shards, or its share of the key while the
    provider states the key's limits) over any window, sending as soon as
    they allow, so a process alone runs at the limit, less one latency per
    window. While the provider states its limits, requests are also spread
    evenly over the window instead of bursting it: processes that share a key
    then never see room that the others have already taken. Its readings are
    in the provider's tokens, which ours (a byte bound where an exact count
    was not needed, or another tokenizer) are scaled to by the usage the
    provider reports on its answers.
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, *, shards: int = 1,
                 window_s: float | None = None) -> None:
        self._window_s = WINDOW_S if window_s is None else window_s
        self.requests = KeyShare(requests_per_minute, shards, min_step=MIN_REQUEST_STEP, window_s=self._window_s)
        self.tokens = KeyShare(tokens_per_minute, shards, window_s=self._window_s)
        self._done: deque[tuple[float, int]] = deque()  # (completed at, tokens), in completion order
        self._done_tokens = 0
        self._in_flight = 0
        self._in_flight_tokens = 0
        # Every send, by ticket - _log_base: (sent at, requests and tokens sent before it, its tokens)
        self._log: list[tuple[float, int, int, int]] = []
        self._log_base = 1
        self._sent_requests = 0
        self._sent_tokens = 0
        self._latency_s = 0.0  # recent time from send to answer (EWMA)
        # Per limit (by tokens or not): when the last send was due by the pacing, and when and after what
        # spacing the next one is, as last computed
        self._slots: dict[bool, float] = {}
        self._due: dict[bool, float] = {}
        self._held_by_pacing = False  # the last wait was the pacing's (not the window's)
        self.token_scale = 1.0  # the provider's tokens per token we counted, from reported usage (EWMA)

    def delay_s(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` may be sent (0: now)."""
        (window_r, paced_r), (window_t, paced_t) = (self._delay_s(self.requests, 1, now, by_tokens=False),
                                                    self._delay_s(self.tokens, tokens, now, by_tokens=True))
        wait = max(window_r, paced_r, window_t, paced_t)
        if wait > 0:  # what holds the request: a late wake-up is forgiven only where the pacing held it
            self._held_by_pacing = max(paced_r, paced_t) >= max(window_r, window_t)
        return wait

    def _delay_s(self, share: KeyShare, cost: int, now: float, *, by_tokens: bool) -> tuple[float, float]:
        """(the wait for room in the window, the wait for the pacing)."""
        cap = share.cap(now)
        if cap is None:
            return 0.0, 0.0
        live = share.live(now)
        scale = self.token_scale if by_tokens and live else 1.0  # to the units the cap is in
        self._expire(now)
        wait = 0.0
        if self._done or self._in_flight:  # a lone request always fits an empty window, even one over the limit
            in_window = (self._done_tokens + self._in_flight_tokens) if by_tokens else (len(self._done) + self._in_flight)
            over = in_window * scale + min(cost * scale, cap) - cap
            if over > 0:
                wait = self._age_out_s(over / scale, now, by_tokens=by_tokens)
        if live and self._log:
            # The provider speaks for a key others may share: this process's
            # share is spread evenly over the window (which holds a request
            # until it is answered) rather than sent in bursts, whose pattern
            # the window would repeat, and which others could not see coming.
            # Counted from when the last send was due, not when it went: a
            # wake-up a millisecond late each time lost 3% of a 24-a-second
            # share (tests/test_shared_key.py). Only a wake-up's lateness is
            # forgiven, not a wait for the window: no burst after one.
            sent_at, _, _, last_tokens = self._log[-1]
            pace = share.pace(now) or cap
            spacing = (self._window_s + SAFETY_S + self._latency_s) * (min(last_tokens * scale, pace) if by_tokens else 1) / pace
            due = self._slots.get(by_tokens, sent_at) + spacing
            self._due[by_tokens] = due
            return wait, max(0.0, due - now)
        return wait, 0.0

    def sent(self, tokens: int, now: float) -> int:
        """A request goes out now; returns its ticket for `answered`."""
        self._in_flight += 1
        self._in_flight_tokens += tokens
        self._log.append((now, self._sent_requests, self._sent_tokens, tokens))
        for by_tokens in (False, True):  # the pacing counts on from when this send was due
            due = self._due.pop(by_tokens, now)
            late = LATE_FORGIVEN_S if self._held_by_pacing else 0.0
            self._slots[by_tokens] = min(now, max(due, now - late))
        self._held_by_pacing = False
        self._sent_requests += 1
        self._sent_tokens += tokens
        self._prune_log(now)
        return self._log_base + len(self._log) - 1

    def answered(
        self, ticket: int, tokens: int, now: float, reading: KeyReading | None = None, usage: int | None = None
    ) -> None:
        """A request ended (success or failure: relays count both), with what
        its answer said about the key and the tokens it billed, if anything."""
        self._in_flight -= 1
        self._in_flight_tokens -= tokens
        self._done.append((now, tokens))
        self._done_tokens += tokens
        self._expire(now)  # here too: a provider without limits is never asked for a delay
        i = ticket - self._log_base
        if 0 <= i < len(self._log):
            self._latency_s += LATENCY_EWMA_ALPHA * (max(0.0, now - self._log[i][0]) - self._latency_s)
        if usage is not None and tokens > 0 and TOKEN_SCALE_RANGE[0] <= usage / tokens <= TOKEN_SCALE_RANGE[1]:
            self.token_scale += TOKEN_SCALE_ALPHA * (usage / tokens - self.token_scale)
        own = self._own_use(ticket)
        for share, limit, used in ((self.requests, reading and reading.requests, own and own[0]),
                                   (self.tokens, reading and reading.tokens, own and own[1] * self.token_scale)):
            if limit is None:
                share.unread()
            elif used is not None:  # else sent longer ago than any window: nothing current to learn
                share.observe(ticket, limit, used, now)

    def _own_use(self, ticket: int) -> tuple[int, int] | None:
        """(requests, tokens) this process sent in the window up to and including `ticket`."""
        i = ticket - self._log_base
        if not 0 <= i < len(self._log):
            return None
        sent_at, requests_before, tokens_before, tokens = self._log[i]
        first = bisect.bisect_right(self._log, sent_at - self._window_s, hi=i, key=lambda entry: entry[0])
        _, first_requests_before, first_tokens_before, _ = self._log[first]
        return requests_before + 1 - first_requests_before, tokens_before + tokens - first_tokens_before

    def _prune_log(self, now: float) -> None:
        """Forget sends older than two windows, half the log at a time (amortised O(1))."""
        half = len(self._log) // 2
        if len(self._log) >= LOG_PRUNE_AT and self._log[half][0] < now - 2 * self._window_s:
            del self._log[:half]
            self._log_base += half

    def _age_out_s(self, amount: float, now: float, *, by_tokens: bool) -> float:
        """Time until `amount` requests (or tokens) of the window have aged out."""
        freed = 0
        for done_at, tokens in self._done:
            freed += tokens if by_tokens else 1
            if freed >= amount:
                return max(0.0, done_at + self._window_s + SAFETY_S - now)
        return POLL_S  # the rest is still in flight: wait for answers

    def _expire(self, now: float) -> None:
        while self._done and self._done[0][0] + self._window_s + SAFETY_S <= now:
            self._done_tokens -= self._done.popleft()[1]


LATENCY_RISE_FACTOR = 2.0  # recent latency this many times what the size predicts: the provider is saturating
LATENCY_FAST_ALPHA = 0.3
LATENCY_SLOW_ALPHA = 0.03
LATENCY_MIN_SAMPLES = 20  # no latency judgement before this many answers
SIZE_SPREAD_MIN = 0.05  # request sizes varying less than this (coefficient of variation): judge latency alone
EXPECTED_FLOOR_SHARE = 0.1  # a predicted latency is never below this share of the usual one


class LatencyModel:
    """What a request of `size` (tokens) usually takes: latency = a + b * size,
    fitted by least squares over exponentially fading recent answers, so a
    server whose latency follows request size is not taken for a slow one."""

    def __init__(self, alpha: float = LATENCY_SLOW_ALPHA) -> None:
        self._alpha = alpha
        self._moments: tuple[float, float, float, float] | None = None  # E[x], E[y], E[x^2], E[xy]

    def add(self, size: float, latency_s: float) -> None:
        m = (size, latency_s, size * size, size * latency_s)
        old = self._moments
        self._moments = m if old is None else tuple(o + self._alpha * (n - o) for o, n in zip(old, m))  # type: ignore[assignment]

    def expected_s(self, size: float) -> float | None:
        if self._moments is None:
            return None
        mx, my, mxx, mxy = self._moments
        var = mxx - mx * mx
        slope = 0.0
        if var > (SIZE_SPREAD_MIN * mx) ** 2 and var > 0:
            slope = max(0.0, (mxy - mx * my) / var)
        return max(EXPECTED_FLOOR_SHARE * my, my + slope * (size - mx))


class AdaptiveConcurrency:
    """How many requests a provider gets at once: AIMD between 1 and its
    `max_concurrency`. A rate limit halves it, a latency spike trims it, and
    each answered request adds 1/limit (one per window of successes). Only
    successes raise it: fast error responses never speed anything up. A spike
    is latency well above what requests of that size usually take, so a
    bigger request is not one."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.limit = float(maximum)
        self._usual = LatencyModel()
        self._recent: float | None = None  # EWMA of latency / what its size predicts
        self._samples = 0
        self._since_trim = 0

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def on_success(self, latency_s: float, tokens: int = 0) -> None:
        if not latency_s >= 0:  # nan or negative: a clock glitch, not a signal
            return
        size = float(max(0, tokens))
        expected = self._usual.expected_s(size)
        self._usual.add(size, latency_s)
        ratio = 1.0 if not expected else latency_s / expected
        self._recent = ratio if self._recent is None else self._recent + LATENCY_FAST_ALPHA * (ratio - self._recent)
        self._samples += 1
        self._since_trim += 1
        rising = (
            self._samples >= LATENCY_MIN_SAMPLES
            and self._recent > LATENCY_RISE_FACTOR
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


HALF_OPEN_POLL_S = 0.05  # how often others look while one request probes a half-open circuit
CircuitState = Literal["closed", "open", "down"]


@dataclass(frozen=True)
class Permit:
    """Leave to send one request through a circuit."""

    opens: int  # how many times the circuit had opened when the request was sent
    probe: bool  # the one request a half-open circuit lets through


class Circuit:
    """A provider that fails `failures_to_open` answers in a row is opened:
    it rests, then one request probes it while the others wait. A good answer
    closes it; a failed probe opens it again for twice as long, and after
    `opens_to_give_up` rests in a row it is down for the run. Only failures
    of requests sent since it last opened count as failed probes: the rest of
    a burst in flight when it opened is more of the same outage."""

    def __init__(self, *, failures_to_open: int, first_rest_s: float, max_rest_s: float, opens_to_give_up: int) -> None:
        if failures_to_open < 1 or opens_to_give_up < 1:
            raise ValueError("failures_to_open and opens_to_give_up must be at least 1")
        self.failures_to_open = failures_to_open
        self.first_rest_s = max(0.0, first_rest_s)
        self.max_rest_s = max(0.0, max_rest_s)
        self.opens_to_give_up = opens_to_give_up
        self.failures_in_a_row = 0
        self.opens = 0  # times opened since the last good answer
        self.rest_until = 0.0
        self.probing = False

    def state(self) -> CircuitState:
        if self.opens >= self.opens_to_give_up:
            return "down"
        return "open" if self.opens else "closed"

    def available_at(self, now: float) -> float:
        """When a request may next be admitted (now or later)."""
        if self.opens and self.probing:
            return now + HALF_OPEN_POLL_S
        return max(now, self.rest_until)

    def admit(self, now: float) -> Permit | None:
        """Leave to send now, or None: resting, down, or another request is the probe."""
        if self.state() == "down" or now < self.rest_until or (self.opens and self.probing):
            return None
        probe = self.opens > 0
        self.probing = self.probing or probe
        return Permit(self.opens, probe)

    def release(self, permit: Permit) -> None:
        """The request ended, however: a probe's place is free again."""
        if permit.probe:
            self.probing = False

    def succeeded(self) -> bool:
        """A good answer; True when it closed an open circuit."""
        was_open = self.opens > 0
        self.failures_in_a_row = 0
        self.opens = 0
        self.rest_until = 0.0
        return was_open

    def failed(self, permit: Permit, now: float) -> float | None:
        """A failed answer (the provider's fault). Returns the rest when it opened the circuit."""
        self.failures_in_a_row += 1
        if self.opens > permit.opens or self.state() == "down":
            return None
        if not self.opens and self.failures_in_a_row < self.failures_to_open:
            return None
        rest = min(self.max_rest_s, self.first_rest_s * 2.0 ** min(self.opens, 30))
        self.opens += 1
        self.rest_until = max(self.rest_until, now + rest)
        return rest
