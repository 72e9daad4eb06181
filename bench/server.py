"""A loopback OpenAI-compatible `/v1/embeddings` server for the benchmarks.

Runs in its own process (so its CPU is not the client's) and is cheap per
request: answers are the same unit vector for every input, built once per
(inputs, dimensions, format) and reused. It can add latency, enforce RPM and
TPM over a sliding 60-second window of arrivals (429 with Retry-After), fail a
share of requests with 500, and it records every request it saw so the suite
computes its ratios from what the server measured:

    python bench/server.py --latency-ms 300 --rpm 600 --tpm 100000 --error-rate 0.01

prints `PORT <n>` once listening. `GET /stats` returns the arrivals as
columns (arrival and answer times in `time.time()` seconds, inputs, tokens,
HTTP status, whether it was the pipeline's start-up probe); `POST /reset`
clears them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import random
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.probe import PROBE_TEXTS  # noqa: E402

WINDOW_S = 60.0  # what "per minute" means to the server: any 60 s of arrivals
DEFAULT_DIM = 1536
POOL_VECTORS = 2048  # distinct vectors per answer: as many as a request may hold


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.latency_s = args.latency_ms / 1000.0
        self.rpm: int | None = args.rpm
        self.tpm: int | None = args.tpm
        self.error_rate = args.error_rate
        self.rand = random.Random(args.seed)
        self.window: deque[tuple[float, int]] = deque()  # accepted (arrival, tokens)
        self.window_tokens = 0
        self.bodies: dict[tuple[int, int, str], bytes] = {}
        self.arrivals: list[tuple[float, float, int, int, int, bool]] = []
        self._enc = None
        if self.tpm is not None:
            from pipeline.texts import encoding

            self._enc = encoding()  # the client's own count: TPM means the same to both

    def tokens(self, texts: list[str]) -> int:
        if self._enc is None:
            return 0
        return sum(len(t) for t in self._enc.encode_ordinary_batch(texts))

    def body(self, n: int, dim: int, fmt: str) -> bytes:
        key = (n, dim, fmt)
        if key not in self.bodies:
            values = [self.value(i % POOL_VECTORS, dim, fmt) for i in range(n)]
            items = ",".join(f'{{"object":"embedding","index":{i},"embedding":{v}}}' for i, v in enumerate(values))
            usage = f'{{"prompt_tokens":{n},"total_tokens":{n}}}'
            text = f'{{"object":"list","data":[{items}],"model":"bench","usage":{usage}}}'
            if len(self.bodies) > 64:  # bounded: a run uses a handful of request sizes
                self.bodies.clear()
            self.bodies[key] = text.encode("ascii")
        return self.bodies[key]

    @staticmethod
    @functools.lru_cache(maxsize=2 * POOL_VECTORS)
    def value(i: int, dim: int, fmt: str) -> str:
        """The JSON of vector i: random, unit length, the same in every run (so
        parts compress like real vectors and a resumed job sees the same space)."""
        vec = np.random.default_rng(i).standard_normal(dim).astype("<f4")
        vec /= np.linalg.norm(vec)
        if fmt == "base64":
            return json.dumps(base64.b64encode(vec.tobytes()).decode("ascii"))
        return json.dumps(vec.tolist())

    def room(self, now: float, tokens: int) -> float:
        """0 when a request of `tokens` fits the window now, else seconds until it would."""
        while self.window and self.window[0][0] + WINDOW_S <= now:
            self.window_tokens -= self.window.popleft()[1]
        wait = 0.0
        if self.rpm is not None and len(self.window) + 1 > self.rpm:
            wait = self.window[len(self.window) - self.rpm][0] + WINDOW_S - now
        if self.tpm is not None and self.window_tokens + tokens > self.tpm:
            freed = 0
            for at, t in self.window:
                freed += t
                if self.window_tokens + tokens - freed <= self.tpm:
                    wait = max(wait, at + WINDOW_S - now)
                    break
        return wait

    async def embeddings(self, request: web.Request) -> web.Response:
        arrived = time.time()
        payload = json.loads(await request.read())
        texts = payload["input"]
        texts = [texts] if isinstance(texts, str) else texts
        probe = bool(texts) and texts[0] == PROBE_TEXTS[0]
        tokens = self.tokens(texts)
        status = 200
        if self.rpm is not None or self.tpm is not None:
            wait = self.room(time.monotonic(), tokens)
            if wait > 0:
                status = 429
            else:
                self.window.append((time.monotonic(), tokens))
                self.window_tokens += tokens
        if status == 200 and self.error_rate and self.rand.random() < self.error_rate:
            status = 500
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.arrivals.append((arrived, time.time(), len(texts), tokens, status, probe))
        if status == 429:
            err = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
            return web.json_response(err, status=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if status == 500:
            err = {"error": {"message": "The server had an error", "type": "server_error", "code": "internal_error"}}
            return web.json_response(err, status=500)
        dim = int(payload.get("dimensions") or DEFAULT_DIM)
        fmt = payload.get("encoding_format") or "float"
        return web.Response(body=self.body(len(texts), dim, fmt), content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        cols = list(zip(*self.arrivals)) if self.arrivals else [[]] * 6
        names = ("arrived", "answered", "inputs", "tokens", "status", "probe")
        return web.json_response({n: list(c) for n, c in zip(names, cols)})

    async def reset(self, request: web.Request) -> web.Response:
        self.arrivals.clear()
        return web.json_response({"ok": True})


async def serve(args: argparse.Namespace) -> None:
    bench = Bench(args)
    app = web.Application(client_max_size=256 << 20)
    app.router.add_post("/v1/embeddings", bench.embeddings)
    app.router.add_get("/stats", bench.stats)
    app.router.add_post("/reset", bench.reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    try:
        asyncio.run(serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
