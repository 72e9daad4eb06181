"""An OpenAI-compatible `/embeddings` endpoint: the only module that speaks HTTP.

It absorbs the dialects met in the field: `embedding` or `embeddings` (ctyun),
`data` out of order, float lists or base64 whatever was asked (Ollama answers
floats), error bodies under HTTP 200, word or numeric error codes. Every
answer's `x-ratelimit-*` headers go back to the dispatcher with it, success or
failure, for pacing.

What a provider's job entry adds goes on every request: the key as `auth`
says (a bearer token, Azure's `api-key` header, or none), its `headers`, its
`query` (Azure's `api-version`) and its `extra_body` fields (`input_type`,
`task`, ...). A 400 saying a request holds too many inputs teaches the
provider its cap for the run (the one stated, else half the request's), and
the request goes again in parts; an answer whose vectors are not the
requested `dimensions` long stops the provider.
"""
from __future__ import annotations

import binascii
import json
import logging
from typing import Any

import aiohttp
import numpy as np
import pybase64  # SIMD base64: 0.3 us a 1536-dim vector where the standard library takes 9

from ..config.job import ProviderConfig
from ..core.limits import KeyReading
from ..errors import BadResponseError, ProviderError, ProviderUnusableError, TooManyInputsError
from .base import EmbedResult, check_vectors
from .classify import classify, key_reading

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # a dead host should fail fast even when requests may take long
USER_AGENT = "embedding-pipeline/0.1"
REDACTED = "***"
MIN_REDACT_CHARS = 4  # a shorter header or query value is no secret, and masking it would garble messages


def request_headers(cfg: ProviderConfig) -> dict[str, str]:
    """The headers of every request to this provider: its key as `auth` says, then its own `headers`."""
    # A key read from a mounted secret often ends in a newline, which no
    # HTTP header may carry; keys never hold whitespace.
    key = (cfg.api_key or "").strip()
    headers = {"User-Agent": USER_AGENT}
    if cfg.auth == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    elif cfg.auth == "api-key":
        headers["api-key"] = key
    headers.update({name: str(value) for name, value in cfg.headers.items()})
    return headers


def secrets_of(cfg: ProviderConfig) -> tuple[str, ...]:
    """What must never be shown: the key, the header and query values. Longest first."""
    values = [(cfg.api_key or "").strip(), *map(str, cfg.headers.values()), *map(str, cfg.query.values())]
    return tuple(sorted({v for v in values if len(v) >= MIN_REDACT_CHARS}, key=len, reverse=True))


def redact(err: ProviderError, secrets: tuple[str, ...]) -> ProviderError:
    """Some relays and gateways echo the key or a header back in their messages."""
    for secret in secrets:
        if secret in err.message:
            err.message = err.message.replace(secret, REDACTED)
            err.args = (err.message,)
    return err


class OpenAIProvider:
    def __init__(self, cfg: ProviderConfig, dimensions: int | None) -> None:
        assert cfg.base_url is not None and cfg.model is not None
        self.name = cfg.name
        self.config = cfg
        self._dimensions = dimensions
        self._url = cfg.base_url.rstrip("/") + "/embeddings"
        self._query = dict(cfg.query)
        self._secrets = secrets_of(cfg)
        self._extra = {k: v for k, v in cfg.extra_body.to_dict().items() if k != "encoding_format"}
        # base64 halves the bytes and the parsing; dropped for a provider that refuses it.
        self.encoding_format: str = cfg.extra_body.get("encoding_format", "base64")
        # The most inputs a request may hold, once an answer said so (None: not known); the dispatcher packs to it.
        self.max_inputs: int | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_concurrency, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=self.config.timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, self.config.timeout_s)
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              headers=request_headers(self.config))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def embed(self, texts: list[str]) -> EmbedResult:
        cap = self.max_inputs
        if cap is not None and len(texts) > cap:
            return await self._in_parts(texts, cap)
        try:
            return await self._embed_once(texts)
        except TooManyInputsError as err:
            if len(texts) <= 1:
                raise ProviderUnusableError(f"refuses a single input as too many ({err.message})",
                                            provider=self.name, status=err.status, code=err.code) from err
            self._learn_cap(err, len(texts))
            return await self.embed(texts)

    def _learn_cap(self, err: TooManyInputsError, sent: int) -> None:
        """The cap the answer states, else half of what was sent; the lowest found stays for the run."""
        stated = err.max_inputs if err.max_inputs is not None and 1 <= err.max_inputs < sent else None
        cap = stated or max(1, sent // 2)
        if self.max_inputs is None or cap < self.max_inputs:
            self.max_inputs = cap
            found = "as it says" if stated else "halving until it answers"
            log.warning("%s takes at most %d inputs a request (%s: %s); sending at most %d from now on",
                        self.name, cap, found, err.message, cap)

    async def _in_parts(self, texts: list[str], cap: int) -> EmbedResult:
        """A request packed before the cap was known, sent as requests of at most `cap` inputs."""
        answers = [await self.embed(texts[i:i + cap]) for i in range(0, len(texts), cap)]
        usage = [a.usage_tokens for a in answers]
        return EmbedResult(np.ascontiguousarray(np.concatenate([a.vectors for a in answers])),
                           None if None in usage else sum(u for u in usage if u is not None), answers[-1].limits)

    async def _embed_once(self, texts: list[str]) -> EmbedResult:
        try:
            return await self._post(texts)
        except ProviderError as err:
            if self.encoding_format == "base64" and err.kind == "bad_input" and _about_encoding(err):
                log.info("%s refuses encoding_format=base64; asking for floats from now on", self.name)
                self.encoding_format = "float"
                return await self._post(texts)
            raise

    async def _post(self, texts: list[str]) -> EmbedResult:
        assert self._session is not None, "start() first"
        body: dict[str, Any] = {"model": self.config.model, "input": texts, "encoding_format": self.encoding_format,
                                **self._extra}
        if self._dimensions is not None:
            body["dimensions"] = self._dimensions
        try:
            async with self._session.post(self._url, json=body, params=self._query) as resp:
                status = resp.status
                headers = dict(resp.headers)
                raw = await resp.read()
        except Exception as exc:  # noqa: BLE001 - every failure is classified in one place
            raise self._redact(classify(provider=self.name, exc=exc)) from exc
        reading = key_reading(headers)
        try:
            return self._answer(status, headers, raw, len(texts), reading)
        except ProviderError as err:
            err.limits = reading
            raise

    def _answer(
        self, status: int, headers: dict[str, str], raw: bytes, n_inputs: int, reading: KeyReading | None
    ) -> EmbedResult:
        fast = _base64_answer(raw, n_inputs) if status < 400 else None
        if fast is not None:  # the usual answer: its base64 never went through the JSON parser
            payload, vectors = fast
            check_vectors(vectors, n_inputs, self._dimensions, self.name)
            return EmbedResult(vectors, _billed(payload), reading)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            if status >= 400:
                text = raw[:500].decode("utf-8", errors="replace")
                raise self._redact(classify(provider=self.name, status=status, body=text, headers=headers)) from None
            raise BadResponseError(f"response is not JSON ({len(raw)} bytes)", provider=self.name) from exc
        if status >= 400 or (isinstance(payload, dict) and payload.get("error") and not payload.get("data")):
            raise self._redact(classify(provider=self.name, status=status, body=payload, headers=headers))
        vectors = self.vectors(payload, n_inputs)
        if self._dimensions is not None and vectors.ndim == 2 and vectors.shape[1] not in (0, self._dimensions):
            # Every vector of one wrong length: the endpoint ignores `dimensions` (Ollama, TEI); asking again won't help.
            raise ProviderUnusableError(
                f"answers vectors of length {vectors.shape[1]} where embedding.dimensions asks {self._dimensions}: "
                f"it does not honour 'dimensions' (drop it from the job, or use a provider that does)",
                provider=self.name)
        check_vectors(vectors, n_inputs, self._dimensions, self.name)
        return EmbedResult(vectors, _billed(payload), reading)

    def vectors(self, payload: Any, n_inputs: int) -> np.ndarray:
        """The vectors of an answer's body (a `/v1/embeddings` one, or a batch
        output line's), in input order, in whatever dialect it came."""
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise BadResponseError("response has no 'data' list", provider=self.name)
        if len(data) != n_inputs:
            raise BadResponseError(f"{len(data)} vectors for {n_inputs} inputs", provider=self.name)
        block = _base64_block(data)
        if block is not None:
            return block
        rows: list[np.ndarray | None] = [None] * n_inputs
        for position, item in enumerate(data):
            if not isinstance(item, dict):
                raise BadResponseError("a 'data' item is not an object", provider=self.name)
            index = item.get("index", position)
            if not isinstance(index, int) or not 0 <= index < n_inputs or rows[index] is not None:
                raise BadResponseError(f"bad or repeated index {index!r} in 'data'", provider=self.name)
            rows[index] = self._decode(item.get("embedding", item.get("embeddings")))
        lengths = {len(r) for r in rows if r is not None}
        if len(lengths) != 1:
            raise BadResponseError(f"vectors of differing lengths {sorted(lengths)[:4]}", provider=self.name)
        return np.stack(rows)  # type: ignore[arg-type]

    def _decode(self, value: Any) -> np.ndarray:
        """A float list or a base64 string of little-endian float32, whatever was asked."""
        if isinstance(value, str):
            try:
                raw = pybase64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise BadResponseError("embedding is neither floats nor base64", provider=self.name) from None
            if len(raw) % 4:
                raise BadResponseError("base64 embedding is not whole float32 values", provider=self.name)
            return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            value = value[0]  # a relay that nests one vector in a list
        if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return np.asarray(value, dtype=np.float32)
        raise BadResponseError("an item has no 'embedding' or 'embeddings' vector", provider=self.name)

    def _redact(self, err: ProviderError) -> ProviderError:
        return redact(err, self._secrets)


def _billed(payload: Any) -> int | None:
    """The tokens an answer says it billed, if it says."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    billed = usage.get("total_tokens", usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    return billed if isinstance(billed, int) else None


EMBEDDING_KEY = b'"embedding":'
JSON_SPACE = b" \t\r\n"


def _base64_answer(raw: bytes, n_inputs: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """The usual answer without parsing its base64 as JSON: the JSON parser
    copied every vector's string twice (8 us of 26 a 1,536-dim row), where
    finding each `"embedding": "..."` is a memchr. The strings are cut out
    (left as ""), the rest, a few hundred bytes an item, is parsed as JSON
    and must be the usual answer: a `data` list of `n_inputs` items in index
    order, each an emptied `embedding` string, in the order they were cut;
    the strings, of one length ending on a whole float32 without padding,
    joined are the base64 of the whole [n, dim] block. Anything else (None)
    takes the JSON path, which handles every dialect and words the errors.
    (A `"embedding":` cannot occur inside a JSON string: its quotes would be
    escaped there.)"""
    skeleton: list[bytes] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    find = raw.find
    while (at := find(EMBEDDING_KEY, pos)) >= 0:
        start = at + len(EMBEDDING_KEY)
        while start < len(raw) and raw[start] in JSON_SPACE:
            start += 1
        if start >= len(raw) or raw[start] != 0x22:  # not a string: not the usual answer
            return None
        end = find(b'"', start + 1)
        if end < 0:
            return None
        skeleton.append(raw[pos:start + 1])
        spans.append((start + 1, end))
        pos = end
    if len(spans) != n_inputs or not n_inputs:
        return None
    skeleton.append(raw[pos:])
    width = spans[0][1] - spans[0][0]
    # 16 base64 characters are 12 bytes, three float32s: no padding, no value split.
    if width == 0 or width % 16 or any(e - s != width for s, e in spans) or raw[spans[0][1] - 1] == 0x3D:
        return None
    try:
        payload = json.loads(b"".join(skeleton))
    except (ValueError, UnicodeDecodeError):
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != n_inputs or payload.get("error"):
        return None
    for position, item in enumerate(data):
        if not isinstance(item, dict) or item.get("index", position) != position or item.get("embedding") != "":
            return None
    view = memoryview(raw)
    try:
        block = pybase64.b64decode(b"".join([view[s:e] for s, e in spans]), validate=True)
    except (binascii.Error, ValueError):
        return None
    return payload, np.frombuffer(block, dtype="<f4").astype(np.float32, copy=False).reshape(n_inputs, -1)


def _base64_block(data: list[Any]) -> np.ndarray | None:
    """The usual answer, decoded in one step: items in index order, each a
    base64 string of one length that ends on a whole float32 without padding,
    so the strings joined are the base64 of the whole [n, dim] block. Anything
    else (None) takes the item-by-item path, which also words the errors."""
    strings: list[str] = []
    for position, item in enumerate(data):
        if not isinstance(item, dict) or item.get("index", position) != position:
            return None
        value = item.get("embedding")
        if not isinstance(value, str):
            return None
        strings.append(value)
    width = len(strings[0]) if strings else 0
    # 16 base64 characters are 12 bytes, three float32s: no padding, no value split.
    if width == 0 or width % 16 or any(len(v) != width or v[-1] == "=" for v in strings):
        return None
    try:
        raw = pybase64.b64decode("".join(strings), validate=True)
    except (binascii.Error, ValueError):
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False).reshape(len(strings), -1)


def _about_encoding(err: ProviderError) -> bool:
    text = err.message.lower()
    return "encoding_format" in text or "base64" in text or "encoding format" in text
