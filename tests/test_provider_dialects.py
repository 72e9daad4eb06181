"""Every provider a data team uses, one request at a time against loopback
servers speaking its dialect: Azure OpenAI's deployment route, `api-version`
and `api-key` header; a gateway's own headers; asymmetric models' body fields
(`input_type`); Gemini's and Cohere's input caps; Ollama's floats and ignored
`dimensions`; TEI's bare 429. Exact vectors in each case."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider, salted, vector_for
from pipeline.config.job import ProviderConfig, RetryConfig
from pipeline.errors import (BadInputError, EndpointMissingError, ProviderUnusableError,
                             RateLimitedError, TooManyInputsError)
from pipeline.providers.batch_api import BatchClient
from pipeline.providers.classify import classify
from pipeline.providers.openai import OpenAIProvider
from test_openai_provider import embed_error, embed_texts, with_provider as run_provider

MODEL = "text-embedding-3-small"
TEXTS = ["alpha", "beta gamma", "世界 delta 🙂", "a, \"quoted\"\nline"]
AZURE_VERSION = "2024-10-21"
GATEWAY_SECRET = "gw-secret-7f3a9c1e55d0"


def embed(fp: FakeProvider, texts: list[str] = TEXTS, dimensions: int | None = None, **extra: Any) -> np.ndarray:
    return embed_texts(fp, texts, dimensions, **extra).vectors


def expected(texts: list[str], dim: int, **fields: Any) -> np.ndarray:
    return np.stack([vector_for(salted(t, fields), dim) for t in texts])


# ------------------------------------------------------------------ Azure OpenAI
def azure(**extra: Any) -> FakeProvider:
    return FakeProvider(dim=8, deployment="emb-small", auth="api-key",
                        required_query={"api-version": AZURE_VERSION}, **extra)


def test_azure_deployment_gets_its_route_api_version_and_api_key_header_and_no_bearer() -> None:
    with azure() as fp:
        vectors = embed(fp, auth="api-key", query={"api-version": AZURE_VERSION})
        calls = fp.calls
    assert np.array_equal(vectors, expected(TEXTS, 8))
    assert [c["path"] for c in calls] == ["/openai/deployments/emb-small/embeddings"]
    assert calls[0]["query"] == {"api-version": AZURE_VERSION}
    assert calls[0]["headers"]["api-key"] == fp.api_key
    assert "Authorization" not in calls[0]["headers"]


def test_azure_without_api_version_is_a_missing_endpoint_and_nothing_is_embedded() -> None:
    with azure() as fp:
        err = embed_error(fp, auth="api-key")
        assert fp.count() == 1 and fp.inputs_received == []
        assert fp.calls[0]["query"] == {}
    assert isinstance(err, EndpointMissingError) and err.kind == "unusable"
    assert str(err) == "relay: HTTP 404 [404] Resource not found (check base_url, and for Azure the deployment in it " \
                       "and query: {api-version: ...})"


def test_azure_with_a_bearer_key_is_refused_as_unusable_and_the_key_never_travels_as_bearer_there() -> None:
    with azure() as fp:
        err = embed_error(fp, query={"api-version": AZURE_VERSION})  # auth left at bearer
        headers = fp.calls[0]["headers"]
        assert fp.inputs_received == []
    assert isinstance(err, ProviderUnusableError) and err.status == 401
    assert "api-key" not in headers and headers["Authorization"] == f"Bearer {fp.api_key}"


def test_auth_none_sends_no_key_at_all() -> None:
    with FakeProvider(dim=8, auth="none") as fp:
        vectors = embed(fp, auth="none", api_key=None)
        headers = fp.calls[0]["headers"]
    assert np.array_equal(vectors, expected(TEXTS, 8))
    assert "Authorization" not in headers and "api-key" not in headers


# ------------------------------------------------------------------ gateway headers
def test_custom_headers_go_on_every_request_and_an_echoed_value_is_masked_in_errors() -> None:
    wanted = {"X-Gateway-Key": GATEWAY_SECRET, "X-Org": "data-team"}
    with FakeProvider(dim=8, required_headers=wanted, script=["ok", "ok"]) as fp:
        async def twice(p: OpenAIProvider) -> list[np.ndarray]:
            return [(await p.embed(TEXTS[:2])).vectors, (await p.embed(TEXTS[2:])).vectors]

        first, second = run_provider(fp, twice, headers=wanted)
        calls = fp.calls
    assert np.array_equal(np.concatenate([first, second]), expected(TEXTS, 8))
    assert len(calls) == 2
    for call in calls:
        assert {k: call["headers"].get(k) for k in wanted} == wanted


def test_without_the_gateways_header_the_provider_is_unusable_and_the_error_never_shows_a_header_value() -> None:
    with FakeProvider(dim=8, required_headers={"X-Gateway-Key": GATEWAY_SECRET}) as fp:
        err = embed_error(fp, headers={"X-Gateway-Key": "gw-wrong-value-0000"})
        assert fp.inputs_received == []
    assert isinstance(err, ProviderUnusableError)
    assert str(err) == "relay: HTTP 401 [invalid_api_key] Missing or invalid X-Gateway-Key header."


def test_header_and_query_values_a_relay_echoes_back_are_masked() -> None:
    from pipeline.providers.openai import REDACTED, redact, secrets_of

    cfg = ProviderConfig(name="r", base_url="http://127.0.0.1:9/v1", api_key="sk-key-123456",
                         headers={"X-Gateway-Key": GATEWAY_SECRET}, query={"code": "fn-code-abcdef"})
    err = redact(BadInputError(f"bad header {GATEWAY_SECRET} for code fn-code-abcdef and sk-key-123456"),
                 secrets_of(cfg))
    assert err.message == f"bad header {REDACTED} for code {REDACTED} and {REDACTED}"
    assert GATEWAY_SECRET not in repr(cfg) and "fn-code-abcdef" not in repr(cfg)


# ------------------------------------------------------------------ extra_body
def test_extra_body_fields_are_in_every_request_and_change_the_vectors() -> None:
    with FakeProvider(dim=8, vary_with=("input_type",)) as fp:
        async def twice(p: OpenAIProvider) -> np.ndarray:
            return np.concatenate([(await p.embed(TEXTS[:1])).vectors, (await p.embed(TEXTS[1:])).vectors])

        vectors = run_provider(fp, twice, extra_body={"input_type": "passage", "truncate": "END"})
        bodies = fp.requests
    assert np.array_equal(vectors, expected(TEXTS, 8, input_type="passage"))
    assert not np.array_equal(vectors, expected(TEXTS, 8))  # the field made other vectors
    sent = [(b["input_type"], b["truncate"], b["encoding_format"]) for b in bodies]
    assert sent == [("passage", "END", "base64")] * 2


def test_extra_body_may_ask_for_floats_and_is_answered_exactly() -> None:
    with FakeProvider(dim=8) as fp:
        vectors = embed(fp, extra_body={"encoding_format": "float"})
        assert fp.requests[0]["encoding_format"] == "float"
    assert np.array_equal(vectors, expected(TEXTS, 8))


# ------------------------------------------------------------------ input caps
@pytest.mark.parametrize("wording, cap, sizes", [
    ("gemini", 100, [250, 100, 100, 50]),  # the cap the answer states
    ("cohere", 96, [250, 96, 96, 58]),
    ("plain", 100, [250, 125, 62, 62, 62, 63, 1]),  # no number: halved until it answers
])
def test_a_too_many_inputs_400_teaches_the_cap_and_the_request_goes_again_in_parts(
        caplog: pytest.LogCaptureFixture, wording: str, cap: int, sizes: list[int]) -> None:
    texts = [f"text {i}" for i in range(250)]
    caplog.set_level(logging.WARNING, logger="pipeline")
    with FakeProvider(dim=8, input_cap=cap, cap_wording=wording) as fp:  # type: ignore[arg-type]
        async def action(p: OpenAIProvider) -> tuple[np.ndarray, int | None]:
            return (await p.embed(texts)).vectors, p.max_inputs

        vectors, learned = run_provider(fp, action)
        sent = [len(b["input"]) for b in fp.requests]
        answered = fp.inputs_received
    assert np.array_equal(vectors, expected(texts, 8))
    assert answered == texts  # each text answered once, in order
    if wording != "plain":
        assert sent == sizes and learned == cap
        assert f"relay takes at most {cap} inputs a request (as it says" in caplog.text
    else:
        assert sent[:3] == [250, 125, 62] and learned == 62 and sum(sent[2:]) == 250
        assert "relay takes at most 62 inputs a request (halving until it answers" in caplog.text


def test_a_single_input_refused_as_too_many_stops_the_provider() -> None:
    with FakeProvider(dim=8, input_cap=1) as fp:
        fp.input_cap = 0  # refuses everything
        err = embed_error(fp, ["one"])
    assert isinstance(err, ProviderUnusableError)
    assert "refuses a single input as too many" in str(err)


@pytest.mark.parametrize("status, body, cls, cap", [
    (400, [{"error": {"code": 400, "message": "* BatchEmbedContentsRequest.requests: at most 100 requests can be "
                                              "in one batch\n", "status": "INVALID_ARGUMENT"}}],
     TooManyInputsError, 100),
    (400, {"error": {"code": 400, "message": "* BatchEmbedContentsRequest.requests: at most 100 requests can be "
                                             "in one batch\n", "status": "INVALID_ARGUMENT"}}, TooManyInputsError, 100),
    (400, {"message": "invalid request: total number of texts must be at most 96 - received 120"},
     TooManyInputsError, 96),
    (413, {"error": "batch size 64 > maximum allowed batch size 32", "error_type": "Validation"},
     TooManyInputsError, 32),
    (400, {"error": {"message": "Invalid 'input': array too long. Expected an array with maximum length 2048, but "
                                "got an array with length 2049 instead.", "code": "array_above_max_length"}},
     TooManyInputsError, 2048),
    (400, {"error": {"message": "Too many inputs.", "code": None}}, TooManyInputsError, None),
    # the rows' own faults stay bad input
    (400, {"error": {"message": "This model's maximum context length is 8192 tokens, however you requested 9000 "
                                "tokens", "code": None}}, BadInputError, None),
    (400, {"error": {"message": "Your input was flagged by the content filter.", "code": None}}, BadInputError, None),
    # a 429 under a "requests" word is still a rate limit
    (429, {"error": {"message": "Too many requests", "code": None}}, RateLimitedError, None),
])
def test_too_many_inputs_is_told_apart_from_a_refused_row(status: int, body: Any, cls: type, cap: int | None) -> None:
    err = classify(provider="p", status=status, body=body)
    assert type(err) is cls
    assert getattr(err, "max_inputs", None) == cap


@pytest.mark.parametrize("status, body, cls", [
    (404, {"error": {"code": "404", "message": "Resource not found"}}, EndpointMissingError),
    (404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not "
                                                             "exist."}}, EndpointMissingError),
    (401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
     ProviderUnusableError),
    (429, {"error": "Model is overloaded", "error_type": "overloaded"}, RateLimitedError),
])
def test_azure_and_tei_answers_are_classified_by_what_they_say(status: int, body: Any, cls: type) -> None:
    err = classify(provider="p", status=status, body=body)
    assert type(err) is cls
    assert err.retry_after_s is None  # no header: the job's backoff decides


# ------------------------------------------------------------------ self-hosted quirks
def test_floats_answered_where_base64_was_asked_are_decoded_as_floats() -> None:
    with FakeProvider(dim=8, base64="ignore", auth="none") as fp:  # Ollama
        vectors = embed(fp, auth="none", api_key=None)
        body = fp.requests[0]
    assert body["encoding_format"] == "base64"
    assert np.array_equal(vectors, expected(TEXTS, 8))


def test_an_endpoint_that_ignores_dimensions_stops_with_a_clear_reason() -> None:
    with FakeProvider(dim=16, dimensions_mode="ignore", base64="ignore") as fp:
        err = embed_error(fp, dimensions=8)
        assert fp.requests[0]["dimensions"] == 8
    assert isinstance(err, ProviderUnusableError)
    assert str(err) == ("relay: answers vectors of length 16 where embedding.dimensions asks 8: it does not honour "
                        "'dimensions' (drop it from the job, or use a provider that does)")


# ------------------------------------------------------------------ the Batch API client
def test_batch_client_calls_carry_the_auth_header_query_and_headers_on_every_call(tmp_path: Any) -> None:
    wanted = {"X-Gateway-Key": GATEWAY_SECRET}
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"custom_id": "r0-u0", "method": "POST", "url": "/v1/embeddings", '
                     '"body": {"model": "text-embedding-3-small", "input": ["a"]}}\n')
    with FakeBatchAPI(dim=8, auth="api-key", required_query={"api-version": AZURE_VERSION},
                      required_headers=wanted) as api:
        cfg = ProviderConfig(name="azure-batch", type="openai_batch", base_url=api.base_url, api_key=api.api_key,
                             model=MODEL, auth="api-key", query={"api-version": AZURE_VERSION}, headers=wanted)

        async def main() -> tuple[str, str]:
            client = BatchClient(cfg, RetryConfig(max_attempts=1))
            await client.start()
            try:
                file_id = await client.upload(lines, "in.jsonl")
                batch = await client.create(file_id, {"job": "t"})
                await client.get(batch.id)
                return file_id, batch.id
            finally:
                await client.close()

        file_id, batch_id = asyncio.run(main())
        calls = api.api_calls
    assert file_id and batch_id
    assert [c["path"] for c in calls] == ["/v1/files", "/v1/batches", f"/v1/batches/{batch_id}"]
    for call in calls:
        assert call["query"] == {"api-version": AZURE_VERSION}
        assert call["headers"]["api-key"] == api.api_key and "Authorization" not in call["headers"]
        assert call["headers"]["X-Gateway-Key"] == GATEWAY_SECRET
