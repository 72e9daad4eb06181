"""A loopback OpenAI-compatible `/v1/embeddings` server for the benchmarks.

Runs in its own process (so its CPU is not the client's) and answers as a
real server does, at a real server's cost per answer: every input gets its
own vector, computed per request from a hash of its text (random-looking,
unit length, the same for the same text in every run, so parts compress like
real vectors and a resumed job sees the same vector space), encoded per
request as base64 (or floats, when asked) in a JSON body built per request.
No answer is prebuilt or reused.

It can add latency (fixed, plus an amount per 1,000 tokens of the request:
a real provider's time follows the request's size), enforce RPM and TPM over
a sliding 60-second window of arrivals (429 with Retry-After; with
`--limit-headers`, every answer states the window as OpenAI does:
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`), fail a share
of requests with 500, and it records every request it saw so the suite
computes its ratios from what the server measured:

    python bench/server.py --latency-ms 300 --latency-ms-per-1k-tokens 50 --rpm 600 --tpm 100000

prints `PORT <n>` once listening. Tokens are counted with cl100k (the
client's own tokenizer) when a limit or the latency depends on them, else
estimated as UTF-8 bytes / 4 (the server's CPU is the client's neighbour on a
small machine); `usage` reports that figure. `GET /stats` returns the
arrivals as columns (arrival and answer times in `time.time()` seconds,
inputs, tokens, HTTP status, whether it was the pipeline's start-up probe);
`POST /reset` clears them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
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
from pipeline.core.probe import PROBE_TEXTS  # noqa: E402

WINDOW_S = 60.0  # what "per minute" means to the server: any 60 s of arrivals
DEFAULT_DIM = 1536
BYTES_PER_TOKEN_ESTIMATE = 4  # when tokens are not counted: English prose averages about 4.3
# A 32-bit integer hash (lowbias32) of (text hash, position): each input's
# vector is computed from its text, vectorized over the request.
_GOLDEN = np.uint32(0x9E3779B9)
_MIX1, _MIX2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def vectors_for(texts: list[str], dim: int) -> np.ndarray:
    """One unit vector per text, from a hash of the text: float32 [n, dim]."""
    seeds = np.frombuffer(b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=4).digest() for t in texts),
                          dtype="<u4")
    x = seeds[:, None] ^ (np.arange(dim, dtype=np.uint32) * _GOLDEN)[None, :]
    x ^= x >> np.uint32(16)
    x *= _MIX1
    x ^= x >> np.uint32(15)
    x *= _MIX2
    x ^= x >> np.uint32(16)
    v = (x >> np.uint32(8)).astype(np.float32)
    v -= np.float32(2**23)  # centred: uniform in [-2^23, 2^23)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def answer_body(texts: list[str], dim: int, fmt: str, tokens: int) -> bytes:
    vecs = vectors_for(texts, dim)
    if fmt == "base64":
        values = ['"' + base64.b64encode(row.tobytes()).decode("ascii") + '"' for row in vecs.astype("<f4")]
    else:
        values = [json.dumps(row.tolist()) for row in vecs]
    items = ",".join(f'{{"object":"embedding","index":{i},"embedding":{v}}}' for i, v in enumerate(values))
    usage = f'{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}'
    return f'{{"object":"list","data":[{items}],"model":"bench","usage":{usage}}}'.encode("ascii")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.latency_s = args.latency_ms / 1000.0
        self.latency_s_per_token = args.latency_ms_per_1k_tokens / 1000.0 / 1000.0
        self.rpm: int | None = args.rpm
        self.tpm: int | None = args.tpm
        self.limit_headers = args.limit_headers
        self.error_rate = args.error_rate
        self.rand = random.Random(args.seed)
        self.window: deque[tuple[float, int]] = deque()  # accepted (arrival, tokens)
        self.window_tokens = 0
        self.arrivals: list[tuple[float, float, int, int, int, bool]] = []
        self._enc = None
        if self.tpm is not None or self.latency_s_per_token:
            from pipeline.inputs.texts import encoding

            self._enc = encoding()  # the client's own count: TPM means the same to both

    def tokens(self, texts: list[str]) -> int:
        if self._enc is None:
            return sum(len(t.encode("utf-8")) for t in texts) // BYTES_PER_TOKEN_ESTIMATE
        encode = self._enc.encode_ordinary
        return sum(len(encode(t)) for t in texts)

    def headers(self) -> dict[str, str]:
        """The key's window as OpenAI states it on an answer (none unless asked for)."""
        if not self.limit_headers or (self.rpm is None and self.tpm is None):
            return {}
        now = time.monotonic()
        self.room(now, 0)  # ages the window out
        reset = f"{max(0.0, self.window[-1][0] + WINDOW_S - now) if self.window else 0.0:.3f}s"
        headers = {}
        for kind, limit, used in (("requests", self.rpm, len(self.window)), ("tokens", self.tpm, self.window_tokens)):
            if limit is not None:
                headers.update({f"x-ratelimit-limit-{kind}": str(limit),
                                f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
                                f"x-ratelimit-reset-{kind}": reset})
        return headers

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
        latency = self.latency_s + self.latency_s_per_token * tokens
        if latency > 0:
            await asyncio.sleep(max(0.0, arrived + latency - time.time()))  # the time taken counting is part of it
        if status == 429:
            self.arrivals.append((arrived, time.time(), len(texts), tokens, status, probe))
            err = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
            return web.json_response(err, status=429,
                                     headers={"Retry-After": str(max(1, math.ceil(wait))), **self.headers()})
        if status == 500:
            self.arrivals.append((arrived, time.time(), len(texts), tokens, status, probe))
            err = {"error": {"message": "The server had an error", "type": "server_error", "code": "internal_error"}}
            return web.json_response(err, status=500)
        dim = int(payload.get("dimensions") or DEFAULT_DIM)
        body = answer_body(texts, dim, payload.get("encoding_format") or "float", tokens)
        self.arrivals.append((arrived, time.time(), len(texts), tokens, status, probe))
        return web.Response(body=body, content_type="application/json", headers=self.headers())

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
    parser.add_argument("--latency-ms-per-1k-tokens", type=float, default=0.0)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--limit-headers", action="store_true", help="state the key's window on every answer")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    try:
        asyncio.run(serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
