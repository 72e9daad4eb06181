"""Pure: token counts -> requests under the budgets.

OpenAI is reported to check a request's total with a byte estimate (about a
quarter token per UTF-8 byte) rather than tiktoken, so non-ASCII text that fits
by tiktoken can still be refused. Each request stays under both counts.
"""
from __future__ import annotations

import math
from typing import Sequence

TOKENS_PER_BYTE_ESTIMATE = 0.25


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
    if not (1 <= max_inputs < math.inf and 1 <= max_tokens < math.inf):  # also refuses nan
        raise ValueError("max_inputs and max_tokens must be finite and at least 1")
    if len(tokens) != len(nbytes):
        raise ValueError("tokens and nbytes differ in length")
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
