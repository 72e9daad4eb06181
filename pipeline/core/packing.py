"""Pure: token counts -> requests under the budgets.

OpenAI is reported to check a request's total with a byte estimate (about a
quarter token per UTF-8 byte) rather than tiktoken, so non-ASCII text that fits
by tiktoken can still be refused. Each request stays under both counts.

A count may be an upper bound rather than exact (a text's UTF-8 bytes: a
cl100k token is at least one byte). Packing by bounds never lets a request
over its budget; `tighten` replaces bounds by exact counts only where a bound
would end a request earlier than the exact count would.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

import numpy as np

TOKENS_PER_BYTE_ESTIMATE = 0.25


def _check_budgets(max_inputs: int, max_tokens: int) -> None:
    if not (1 <= max_inputs < math.inf and 1 <= max_tokens < math.inf):  # also refuses nan
        raise ValueError("max_inputs and max_tokens must be finite and at least 1")


def pack(
    tokens: Sequence[int],
    nbytes: Sequence[int],
    *,
    max_inputs: int,
    max_tokens: int,
) -> list[tuple[int, int]]:
    """Split inputs, in order, into [start, end) slices.

    Each slice holds at most `max_inputs` inputs, and at most `max_tokens` by
    both tiktoken and the byte estimate. An input over the budget on its own
    travels alone (the provider will judge it). Empty input gives no slice.
    """
    _check_budgets(max_inputs, max_tokens)
    if len(tokens) != len(nbytes):
        raise ValueError("tokens and nbytes differ in length")
    if isinstance(tokens, np.ndarray):  # Python ints: arithmetic on numpy scalars is 10x slower
        tokens = tokens.tolist()
    if isinstance(nbytes, np.ndarray):
        nbytes = nbytes.tolist()
    slices: list[tuple[int, int]] = []
    start = 0
    sum_tokens = 0
    sum_bytes = 0
    byte_budget = math.floor(max_tokens / TOKENS_PER_BYTE_ESTIMATE)
    for i, (t, b) in enumerate(zip(tokens, nbytes)):
        if t < 0 or b < 0:
            raise ValueError(f"input {i} has a negative size")
        full = (
            i - start >= max_inputs
            or sum_tokens + t > max_tokens
            or sum_bytes + b > byte_budget
        )
        if full and i > start:
            slices.append((start, i))
            start, sum_tokens, sum_bytes = i, 0, 0
        sum_tokens += t
        sum_bytes += b
    if start < len(tokens):
        slices.append((start, len(tokens)))
    return slices


def tighten(
    tokens: Sequence[int],
    exact: Sequence[bool],
    nbytes: Sequence[int],
    *,
    max_inputs: int,
    max_tokens: int,
    count: Callable[[list[int]], Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Counts to pack by that give the slices exact counts give, counting as
    few inputs as that takes.

    `tokens[i]` is input i's exact count where `exact[i]`, else an upper
    bound on it. Walking the inputs as `pack` does, a slice that would end
    because of a bound gets its uncounted inputs counted (`count(indices)`:
    their exact counts), largest bound first, until it fits or every count in
    it is exact, so every slice ends where exact counts end it. Returns the
    counts and which are exact (new arrays).
    """
    _check_budgets(max_inputs, max_tokens)
    if not len(tokens) == len(exact) == len(nbytes):
        raise ValueError("tokens, exact and nbytes differ in length")
    counts = np.asarray(tokens, dtype=np.int64).tolist()  # Python ints: numpy scalars are slow one at a time
    known = np.asarray(exact, dtype=bool).tolist()
    sizes = np.asarray(nbytes, dtype=np.int64).tolist()
    if min(counts, default=0) < 0 or min(sizes, default=0) < 0:
        raise ValueError("an input has a negative size")
    byte_budget = math.floor(max_tokens / TOKENS_PER_BYTE_ESTIMATE)
    start = sum_tokens = sum_bytes = 0
    uncounted: list[tuple[int, int]] = []  # heap of (-bound, input) in the current slice, the largest first
    for i in range(len(counts)):
        if i > start and (i - start >= max_inputs or sum_bytes + sizes[i] > byte_budget):
            start, sum_tokens, sum_bytes, uncounted = i, 0, 0, []  # ends whatever the tokens
        elif i > start and sum_tokens + counts[i] > max_tokens:
            if not known[i]:
                heapq.heappush(uncounted, (-counts[i], i))
            while uncounted and sum_tokens + counts[i] > max_tokens:
                _, j = heapq.heappop(uncounted)  # the largest bound: the most a count can take off
                exact_count = int(count([j])[0])
                if not 0 <= exact_count <= counts[j]:
                    raise ValueError(f"input {j}: exact count {exact_count} is not within its bound {counts[j]}")
                if j != i:  # i is not in the sum yet
                    sum_tokens -= counts[j] - exact_count
                counts[j], known[j] = exact_count, True
            if sum_tokens + counts[i] > max_tokens:  # every count in it exact: the slice ends here
                start, sum_tokens, sum_bytes, uncounted = i, 0, 0, []
            sum_tokens += counts[i]
            sum_bytes += sizes[i]
            continue
        sum_tokens += counts[i]
        sum_bytes += sizes[i]
        if not known[i]:
            heapq.heappush(uncounted, (-counts[i], i))
    return np.asarray(counts, dtype=np.int64), np.asarray(known, dtype=bool)
