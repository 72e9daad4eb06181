"""The one function that turns an HTTP status, an error body and/or an
exception into a class of the exception tree (errors.py), and the readers of
the headers that come with an answer (Retry-After, x-ratelimit-*).

Retry, routing and reporting all read the class returned by `classify`; nothing
else in the code inspects HTTP statuses or error codes.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from typing import Mapping

import aiohttp

from ..core.limits import KeyReading, LimitReading
from ..errors import (
    BadInputError,
    BadResponseError,
    EndpointMissingError,
    ProviderError,
    ProviderUnusableError,
    RateLimitedError,
    TooManyInputsError,
    TransientError,
)

MAX_ERROR_TEXT_CHARS = 200  # provider messages are quoted, not dumped

UNUSABLE_CODES = frozenset(
    {
        "invalid_api_key",
        "invalid_model",
        "model_not_found",
        "insufficient_user_quota",
        "insufficient_quota",
        "account_deactivated",
        "billing_not_active",
        "permission_denied",
        "unsupported_model",
    }
)
# token_limit_exceeded: a batch refused because the org's batch queue for the model is full
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error", "too_many_requests", "token_limit_exceeded"})
TRANSIENT_CODES = frozenset({"internal_error", "server_error", "service_unavailable", "timeout"})
TRANSIENT_TYPES = frozenset({"INVOKE_MODEL_ERROR", "server_error", "internal_error"})
# Relays (one-api/new-api and others) word rate limits and spent quotas in
# Chinese, sometimes under a status that says otherwise.
RATE_LIMIT_PATTERN = re.compile(
    r"负载已饱和|请求数限制|请求过于频繁|频率|rate.?limit|too many requests", re.IGNORECASE
)
DIMENSIONS_PATTERN = re.compile(r"dimensions", re.IGNORECASE)
# A request with more inputs than the provider takes, in the words providers use:
# Gemini "at most 100 requests can be in one batch", Cohere "total number of texts
# must be at most 96", TEI "batch size 100 > maximum allowed batch size 32",
# OpenAI "array too long ... maximum length 2048", and plain "too many inputs".
TOO_MANY_INPUTS_PATTERN = re.compile(
    r"at most (?P<a>\d+) (?:requests|inputs|texts|items|documents)"
    r"|number of (?:texts|inputs|documents)[^.]{0,40}?at most (?P<b>\d+)"
    r"|maximum allowed batch size (?P<c>\d+)"
    r"|array too long.{0,40}?maximum length (?P<d>\d+)"
    r"|maximum (?P<f>\d+) inputs"
    r"|too many (?:inputs|texts|items|documents)(?:[^.\d]{0,40}(?P<e>\d+))?",
    re.IGNORECASE,
)
# The 404 of an Azure route that does not exist: a wrong deployment, api-version or resource.
MISSING_ENDPOINT_CODES = frozenset({"", "not_found", "404", "deploymentnotfound", "resourcenotfound"})
ENDPOINT_HINT = "check base_url, and for Azure the deployment in it and query: {api-version: ...}"
QUOTA_PATTERN = re.compile(
    r"额度已用尽|额度不足|余额不足|欠费|quota|insufficient.{0,20}balance|billing", re.IGNORECASE
)


def classify(
    *,
    provider: str,
    status: int | None = None,
    body: object = None,
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
    now_s: float | None = None,
) -> ProviderError:
    """Turn an HTTP status, an error body and/or an exception into a ProviderError.

    `body` is the parsed JSON (or raw text) of a response that carried an
    error; `exc` is an exception raised while sending or reading.
    """
    if exc is not None:
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return TransientError("request timed out", provider=provider)
        if isinstance(exc, (aiohttp.ClientError, ConnectionError, OSError)):
            detail = type(exc).__name__
            return TransientError(f"connection failed ({detail})", provider=provider)
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError, ValueError)):
            return BadResponseError(f"unreadable response ({exc})"[:MAX_ERROR_TEXT_CHARS], provider=provider)
        return TransientError(f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT_CHARS], provider=provider)

    message, code, err_type = _error_fields(body)
    # OpenAI sends x-ratelimit-reset-* on every answer: they bound a rate-limit
    # wait, never a 5xx backoff.
    retry_after = retry_after_seconds(headers or {}, now_s=now_s, with_reset=False)
    rate_limit_wait = retry_after_seconds(headers or {}, now_s=now_s)
    fields = dict(provider=provider, status=status, code=code)
    text = f"{message} {code or ''} {err_type or ''}"
    code_l = (code or "").lower()

    if code_l in UNUSABLE_CODES or (status in (401, 402, 403) and not RATE_LIMIT_PATTERN.search(text)):
        return ProviderUnusableError(message or "unauthorized", **fields)
    if QUOTA_PATTERN.search(text) and status != 429 and code_l not in RATE_LIMIT_CODES:
        return ProviderUnusableError(message, **fields)
    if status == 429 or code_l in RATE_LIMIT_CODES or RATE_LIMIT_PATTERN.search(text):
        return RateLimitedError(message or "rate limited", retry_after_s=rate_limit_wait, **fields)
    if status == 404 and code_l in MISSING_ENDPOINT_CODES:
        return EndpointMissingError(f"{message or 'endpoint not found'} ({ENDPOINT_HINT})", **fields)
    if status is not None and status >= 500:
        return TransientError(message or f"server error {status}", retry_after_s=retry_after, **fields)
    numbered_failure = code_l.isdigit() and status not in (400, 413, 422)  # under 400 a number is the rows' fault
    if code_l in TRANSIENT_CODES or (err_type or "") in TRANSIENT_TYPES or numbered_failure:
        # Numeric codes ("500001") are ctyun's model-invocation failures.
        return TransientError(message or "provider error", retry_after_s=retry_after, **fields)
    if status in (400, 413, 422) and (cap := TOO_MANY_INPUTS_PATTERN.search(message)):
        # Not the rows' fault: the same rows in smaller requests go through.
        stated = next((int(v) for v in cap.groupdict().values() if v), None)
        return TooManyInputsError(message, max_inputs=stated if stated else None, **fields)
    if status in (400, 422) and DIMENSIONS_PATTERN.search(message):
        # Not the rows' fault: every request would fail the same way.
        return ProviderUnusableError(message, **fields)
    if status in (400, 413, 422):
        return BadInputError(message or "request rejected", **fields)
    if status == 408:
        return TransientError(message or "request timeout", **fields)
    return TransientError(message or f"unexpected answer (HTTP {status})", **fields)


def _error_fields(body: object) -> tuple[str, str | None, str | None]:
    """(message, code, type) from an OpenAI-style error body, or from raw text."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], Mapping):
        body = body[0]  # Gemini's OpenAI-compatible endpoint wraps its error in a list
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            code = err.get("code")
            return (
                _short(str(err.get("message") or "")),
                None if code is None else str(code),
                None if err.get("type") is None else str(err.get("type")),
            )
        return _short(str(err)), None, None
    if body is None:
        return "", None, None
    return _short(str(body)), None, None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT_CHARS else text[: MAX_ERROR_TEXT_CHARS - 1] + "…"


def retry_after_seconds(
    headers: Mapping[str, str], *, now_s: float | None = None, with_reset: bool = True
) -> float | None:
    """Seconds to wait from `retry-after-ms`, `Retry-After` (seconds or HTTP date)
    or `x-ratelimit-reset-requests/tokens` ("1s", "6m0s", "20ms"); None if absent."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = _finite_float(lower.get("retry-after-ms"))
    if ms is not None:
        return max(0.0, ms / 1000.0)
    raw = lower.get("retry-after")
    if raw is not None:
        secs = _finite_float(raw)
        if secs is None:
            try:
                when = email.utils.parsedate_to_datetime(raw).timestamp()
                secs = when - (time.time() if now_s is None else now_s)
            except (TypeError, ValueError, IndexError, OverflowError):
                secs = None
        if secs is not None:
            return max(0.0, secs)
    if not with_reset:
        return None
    resets = [_duration_seconds(lower.get(k)) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    known = [r for r in resets if r is not None]
    return max(0.0, max(known)) if known else None


def _finite_float(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration_seconds(raw: str | None) -> float | None:
    """OpenAI's reset headers look like "1s", "6m0s", "20ms"."""
    if not raw:
        return None
    raw = raw.strip()
    plain = _finite_float(raw)
    if plain is not None:
        return plain
    parts = DURATION_PART.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        return None
    return sum(float(n) * DURATION_UNIT_S[u] for n, u in parts)


def key_reading(headers: Mapping[str, str]) -> KeyReading | None:
    """The key's limits from `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`;
    None when an answer states neither. A dimension whose figures are missing
    or make no sense (a limit under 1, remaining below 0 or above the limit)
    is left out rather than guessed."""
    lower = {k.lower(): v for k, v in headers.items()}
    requests = _limit_reading(lower, "requests")
    tokens = _limit_reading(lower, "tokens")
    return None if requests is None and tokens is None else KeyReading(requests, tokens)


def _limit_reading(lower: Mapping[str, str], dimension: str) -> LimitReading | None:
    limit = _finite_float(lower.get(f"x-ratelimit-limit-{dimension}"))
    remaining = _finite_float(lower.get(f"x-ratelimit-remaining-{dimension}"))
    if limit is None or remaining is None or not (limit >= 1 and 0 <= remaining <= limit):
        return None
    reset = _duration_seconds(lower.get(f"x-ratelimit-reset-{dimension}"))
    return LimitReading(limit, remaining, reset if reset is not None and reset >= 0 else None)
