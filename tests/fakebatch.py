"""A loopback server that speaks OpenAI's Files + Batches API, for tests.

It runs on 127.0.0.1 (free port) in a daemon thread with its own event loop,
like fakeprovider.py, so subprocesses talk to it over real HTTP::

    with FakeBatchAPI(dim=8, duration_s=0.3) as api:
        job: type openai_batch, base_url api.base_url, poll_interval_s 0.05
        assert api.embedded == Counter(texts)   # each text embedded once

Endpoints: POST /v1/files (multipart, purpose batch), GET /v1/files
(?purpose), GET /v1/files/{id}/content, DELETE /v1/files/{id}, POST
/v1/batches, GET /v1/batches (?limit&after, newest first), GET
/v1/batches/{id}, POST /v1/batches/{id}/cancel, and POST /v1/embeddings
(the synchronous probe, answered as a FakeProvider, which this server is;
`sync=False` answers 404 as a gateway without it). Every call checks the
bearer key (401 invalid_api_key).

Time is scaled down: a batch goes validating -> in_progress -> finalizing ->
completed over `duration_s` from its creation, as it is polled;
`request_counts` grow meanwhile. `hold()` keeps new and running batches in
progress until `release()`. Answers are `vector_for(text, dim)` as base64,
usage in cl100k tokens; output lines come shuffled (seeded) and each body's
`data` reversed; failed lines go to the error file.

`script`: one directive per created batch, in creation order (then "ok"):
    ok                the batch completes
    expire            it expires: its first half of lines ran, the rest are `batch_expired` in the error file
    fail:CODE         it fails validation with errors.data[0].code CODE
    stall_create:S    the create answers S seconds late (the batch exists at once)
`line_script`: one directive per line as lines run, across batches (then "ok"):
    ok | 500 (response.status_code 500, internal_error) | 400 (invalid_request_error) | 429
`reject_marker`: a line whose input holds it is refused with 400.
`queue_limit`: tokens of unfinished batches; a batch that would pass it fails
validation with `token_limit_exceeded`.
`stall_download_s`: each content download waits this long first.
`serves`: salts every vector, as a gateway serving another model under the name.
"""
from __future__ import annotations

import asyncio
import base64 as b64
import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web

from fakeprovider import FakeProvider, _BadRequest, _error, salted, vector_for

TERMINAL = ("completed", "expired", "failed", "cancelled")
MAX_INPUTS_PER_BATCH = 50_000


@dataclass
class _Batch:
    id: str
    input_file_id: str
    created: float
    created_at: int
    metadata: dict[str, Any]
    lines: list[dict[str, Any]]
    tokens: int
    directive: str
    fail_code: str | None = None
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    cancel_asked: bool = False
    held_since: float | None = None

    def json(self) -> dict[str, Any]:
        errors = None
        if self.fail_code:
            errors = {"object": "list", "data": [{"code": self.fail_code, "line": None, "param": None,
                                                  "message": f"Batch failed ({self.fail_code}, scripted)."}]}
        return {"id": self.id, "object": "batch", "endpoint": "/v1/embeddings", "errors": errors,
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "request_counts": dict(self.counts), "metadata": self.metadata}


class FakeBatchAPI(FakeProvider):
    def __init__(self, *, dim: int = 8, api_key: str = "sk-test-key", model: str = "text-embedding-3-small",
                 duration_s: float = 0.3, sync: bool = True, script: Iterable[str] = (),
                 line_script: Iterable[str] = (), reject_marker: str | None = None,
                 queue_limit: int | None = None, stall_download_s: float = 0.0, serves: str = "",
                 seed: int = 0, **dialect: Any) -> None:
        # dialect: FakeProvider's auth, required_query, required_headers, vary_with (every call and line)
        super().__init__(dim=dim, api_key=api_key, model=model, serves=serves, **dialect)
        self.duration_s, self.sync, self.batch_reject_marker = duration_s, sync, reject_marker
        self.queue_limit, self.stall_download_s = queue_limit, stall_download_s
        self._shuffle_rng = random.Random(seed)
        self._batch_script: deque[str] = deque(script)
        self._line_script: deque[str] = deque(line_script)
        self._files: dict[str, dict[str, Any]] = {}
        self._batches: dict[str, _Batch] = {}
        self._held = False
        self._ids = 0
        self.created: list[str] = []  # batch ids, in creation order
        self.submitted: Counter[str] = Counter()  # texts in the lines of created batches
        self.embedded: Counter[str] = Counter()  # texts answered (success lines)
        self.cancelled: list[str] = []
        self.deleted: list[str] = []  # file ids
        self.statuses_seen: set[str] = set()
        self.max_enqueued = 0  # tokens of unfinished batches, at the most
        self.polls = 0
        self.user_agents: Counter[str] = Counter()  # batch polls by User-Agent (the Airflow trigger's own)
        self.downloads = 0  # content downloads begun
        self.sync_calls = 0  # POST /v1/embeddings, answered or not (the start-up probe)
        self.tokens_enqueued = 0  # tokens of every batch the queue took
        self.api_calls: list[dict[str, Any]] = []  # Files/Batches calls: {"path", "query", "headers"} as received
        self.line_bodies: list[dict[str, Any]] = []  # the body of every request line run, in the order run

    # ----------------------------------------------------------------- test controls
    def hold(self) -> None:
        """Batches stay in progress (none completes) until release()."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False
            now = time.monotonic()
            for b in self._batches.values():
                if b.held_since is not None:
                    b.created += now - b.held_since  # the time held does not count
                    b.held_since = None

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            return self._batches[batch_id].json()

    def live_files(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def open_batches(self) -> list[str]:
        with self._lock:
            return [b.id for b in self._batches.values() if b.status not in TERMINAL]

    # ----------------------------------------------------------------- server
    async def _serve(self) -> None:
        app = web.Application(client_max_size=1 << 30, middlewares=[self._auth])
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_delete("/v1/files/{id}", self._delete_file)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{id}", self._get)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/v1/embeddings":  # the probe's POST is recorded (and checked) as FakeProvider's
            with self._lock:
                self.api_calls.append(self.call_of(request))
            refused = self.dialect_refusal(request)
            if refused is not None:
                return refused
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.auth == "bearer" and key != self.api_key:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids:05d}"

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.sync_calls += 1
        if not self.sync:
            return web.json_response({"error": {"message": "Not found.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        return await self._handle(request)

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not hasattr(upload, "file"):
            return _error(400, "purpose batch and a file are required.", "invalid_request_error")
        data = upload.file.read()  # type: ignore[union-attr]
        file_id = self._new_id("file")
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": upload.filename, "purpose": "batch"}  # type: ignore[union-attr]
        with self._lock:
            self._files[file_id] = {**obj, "data": data}
        return web.json_response(obj)

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            files = [{k: v for k, v in f.items() if k != "data"} for f in reversed(self._files.values())
                     if request.query.get("purpose") in (None, f["purpose"])]
        return web.json_response({"object": "list", "data": files, "has_more": False})

    async def _content(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.downloads += 1
        if self.stall_download_s:
            await asyncio.sleep(self.stall_download_s)
        with self._lock:
            f = self._files.get(request.match_info["id"])
        if f is None:
            return _error(404, "No such File object.", "invalid_request_error")
        return web.Response(body=f["data"], content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["id"]
        with self._lock:
            found = self._files.pop(file_id, None)
            if found is not None:
                self.deleted.append(file_id)
        if found is None:
            return _error(404, "No such File object.", "invalid_request_error")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("endpoint") != "/v1/embeddings" or body.get("completion_window") != "24h":
            return _error(400, "endpoint /v1/embeddings and completion_window 24h only.", "invalid_request_error")
        with self._lock:
            f = self._files.get(body.get("input_file_id"))
            directive = self._batch_script.popleft() if self._batch_script else "ok"
        if f is None:
            return _error(404, "No such File object.", "invalid_request_error")
        lines = [json.loads(raw) for raw in f["data"].splitlines() if raw.strip()]
        tokens, inputs = 0, 0
        for line in lines:
            texts = line["body"]["input"]
            inputs += len(texts)
            try:
                tokens += FakeProvider._parse_input(texts)[1]
            except _BadRequest:
                pass
        batch_id = self._new_id("batch")
        now = time.monotonic()
        with self._lock:
            enqueued = sum(b.tokens for b in self._batches.values() if b.status not in TERMINAL and not b.fail_code)
            fail = directive[5:] if directive.startswith("fail:") else None
            if fail is None and len({line["custom_id"] for line in lines}) != len(lines):
                fail = "duplicate_custom_id"
            if fail is None and inputs > MAX_INPUTS_PER_BATCH:
                fail = "too_many_inputs"
            if fail is None and self.queue_limit is not None and enqueued + tokens > self.queue_limit:
                fail = "token_limit_exceeded"
            batch = _Batch(batch_id, f["id"], now, int(time.time()), body.get("metadata") or {}, lines, tokens,
                           directive, fail_code=fail)
            batch.counts["total"] = len(lines)
            if self._held:
                batch.held_since = now
            self._batches[batch_id] = batch
            self.created.append(batch_id)
            for line in lines:
                self.submitted.update(line["body"]["input"])
            if not fail:
                self.max_enqueued = max(self.max_enqueued, enqueued + tokens)
                self.tokens_enqueued += tokens
            obj = batch.json()
        if directive.startswith("stall_create:"):
            await asyncio.sleep(float(directive.split(":", 1)[1]))
        return web.json_response(obj)

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        with self._lock:
            ordered = list(reversed(self._batches.values()))
            if after is not None:
                ids = [b.id for b in ordered]
                ordered = ordered[ids.index(after) + 1:] if after in ids else []
            page = ordered[:limit]
            for b in page:
                self._advance(b)
            data = [b.json() for b in page]
        return web.json_response({"object": "list", "data": data, "has_more": len(ordered) > limit,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            batch = self._batches.get(request.match_info["id"])
            if batch is None:
                return _error(404, "No batch found.", "invalid_request_error")
            self.polls += 1
            self.user_agents[request.headers.get("User-Agent", "")] += 1
            self._advance(batch)
            self.statuses_seen.add(batch.status)
            return web.json_response(batch.json())

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            batch = self._batches.get(request.match_info["id"])
            if batch is None:
                return _error(404, "No batch found.", "invalid_request_error")
            if batch.status not in TERMINAL:
                batch.cancel_asked = True
                batch.status = "cancelling"
                self.cancelled.append(batch.id)
            return web.json_response(batch.json())

    # ----------------------------------------------------------------- the batches' life
    def _advance(self, b: _Batch) -> None:
        """Move a batch on by the time passed (under the lock)."""
        if b.status in TERMINAL:
            return
        if b.fail_code:
            b.status = "failed"
            return
        if b.cancel_asked:
            b.status = "cancelled"
            return
        if self._held:
            b.held_since = b.held_since or time.monotonic()
            b.status = "in_progress"
            return
        progress = (time.monotonic() - b.created) / self.duration_s if self.duration_s > 0 else 1.0
        if progress < 0.1:
            b.status = "validating"
        elif progress < 0.8:
            b.status = "in_progress"
            b.counts["completed"] = int(len(b.lines) * (progress - 0.1) / 0.7)
        elif progress < 1.0:
            b.status = "finalizing"
        else:
            self._finish(b, expire=b.directive == "expire")

    def _finish(self, b: _Batch, *, expire: bool) -> None:
        """Run the lines: answers to the output file (shuffled), failures to the error file."""
        out: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for n, line in enumerate(b.lines):
            request_id = f"req_{b.id}_{n}"
            if expire and n >= (len(b.lines) + 1) // 2:
                errors.append({"id": request_id, "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired",
                                         "message": "This request could not be executed before the completion window expired."}})
                continue
            directive = self._line_script.popleft() if self._line_script else "ok"
            status, body = self._run_line(line["body"], directive)
            result = {"id": request_id, "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}
            (out if status == 200 else errors).append(result)
        self._shuffle_rng.shuffle(out)
        b.output_file_id = self._store_result(out, b.id, "output") if out else None
        b.error_file_id = self._store_result(errors, b.id, "error") if errors else None
        b.counts.update(completed=len(out), failed=len(errors))
        b.status = "expired" if expire else "completed"

    def _run_line(self, body: dict[str, Any], directive: str) -> tuple[int, dict[str, Any]]:
        def error(status: int, message: str, type_: str, code: str | None = None) -> tuple[int, dict[str, Any]]:
            return status, {"error": {"message": message, "type": type_, "param": None, "code": code}}

        if directive == "500":
            return error(500, "The server had an error processing your request.", "server_error", "internal_error")
        if directive == "429":
            return error(429, "Rate limit reached.", "requests", "rate_limit_exceeded")
        if directive == "400":
            return error(400, "Invalid request (scripted).", "invalid_request_error")
        self.line_bodies.append(body)
        if body.get("model") != self.model:
            return error(404, f"The model `{body.get('model')}` does not exist.", "invalid_request_error", "model_not_found")
        try:
            texts, tokens = FakeProvider._parse_input(body.get("input"))
        except _BadRequest as exc:
            return error(400, str(exc), "invalid_request_error")
        if self.batch_reject_marker is not None and any(self.batch_reject_marker in t for t in texts):
            return error(400, "Your input was flagged by the content filter (scripted).", "invalid_request_error")
        dim = body.get("dimensions", self.dim)
        fields = {k: body.get(k) for k in self.vary_with}
        data = [{"object": "embedding", "index": i,
                 "embedding": b64.b64encode(vector_for(self.serves + salted(t, fields), dim).astype("<f4").tobytes())
                 .decode("ascii")} for i, t in enumerate(texts)]
        self.embedded.update(texts)
        return 200, {"object": "list", "data": data[::-1], "model": self.model,
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _store_result(self, lines: list[dict[str, Any]], batch_id: str, kind: str) -> str:
        self._ids += 1
        file_id = f"file-{self._ids:05d}"
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self._files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                "filename": f"{batch_id}_{kind}.jsonl", "purpose": "batch_output", "data": data}
        return file_id
