"""Failure classification, Retry-After parsing and retry delays: the pure policies
that decide whether a failed request is retried, slowed down, or ends a provider."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random

import aiohttp
import pytest
from multidict import CIMultiDict

from pipeline.config.job import RetryConfig
from pipeline.core.retry import MAX_RETRY_AFTER_S, backoff_s, retry_delay_s
from pipeline.errors import (
    BadInputError,
    BadResponseError,
    ProviderError,
    ProviderUnusableError,
    RateLimitedError,
    TransientError,
)
from pipeline.providers.classify import classify, retry_after_seconds

NOW_S = 1_700_000_000.0  # a fixed "now" so HTTP dates are deterministic
KIND_CLASS = {
    "unusable": ProviderUnusableError,
    "rate_limited": RateLimitedError,
    "transient": TransientError,
    "bad_input": BadInputError,
    "bad_response": BadResponseError,
}


def err_body(message: str, code: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# Bodies quoted from the provider documents in /work/shared/seeds/ (002, 003)
# and from the OpenAI API and one-api/new-api relays.
NO_KEY = err_body(
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)",
    "invalid_api_key",
    "talk_api_error",
)
WRONG_KEY = err_body(
    "Incorrect API key provided: sk-1afsp*****************************************k5R2. You can find your "
    "API key at https://vip.gptchatclub.com/api.",
    "invalid_api_key",
    "invalid_request_error",
)
BAD_MODEL = err_body("Unsupported model.", "invalid_model", "talk_api_error")
NO_MODEL = err_body(
    "The model `text-embedding-4` does not exist or you do not have access to it.",
    "model_not_found",
    "invalid_request_error",
)
NO_QUOTA = err_body("User quota is not enough.", "insufficient_user_quota", "talk_api_error")
OPENAI_NO_QUOTA = err_body(
    "You exceeded your current quota, please check your plan and billing details.",
    "insufficient_quota",
    "insufficient_quota",
)
ONE_API_TOKEN_SPENT = err_body("该令牌额度已用尽 (request id: 20240101000000000000000)", None, "one_api_error")
INTERNAL = err_body("Internal server error.", "internal_error", "talk_api_error")
CTYUN_INVOKE = {"error": {"code": "500001", "type": "INVOKE_MODEL_ERROR", "message": "服务接口异常,请联系管理员"}}
UPSTREAM_SATURATED = err_body("当前分组上游负载已饱和，请稍后再试", None, "new_api_error")
REQUEST_LIMIT = err_body("您已达到请求数限制：1分钟内最多请求60次", None, "new_api_error")
OPENAI_RATE = err_body(
    "Rate limit reached for text-embedding-3-small on requests per min (RPM): Limit 3000, Used 3000.",
    "rate_limit_exceeded",
    "requests",
)
TOO_LONG = err_body(
    "This model's maximum context length is 8192 tokens, however you requested 9120 tokens "
    "(9120 in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
    None,
    "invalid_request_error",
)
EMPTY_INPUT = err_body("'$.input' is invalid. Please check the API reference.", None, "invalid_request_error")
DIMENSIONS_UNSUPPORTED = err_body(
    "This model does not support specifying dimensions.", None, "invalid_request_error"
)
DIMENSIONS_TOO_BIG = err_body(
    "Invalid value for 'dimensions' = 4096. Must be less than or equal to 3072.", None, "invalid_request_error"
)
# Relays that number their errors (zhipu-style "1214": a parameter is wrong) under HTTP 400.
NUMERIC_TOO_LONG = {"error": {"code": "1214", "message": "input length exceeds the limit of 8192 tokens"}}
NGINX_502 = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>"

CLASSIFY_TABLE = [
    # id, status, body, headers, expected kind, expected retry_after_s
    ("401 no key", 401, NO_KEY, None, "unusable", None),
    ("401 wrong key", 401, WRONG_KEY, None, "unusable", None),
    ("200 with invalid_api_key body", 200, WRONG_KEY, None, "unusable", None),
    ("401 without body", 401, None, None, "unusable", None),
    ("403 without body", 403, None, None, "unusable", None),
    ("400 invalid_model", 400, BAD_MODEL, None, "unusable", None),
    ("200 invalid_model", 200, BAD_MODEL, None, "unusable", None),
    ("404 model_not_found", 404, NO_MODEL, None, "unusable", None),
    ("404 without body: wrong base_url", 404, None, None, "unusable", None),
    ("403 insufficient_user_quota", 403, NO_QUOTA, None, "unusable", None),
    ("200 insufficient_user_quota", 200, NO_QUOTA, None, "unusable", None),
    ("429 insufficient_quota is a spent quota, not a rate limit", 429, OPENAI_NO_QUOTA, None, "unusable", None),
    ("one-api 401 token quota spent", 401, ONE_API_TOKEN_SPENT, None, "unusable", None),
    ("one-api 403 token quota spent", 403, ONE_API_TOKEN_SPENT, None, "unusable", None),
    ("429 without Retry-After", 429, OPENAI_RATE, None, "rate_limited", None),
    ("429 with Retry-After seconds", 429, OPENAI_RATE, {"Retry-After": "20"}, "rate_limited", 20.0),
    ("429 with retry-after-ms", 429, OPENAI_RATE, {"retry-after-ms": "1500"}, "rate_limited", 1.5),
    (
        "429 with Retry-After HTTP date 30 s ahead",
        429,
        OPENAI_RATE,
        {"Retry-After": email.utils.formatdate(NOW_S + 30, usegmt=True)},
        "rate_limited",
        30.0,
    ),
    ("429 without body", 429, None, None, "rate_limited", None),
    ("new-api upstream saturated under 429", 429, UPSTREAM_SATURATED, None, "rate_limited", None),
    ("new-api upstream saturated under 500", 500, UPSTREAM_SATURATED, None, "rate_limited", None),
    ("new-api upstream saturated under 503", 503, UPSTREAM_SATURATED, None, "rate_limited", None),
    ("request-count limit under 429", 429, REQUEST_LIMIT, None, "rate_limited", None),
    ("request-count limit under 403", 403, REQUEST_LIMIT, None, "rate_limited", None),
    ("request-count limit under 200", 200, REQUEST_LIMIT, None, "rate_limited", None),
    ("500 without body", 500, None, None, "transient", None),
    ("502 nginx page", 502, NGINX_502, None, "transient", None),
    ("503 with Retry-After", 503, None, {"Retry-After": "7"}, "transient", 7.0),
    ("500 internal_error", 500, INTERNAL, None, "transient", None),
    ("200 with internal_error body", 200, INTERNAL, None, "transient", None),
    ("ctyun 500001 INVOKE_MODEL_ERROR under 200", 200, CTYUN_INVOKE, None, "transient", None),
    ("ctyun 500001 INVOKE_MODEL_ERROR under 500", 500, CTYUN_INVOKE, None, "transient", None),
    ("408 request timeout", 408, None, None, "transient", None),
    ("400 input too long", 400, TOO_LONG, None, "bad_input", None),
    ("400 empty input", 400, EMPTY_INPUT, None, "bad_input", None),
    ("413 payload too large", 413, None, None, "bad_input", None),
    ("400 input too long with a numeric relay code", 400, NUMERIC_TOO_LONG, None, "bad_input", None),
    ("400 with ctyun INVOKE_MODEL_ERROR is still the model failing", 400, CTYUN_INVOKE, None, "transient", None),
    ("400 dimensions not supported", 400, DIMENSIONS_UNSUPPORTED, None, "unusable", None),
    ("400 dimensions too big", 400, DIMENSIONS_TOO_BIG, None, "unusable", None),
]


@pytest.mark.parametrize(
    "status, body, headers, kind, retry_after",
    [row[1:] for row in CLASSIFY_TABLE],
    ids=[row[0] for row in CLASSIFY_TABLE],
)
def test_classify_maps_status_and_error_body_to_the_failure_kind(status, body, headers, kind, retry_after):
    err = classify(provider="relay-a", status=status, body=body, headers=headers, now_s=NOW_S)
    assert err.kind == kind
    assert isinstance(err, KIND_CLASS[kind])
    assert err.provider == "relay-a"
    assert err.status == status
    if retry_after is None:
        assert err.retry_after_s is None
    else:
        assert err.retry_after_s == pytest.approx(retry_after)


@pytest.mark.parametrize(
    "body, code",
    [
        pytest.param(WRONG_KEY, "invalid_api_key", id="word code"),
        pytest.param(CTYUN_INVOKE, "500001", id="numeric code in a string"),
        pytest.param({"error": {"message": "x", "code": 500001}}, "500001", id="numeric code as a number"),
        pytest.param(TOO_LONG, None, id="null code"),
    ],
)
def test_classify_keeps_the_provider_error_code_for_the_rejects_file(body, code):
    err = classify(provider="p", status=400, body=body)
    assert err.code == code


EXCEPTION_TABLE = [
    ("asyncio timeout", asyncio.TimeoutError(), "transient"),
    ("builtin timeout", TimeoutError(), "transient"),
    ("aiohttp server timeout", aiohttp.ServerTimeoutError("read timed out"), "transient"),
    ("aiohttp connection error", aiohttp.ClientConnectionError("connect failed"), "transient"),
    ("server disconnected", aiohttp.ServerDisconnectedError(), "transient"),
    ("connection reset", ConnectionResetError(104, "Connection reset by peer"), "transient"),
    ("payload error", aiohttp.ClientPayloadError("Response payload is not completed"), "transient"),
    ("json decode error", json.JSONDecodeError("Expecting value", "<html>oops</html>", 0), "bad_response"),
    ("unicode decode error", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "bad_response"),
]


@pytest.mark.parametrize("exc, kind", [row[1:] for row in EXCEPTION_TABLE], ids=[row[0] for row in EXCEPTION_TABLE])
def test_classify_maps_network_and_parse_exceptions_to_the_failure_kind(exc, kind):
    err = classify(provider="relay-b", exc=exc)
    assert err.kind == kind
    assert isinstance(err, KIND_CLASS[kind])
    assert err.provider == "relay-b"
    assert err.status is None


def test_classify_returns_an_already_classified_error_unchanged():
    original = BadInputError("rejected", provider="p", status=400)
    assert classify(provider="other", exc=original) is original


def test_error_message_is_the_providers_message_and_str_names_provider_status_and_code():
    err = classify(provider="relay-a", status=401, body=WRONG_KEY)
    assert err.message == WRONG_KEY["error"]["message"]
    text = str(err)
    assert text.startswith("relay-a: ")
    assert "401" in text
    assert "invalid_api_key" in text
    assert WRONG_KEY["error"]["message"] in text


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(err_body("upstream exploded: " + "x" * 5000, "internal_error"), id="long JSON message"),
        pytest.param("<html>\n" + "<p>Service Unavailable</p>\n" * 400 + "</html>", id="long HTML page"),
        pytest.param(err_body("第一行\n第二行\t" + "错" * 1000), id="long multi-line CJK message"),
    ],
)
def test_long_provider_messages_are_shortened_to_one_line_of_at_most_200_chars(body):
    err = classify(provider="p", status=503, body=body)
    assert len(err.message) <= 200
    assert "\n" not in err.message and "\r" not in err.message
    # What is kept is the start of the provider's own words (whitespace collapsed).
    source = body["error"]["message"] if isinstance(body, dict) else body
    collapsed = " ".join(source.split())
    assert collapsed.startswith(err.message.rstrip("…"))
    assert len(err.message.rstrip("…")) >= 150


# ---------------------------------------------------------------------------
# retry_after_seconds

RETRY_AFTER_TABLE = [
    # id, headers, expected seconds (None: no usable hint)
    ("no headers", {}, None),
    ("whole seconds", {"Retry-After": "20"}, 20.0),
    ("zero", {"Retry-After": "0"}, 0.0),
    ("fractional seconds", {"Retry-After": "1.5"}, 1.5),
    ("padded with spaces", {"Retry-After": "  7 "}, 7.0),
    ("huge seconds are returned (the caller caps them)", {"Retry-After": "86400000"}, 86_400_000.0),
    ("retry-after-ms", {"retry-after-ms": "250"}, 0.25),
    ("retry-after-ms wins over Retry-After", {"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
    ("garbage retry-after-ms falls back to Retry-After", {"retry-after-ms": "soon", "Retry-After": "3"}, 3.0),
    ("HTTP date 90 s ahead", {"Retry-After": email.utils.formatdate(NOW_S + 90, usegmt=True)}, 90.0),
    ("HTTP date in the past means now", {"Retry-After": email.utils.formatdate(NOW_S - 3600, usegmt=True)}, 0.0),
    ("HTTP date in the IMF-fixdate example form", {"Retry-After": "Tue, 14 Nov 2023 22:14:20 GMT"}, 1_700_000_060 - NOW_S),
    ("garbage", {"Retry-After": "later, maybe"}, None),
    ("empty string", {"Retry-After": ""}, None),
    ("impossible date", {"Retry-After": "Wed, 99 Foo 2024 25:61:61 GMT"}, None),
    ("inf", {"Retry-After": "inf"}, None),
    ("-inf", {"Retry-After": "-inf"}, None),
    ("nan", {"Retry-After": "nan"}, None),
    ("overflowing number", {"Retry-After": "1e400"}, None),
    ("retry-after-ms inf", {"retry-after-ms": "inf"}, None),
    ("retry-after-ms nan", {"retry-after-ms": "NaN"}, None),
    ("reset requests 6m0s", {"x-ratelimit-reset-requests": "6m0s"}, 6 * 60.0),
    ("reset requests 20ms", {"x-ratelimit-reset-requests": "20ms"}, 0.020),
    ("reset requests 1s", {"x-ratelimit-reset-requests": "1s"}, 1.0),
    ("reset requests 1h2m3.5s", {"x-ratelimit-reset-requests": "1h2m3.5s"}, 3600 + 120 + 3.5),
    ("reset tokens plain number", {"x-ratelimit-reset-tokens": "2"}, 2.0),
    ("the later of both resets", {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ("reset garbage", {"x-ratelimit-reset-requests": "soonish"}, None),
    ("reset with trailing garbage", {"x-ratelimit-reset-requests": "6m0sx"}, None),
    ("reset inf", {"x-ratelimit-reset-requests": "inf"}, None),
    ("reset empty", {"x-ratelimit-reset-requests": ""}, None),
    ("Retry-After wins over resets", {"Retry-After": "2", "x-ratelimit-reset-requests": "6m0s"}, 2.0),
    ("upper-case name", {"RETRY-AFTER": "4"}, 4.0),
    ("mixed-case ms name", {"Retry-After-Ms": "500"}, 0.5),
    ("mixed-case reset name", {"X-RateLimit-Reset-Tokens": "2s"}, 2.0),
    ("aiohttp CIMultiDict headers", CIMultiDict({"Retry-After": "5"}), 5.0),
]


@pytest.mark.parametrize(
    "headers, expected", [row[1:] for row in RETRY_AFTER_TABLE], ids=[row[0] for row in RETRY_AFTER_TABLE]
)
def test_retry_after_seconds_reads_every_header_form(headers, expected):
    got = retry_after_seconds(headers, now_s=NOW_S)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Retry-After": "-5"}, id="negative seconds"),
        pytest.param({"retry-after-ms": "-100"}, id="negative ms"),
        pytest.param({"Retry-After": "-0.001"}, id="tiny negative"),
    ],
)
def test_negative_retry_after_never_asks_for_a_negative_wait(headers):
    got = retry_after_seconds(headers, now_s=NOW_S)
    assert got is None or got == 0.0


def test_retry_after_http_date_is_measured_from_the_clock_when_no_now_is_given():
    import time

    date = email.utils.formatdate(time.time() + 3600, usegmt=True)
    got = retry_after_seconds({"Retry-After": date})
    assert got is not None and 3590 <= got <= 3600


# ---------------------------------------------------------------------------
# backoff_s / retry_delay_s

BACKOFF_CEILING_TABLE = [
    # id, attempt, initial_s, cap_s, expected ceiling (initial * 2**(attempt-1), capped)
    ("first retry", 1, 0.5, 60.0, 0.5),
    ("second retry doubles", 2, 0.5, 60.0, 1.0),
    ("fifth retry", 5, 0.5, 60.0, 8.0),
    ("capped", 8, 0.5, 60.0, 60.0),  # 0.5 * 128 = 64 > 60
    ("exactly at the cap", 7, 0.5, 32.0, 32.0),
    ("huge attempt does not overflow", 10**9, 0.5, 60.0, 60.0),
    ("astronomic attempt does not overflow", 10**30, 0.5, 60.0, 60.0),
    ("cap below initial", 1, 5.0, 1.0, 1.0),
]


@pytest.mark.parametrize(
    "attempt, initial_s, cap_s, ceiling",
    [row[1:] for row in BACKOFF_CEILING_TABLE],
    ids=[row[0] for row in BACKOFF_CEILING_TABLE],
)
def test_backoff_is_full_jitter_between_zero_and_the_capped_exponential_ceiling(attempt, initial_s, cap_s, ceiling):
    assert backoff_s(attempt, initial_s, cap_s, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert backoff_s(attempt, initial_s, cap_s, rand=lambda: 0.0) == 0.0
    assert backoff_s(attempt, initial_s, cap_s, rand=lambda: 0.25) == pytest.approx(ceiling / 4)
    rng = random.Random(attempt)
    for _ in range(200):
        delay = backoff_s(attempt, initial_s, cap_s, rand=rng.random)
        assert 0.0 <= delay <= ceiling
        assert math.isfinite(delay)


@pytest.mark.parametrize(
    "attempt, initial_s, cap_s",
    [
        pytest.param(0, 0.5, 60.0, id="attempt 0"),
        pytest.param(-1, 0.5, 60.0, id="attempt -1"),
        pytest.param(-(10**9), 0.5, 60.0, id="attempt hugely negative"),
        pytest.param(3, 0.0, 60.0, id="initial 0"),
        pytest.param(3, -1.0, 60.0, id="initial negative"),
        pytest.param(3, 0.5, 0.0, id="cap 0"),
    ],
)
def test_backoff_is_zero_without_a_retry_or_without_a_budget(attempt, initial_s, cap_s):
    assert backoff_s(attempt, initial_s, cap_s, rand=lambda: 1.0) == 0.0


RETRY = RetryConfig(max_attempts=6, initial_backoff_s=0.5, max_backoff_s=60.0)

RETRY_DELAY_TABLE = [
    # id, attempt, retry_after_s, rand, expected delay
    ("no hint: plain backoff ceiling", 3, None, 1.0, 2.0),
    ("no hint: jitter down to zero", 3, None, 0.0, 0.0),
    ("hint longer than the backoff is honoured", 1, 30.0, 1.0, 30.0),
    ("hint honoured even when jitter draws zero", 4, 5.0, 0.0, 5.0),
    ("hint shorter than the backoff: backoff wins", 5, 0.1, 1.0, 8.0),
    ("hint of zero: backoff", 2, 0.0, 1.0, 1.0),
    ("hint beyond the cap is capped", 1, MAX_RETRY_AFTER_S * 10, 1.0, MAX_RETRY_AFTER_S),
    ("infinite hint is capped", 1, math.inf, 0.0, MAX_RETRY_AFTER_S),
    ("hint exactly at the cap", 1, MAX_RETRY_AFTER_S, 0.0, MAX_RETRY_AFTER_S),
]


@pytest.mark.parametrize(
    "attempt, retry_after, rand_value, expected",
    [row[1:] for row in RETRY_DELAY_TABLE],
    ids=[row[0] for row in RETRY_DELAY_TABLE],
)
def test_retry_delay_honours_retry_after_up_to_the_cap(attempt, retry_after, rand_value, expected):
    err = RateLimitedError("slow down", provider="p", status=429, retry_after_s=retry_after)
    assert retry_delay_s(attempt, err, RETRY, rand=lambda: rand_value) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [1, 6, 100, 10**9])
def test_a_huge_retry_after_waits_exactly_the_cap_whatever_the_attempt(attempt):
    assert RETRY.max_backoff_s < MAX_RETRY_AFTER_S  # so the capped hint, not the backoff, decides
    err = TransientError("busy", provider="p", status=503, retry_after_s=10**12)
    assert retry_delay_s(attempt, err, RETRY, rand=lambda: 1.0) == MAX_RETRY_AFTER_S
    assert retry_delay_s(attempt, err, RETRY, rand=lambda: 0.0) == MAX_RETRY_AFTER_S


def test_a_retry_after_header_flows_from_classify_into_the_delay():
    err = classify(provider="p", status=429, body=OPENAI_RATE, headers={"Retry-After": "45"})
    assert isinstance(err, ProviderError)
    assert retry_delay_s(1, err, RETRY, rand=lambda: 0.0) == pytest.approx(45.0)


def test_reset_headers_bound_a_rate_limit_wait_but_never_a_server_error_backoff():
    headers = {"x-ratelimit-reset-requests": "6m0s"}
    assert classify(provider="p", status=500, body={"error": {"code": "internal_error"}}, headers=headers).retry_after_s is None
    assert classify(provider="p", status=429, body={"error": {"code": "rate_limit_exceeded"}}, headers=headers).retry_after_s == 360.0
    assert classify(provider="p", status=503, headers={"Retry-After": "7"}).retry_after_s == 7.0
