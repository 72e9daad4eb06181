"""Pure: how long to wait before a request's next attempt."""
from __future__ import annotations

import random
from typing import Callable

from ..config.job import RetryConfig
from ..errors import ProviderError

MAX_RETRY_AFTER_S = 120.0  # beyond this, fail over or give up instead of sleeping


def backoff_s(attempt: int, initial_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th retry (1-based)."""
    if attempt < 1 or initial_s <= 0 or cap_s <= 0:
        return 0.0
    ceiling = min(cap_s, initial_s * 2.0 ** min(attempt - 1, 60))
    return ceiling * rand()


def retry_delay_s(
    attempt: int, err: ProviderError, retry: RetryConfig, rand: Callable[[], float] = random.random
) -> float:
    """Backoff, but never shorter than what the provider asked for (up to a cap)."""
    delay = backoff_s(attempt, retry.initial_backoff_s, retry.max_backoff_s, rand)
    if err.retry_after_s is not None:
        delay = max(delay, min(err.retry_after_s, MAX_RETRY_AFTER_S))
    return delay
