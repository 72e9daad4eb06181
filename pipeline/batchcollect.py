"""Collecting a finished batch: its output and error files, read line by line
and joined to its requests by custom_id (lines come in any order).

An answer is checked as a synchronous one is (the same decoder, one finite
vector per input, one length), then journaled and cached as it is read.
Every failure goes through errors.classify: a transient one (5xx, 429,
`batch_expired`, an answer that does not check out) leaves its texts missing,
to be sent again; a 400 on one text refuses it (journaled, as the
synchronous path does), on several has its unit's texts sent again one a
line; a bad key or model stops the provider. A request neither answered nor
refused counts as failed.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import probe
from .batchfile import PROBE_ID, request_index, results
from .batchstate import BatchJournal
from .cache import KEY_BYTES
from .errors import BadResponseError, ProviderError, classify
from .providers.base import check_vectors
from .providers.batch_api import BatchClient, BatchInfo
from .records import BatchRequest

Decode = Callable[[Any, int], np.ndarray]  # an answer's body, its inputs -> float32 [n, dim]
Store = Callable[[list[bytes], np.ndarray], None]


class Outcome:
    """What a batch's result files said, line by line."""

    def __init__(self, n: int) -> None:
        self.done = np.zeros(n, dtype=bool)  # answered or refused
        self.seen = np.zeros(n, dtype=bool)  # had a line in the result files
        self.answered: Counter[int] = Counter()  # unit -> tokens of its answered lines
        self.failed: dict[int, int] = {}  # unit -> highest attempt of its failed lines
        self.isolate: set[int] = set()  # units with a refused line of several texts
        self.kinds: Counter[str] = Counter()  # failed lines by kind
        self.usage = 0  # tokens the provider says it billed
        self.error: str | None = None  # the last failure, for the log and the record
        self.unusable: ProviderError | None = None

    def answer(self, i: int, request: BatchRequest, body: Any) -> None:
        self.done[i] = True
        self.answered[request.unit] += request.tokens
        usage = body.get("usage") if isinstance(body, dict) else None
        billed = usage.get("total_tokens", usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        self.usage += billed if isinstance(billed, int) else 0

    def fail(self, request: BatchRequest, kind: str, why: str) -> None:
        self.failed[request.unit] = max(self.failed.get(request.unit, 0), request.attempt)
        self.kinds[kind] += 1
        self.error = why

    def unseen(self, requests: list[BatchRequest]) -> None:
        """Requests without a line in either file failed (a cancelled batch's, or lost)."""
        for i in np.flatnonzero(~self.seen):
            self.fail(requests[i], "transient", "no result line for the request")

    @property
    def lines_failed(self) -> int:
        return int(np.count_nonzero(~self.done))


async def download(client: BatchClient, folder: Path, info: BatchInfo) -> list[Path]:
    """The batch's output and error files, on local disk (the caller deletes them)."""
    paths = []
    for file_id in (info.output_file_id, info.error_file_id):
        if file_id:
            path = folder / f"{info.id}-{file_id}.jsonl"
            paths.append(path)
            await client.download(file_id, path)
    return paths


def probe_vectors(paths: list[Path], decode: Decode, dimensions: int | None, provider: str) -> np.ndarray | None:
    """The probe line's vectors, checked as any answer; None when it failed."""
    n = len(probe.PROBE_TEXTS)
    for path in paths:
        for line in results(path):
            if line.custom_id == PROBE_ID and line.ok:
                try:
                    vectors = decode(line.body, n)
                    check_vectors(vectors, n, dimensions, provider)
                except BadResponseError:
                    return None
                return vectors
    return None


def read_results(paths: list[Path], requests: list[BatchRequest], journal: BatchJournal, outcome: Outcome, *,
                 decode: Decode, dim: int, provider: str, store: Store) -> None:
    """Every line of the result files (blocking: run it in a worker thread)."""
    index = request_index(requests)
    for path in paths:
        for line in results(path):
            i = index.get(line.custom_id)
            if i is None or outcome.seen[i]:
                continue  # the probe line, or one we cannot place
            outcome.seen[i] = True
            request = requests[i]
            keys = [request.keys[k:k + KEY_BYTES] for k in range(0, len(request.keys), KEY_BYTES)]
            if line.ok:
                try:
                    vectors = decode(line.body, len(keys))  # the synchronous answers' own decoder
                    check_vectors(vectors, len(keys), dim, provider)
                except BadResponseError as bad:
                    outcome.fail(request, bad.kind, str(bad))
                    continue
                journal.answered(keys, vectors, request.tokens)  # paid: kept before anything else
                store(keys, vectors)
                outcome.answer(i, request, line.body)
                continue
            err = classify(provider=provider, status=line.status, body=line.error_body())
            if err.kind == "unusable":
                outcome.unusable = err
            elif err.kind == "bad_input" and len(keys) == 1:
                code = err.code or (str(err.status) if err.status else None)
                journal.refused(keys[0], code)
                outcome.done[i] = True
            elif err.kind == "bad_input":
                outcome.isolate.add(request.unit)  # its texts go again one a line: the refused one is found
                outcome.kinds[err.kind] += 1
            else:
                outcome.fail(request, err.kind, str(err))


def batch_errors(info: BatchInfo, provider: str) -> tuple[list[ProviderError], bool]:
    """Why a batch failed validation (classified), and whether it was for a full queue."""
    errors = [classify(provider=provider, body={"error": {"code": code, "message": message}})
              for code, message in info.errors] or [classify(provider=provider, body="the batch failed validation")]
    return errors, any(err.kind == "rate_limited" for err in errors)
