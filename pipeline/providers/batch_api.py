"""OpenAI's Files + Batches API: the HTTP of an `openai_batch` provider (batch/strategy.py drives it).

Upload a JSONL input file (`POST /files`, purpose `batch`), create a batch
(`POST /batches`, endpoint `/v1/embeddings`, window `24h`, our metadata),
poll it (`GET /batches/{id}`), download its output and error files (`GET
/files/{id}/content`), cancel it, delete files; list files and batches to
adopt what a killed run uploaded or created but never recorded. Every failure
goes through errors.classify; transient ones are retried with the job's
backoff, the rest are raised.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, TypeVar, get_args

import aiohttp

from ..config.job import ProviderConfig, RetryConfig
from ..core.retry import retry_delay_s
from ..errors import BadResponseError, EndpointMissingError, ProviderError
from .classify import classify
from .openai import CONNECT_TIMEOUT_S, USER_AGENT, redact, request_headers, secrets_of

log = logging.getLogger(__name__)
T = TypeVar("T")

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
STATUSES: tuple[BatchStatus, ...] = get_args(BatchStatus)
RESULT_STATUSES: tuple[BatchStatus, ...] = ("completed", "expired", "cancelled")  # results to collect, maybe partial
ENDPOINT = "/v1/embeddings"
COMPLETION_WINDOW = "24h"  # the only window the API offers
PURPOSE = "batch"
BATCHES_PAGE = 100  # batches per list call, when looking for one a killed run created
MAX_ADOPT_PAGES = 20  # ... among the 2,000 most recent: a killed run's batch is a recent one
FILES_PAGE = 10_000  # files per list call, when looking for one a killed run uploaded
DOWNLOAD_CHUNK_BYTES = 4 * 2**20  # result files (hundreds of MB) stream to disk through this much memory

Body = Callable[[ExitStack], Any]  # builds a request's body afresh for each attempt (a file is reopened)


@dataclass(frozen=True)
class BatchInfo:
    """What the provider says of a batch."""

    id: str
    status: BatchStatus
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    request_counts: tuple[int, int, int]  # total, completed, failed
    errors: tuple[tuple[str | None, str], ...]  # errors.data: (code, message), when it failed validation
    metadata: dict[str, str]

    @classmethod
    def parse(cls, obj: Any, provider: str) -> BatchInfo:
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise BadResponseError("a batch object without an id", provider=provider)
        status = obj.get("status")
        counts = obj.get("request_counts")
        counts = counts if isinstance(counts, dict) else {}
        errors = obj.get("errors")
        errors = errors.get("data") if isinstance(errors, dict) else None
        metadata = obj.get("metadata")
        return cls(
            id=obj["id"],
            status=status if status in STATUSES else "in_progress",  # a gateway's own word ("queued"): still running
            input_file_id=obj.get("input_file_id"),
            output_file_id=obj.get("output_file_id") or None,
            error_file_id=obj.get("error_file_id") or None,
            request_counts=(int(counts.get("total") or 0), int(counts.get("completed") or 0), int(counts.get("failed") or 0)),
            errors=tuple((e.get("code"), str(e.get("message") or "")) for e in errors or [] if isinstance(e, dict)),
            metadata=metadata if isinstance(metadata, dict) else {},
        )


class BatchClient:
    def __init__(self, cfg: ProviderConfig, retry: RetryConfig, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random, user_agent: str = USER_AGENT) -> None:
        assert cfg.base_url is not None
        self.name = cfg.name
        self._cfg = cfg
        self._base = cfg.base_url.rstrip("/")
        self._query = dict(cfg.query)  # on every URL (Azure's api-version)
        self._secrets = secrets_of(cfg)
        self._retry = retry
        self._sleep = sleep
        self._rand = rand
        self._user_agent = user_agent  # the Airflow trigger's polls say who they are
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No total timeout: an upload or a download of 200 MB takes what it takes;
        # a stalled one fails on the read timeout.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(CONNECT_TIMEOUT_S, self._cfg.timeout_s),
                                        sock_read=self._cfg.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout,
                                              headers={**request_headers(self._cfg), "User-Agent": self._user_agent})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- files ------------------------------------------------------------------------

    async def upload(self, path: Path, filename: str) -> str:
        def form(stack: ExitStack) -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", PURPOSE)
            data.add_field("file", stack.enter_context(open(path, "rb")), filename=filename,
                           content_type="application/jsonl")
            return data

        answer = await self._call("POST", "/files", body=form)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise BadResponseError("file upload answered without a file id", provider=self.name)
        return str(answer["id"])

    async def find_file(self, filename: str) -> str | None:
        """The newest uploaded batch file of this name (a killed run's upload), if any."""
        answer = await self._call("GET", "/files", params={"purpose": PURPOSE, "limit": str(FILES_PAGE)})
        found = [f for f in _data(answer) if isinstance(f, dict) and f.get("filename") == filename]
        found.sort(key=lambda f: f.get("created_at") or 0, reverse=True)
        return str(found[0]["id"]) if found else None

    async def download(self, file_id: str, dest: Path) -> None:
        await self._call("GET", f"/files/{file_id}/content", dest=dest)

    async def delete_file(self, file_id: str) -> None:
        """Best effort: a file that stays is tidiness lost, never work; one already gone is fine."""
        try:
            await self._call("DELETE", f"/files/{file_id}")
        except EndpointMissingError:
            log.debug("%s: file %s was deleted already", self.name, file_id)
        except ProviderError as err:
            log.warning("%s: could not delete file %s (%s); it stays on the provider", self.name, file_id, err)

    # -- batches ----------------------------------------------------------------------

    async def create(self, input_file_id: str, metadata: dict[str, str]) -> BatchInfo:
        """Create the batch once: after a failed attempt (the provider may have
        created it before the answer was lost) look for it before trying again."""
        body = {"input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW,
                "metadata": metadata}
        attempt = 0
        while True:
            attempt += 1
            try:
                return BatchInfo.parse(await self._call("POST", "/batches", json_body=body, attempts=1), self.name)
            except ProviderError as err:
                if err.kind in ("unusable", "bad_input") or attempt >= self._retry.max_attempts:
                    raise
                created = await self.find_batch(input_file_id)
                if created is not None:
                    return created
                await self._backoff(attempt, err, "creating a batch")

    async def find_batch(self, input_file_id: str) -> BatchInfo | None:
        """The batch made of this input file, among the most recent ones, if any."""
        after: str | None = None
        for _ in range(MAX_ADOPT_PAGES):
            params = {"limit": str(BATCHES_PAGE), **({"after": after} if after else {})}
            answer = await self._call("GET", "/batches", params=params)
            page = [b for b in _data(answer) if isinstance(b, dict)]
            for obj in page:
                if obj.get("input_file_id") == input_file_id:
                    return BatchInfo.parse(obj, self.name)
            if not page or not (isinstance(answer, dict) and answer.get("has_more")):
                return None
            after = str(page[-1].get("id"))
        return None

    async def get(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(await self._call("GET", f"/batches/{batch_id}"), self.name)

    async def cancel(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(await self._call("POST", f"/batches/{batch_id}/cancel"), self.name)

    # -- one call, retried ------------------------------------------------------------

    async def _call(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None,
                    body: Body | None = None, dest: Path | None = None, attempts: int | None = None) -> Any:
        """The answer's JSON (or, with `dest`, its body written there)."""
        return await self.retrying(lambda: self._once(method, path, json_body, params, body, dest),
                                   f"{method} {path}", attempts)

    async def retrying(self, once: Callable[[], Awaitable[T]], what: str, attempts: int | None = None) -> T:
        """`once()`, retried while its failure may pass (timeouts, 5xx, 429) up to
        `attempts` (default retry.max_attempts); other failures are raised at once."""
        limit = attempts or self._retry.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                return await once()
            except Exception as exc:  # noqa: BLE001 - every failure is classified in one place
                err = self._redact(classify(provider=self.name, exc=exc))
                if err.kind in ("unusable", "bad_input") or attempt >= limit:
                    if err is exc:
                        raise
                    raise err from exc
                await self._backoff(attempt, err, what)

    async def _backoff(self, attempt: int, err: ProviderError, what: str) -> None:
        delay = retry_delay_s(attempt, err, self._retry, self._rand)
        log.debug("%s: retry %d of %s after %s (%s); waiting %.2fs", self.name, attempt, what, err.kind, err, delay)
        await self._sleep(delay)

    async def _once(self, method: str, path: str, json_body: Any, params: dict[str, str] | None,
                    body: Body | None, dest: Path | None) -> Any:
        assert self._session is not None, "start() first"
        try:
            with ExitStack() as stack:
                data = body(stack) if body is not None else None
                async with self._session.request(method, self._base + path, json=json_body,
                                                 params={**self._query, **(params or {})}, data=data) as resp:
                    status, headers = resp.status, dict(resp.headers)
                    if status < 400 and dest is not None:
                        with open(dest, "wb") as fh:
                            async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                                fh.write(chunk)
                        return None
                    raw = await resp.read()
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified in one place
            raise self._redact(classify(provider=self.name, exc=exc)) from exc
        try:
            payload = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            if status >= 400:
                text = raw[:500].decode("utf-8", errors="replace")
                raise self._redact(classify(provider=self.name, status=status, body=text, headers=headers)) from None
            raise BadResponseError(f"{method} {path}: answer is not JSON ({len(raw)} bytes)", provider=self.name) from None
        if status >= 400 or (isinstance(payload, dict) and payload.get("error") and "id" not in payload):
            raise self._redact(classify(provider=self.name, status=status, body=payload, headers=headers))
        return payload

    def _redact(self, err: ProviderError) -> ProviderError:
        return redact(err, self._secrets)


def _data(answer: Any) -> list[Any]:
    data = answer.get("data") if isinstance(answer, dict) else None
    return data if isinstance(data, list) else []
