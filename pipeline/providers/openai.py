"""An OpenAI-compatible `/embeddings` endpoint: the only module that speaks HTTP.

It absorbs the dialects met in the field: `embedding` or `embeddings` (ctyun),
`data` out of order, float lists or base64 whatever was asked, error bodies
under HTTP 200, word or numeric error codes. Every answer's `x-ratelimit-*`
headers go back to the dispatcher with it, success or failure, for pacing.
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
from ..errors import BadResponseError, ProviderError
from .classify import classify, key_reading
from ..core.limits import KeyReading
from .base import EmbedResult, check_vectors

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # a dead host should fail fast even when requests may take long
USER_AGENT = "embedding-pipeline/0.1"
REDACTED = "***"


class OpenAIProvider:
    def __init__(self, cfg: ProviderConfig, dimensions: int | None) -> None:
        assert cfg.base_url is not None and cfg.model is not None
        self.name = cfg.name
        self.config = cfg
        self._dimensions = dimensions
        self._url = cfg.base_url.rstrip("/") + "/embeddings"
        # A key read from a mounted secret often ends in a newline, which no
        # HTTP header may carry; keys never hold whitespace.
        self._key = (cfg.api_key or "").strip()
        # base64 halves the bytes and the parsing; dropped for a provider that refuses it.
        self.encoding_format = "base64"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_concurrency, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=self.config.timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, self.config.timeout_s)
        )
        headers = {"Authorization": f"Bearer {self._key}", "User-Agent": USER_AGENT}
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def embed(self, texts: list[str]) -> EmbedResult:
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
        body: dict[str, Any] = {"model": self.config.model, "input": texts, "encoding_format": self.encoding_format}
        if self._dimensions is not None:
            body["dimensions"] = self._dimensions
        try:
            async with self._session.post(self._url, json=body) as resp:
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
        """Some relays echo the key back in their messages."""
        if self._key and self._key in err.message:
            err.message = err.message.replace(self._key, REDACTED)
            err.args = (err.message,)
        return err


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
