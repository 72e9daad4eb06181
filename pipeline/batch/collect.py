"""Polling open batches and collecting finished ones: their output and error
files, read line by line and joined to the requests by custom_id (lines
come in any order).

An answer is checked as a synchronous one is (the same decoder, one finite
vector per input, one length), then journaled and cached as it is read.
Every failure goes through errors.classify: a transient one (5xx, 429,
`batch_expired`, an answer that does not check out) leaves its texts missing,
to be sent again; a 400 on one text refuses it (journaled, as the
synchronous path does), on several has its unit's texts sent again one a
line; a bad key or model stops the provider. A request neither answered nor
refused counts as failed. A batch that failed validation for a full queue
(`token_limit_exceeded`) teaches the submitter the queue's size; another
failure counts as a failed attempt of all its lines.

Once its answers are journaled the batch is recorded `collected` (or
`failed`), then its requests file and the provider's files are deleted, and
the owner (strategy.py) takes the answers and looks again at the units
waiting on them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..cache.vectors import KEY_BYTES
from ..checkpoint.batch_records import BatchRecord, BatchRequest
from ..checkpoint.journal import JournalContents
from ..config.job import JobConfig
from ..core import probe
from ..core.money import Spend
from ..engine.progress import RunCounters
from ..errors import BadResponseError, ProviderError
from ..providers.base import check_vectors
from ..providers.batch_api import RESULT_STATUSES, BatchClient, BatchInfo
from ..providers.classify import classify
from ..storage.output import Output
from .files import PROBE_ID, poll_delay_s, request_index, results
from .state import BatchJournal, delete_requests, write_record
from .submit import OpenBatch, Stopped, Submitter, Waker

log = logging.getLogger("pipeline")

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


class Owner(Protocol):
    """What the collector needs of the run it serves (strategy.BatchStrategy)."""

    space_checked: bool  # the one-vector-space probe passed
    dim: int

    def finished(self) -> bool: ...
    async def check_space(self, vectors: np.ndarray) -> None: ...
    async def closed(self, record: BatchRecord, contents: JournalContents | None) -> None: ...


class Collector:
    def __init__(self, owner: Owner, job: JobConfig, output: Output, epoch: str, client: BatchClient,
                 submit: Submitter, waker: Waker, spend: Spend, counters: RunCounters, *, decode: Decode,
                 store: Store) -> None:
        cfg = job.batch_provider
        assert cfg is not None
        self.owner, self.job, self.cfg, self.output, self.epoch = owner, job, cfg, output, epoch
        self.client, self.submit, self.waker, self.spend, self.counters = client, submit, waker, spend, counters
        self.decode, self.store = decode, store
        self.stats: Counter[str] = Counter()  # polls, batches collected and failed, tokens, failures by kind
        self.last_error: str | None = None  # what the last failed line or batch said

    async def poll(self) -> None:
        """Until the run is finished: look at each open batch when it is due."""
        while not self.owner.finished():
            for batch in self._pollable():
                if batch.next_poll <= time.monotonic():
                    if self.waker.stop.stopping:
                        raise Stopped
                    await self._look(batch)
            due = self._next_poll()
            await self.waker.wait(lambda: self.owner.finished() or self._next_poll() < due, until=due)

    async def poll_once(self) -> None:
        """--no-wait: look once at each open batch (the probe's first, while the vector
        space is unchecked), whether due or not; collect those that finished."""
        looked: set[str] = set()
        while todo := [b for b in self._pollable() if b.record.sub not in looked]:
            for batch in todo:
                if self.waker.stop.stopping:
                    raise Stopped
                looked.add(batch.record.sub)
                if batch.record.sub in self.submit.open:
                    await self._look(batch)

    def _next_poll(self) -> float:
        return min((b.next_poll for b in self._pollable()), default=float("inf"))

    def _pollable(self) -> list[OpenBatch]:
        """Open batches; while the vector space is unchecked, only the probe's: nothing is collected before it."""
        return [b for s, b in self.submit.open.items() if self.owner.space_checked or s == self.submit.probe_sub]

    async def _look(self, batch: OpenBatch) -> None:
        assert batch.record.batch_id is not None
        info = await self.client.get(batch.record.batch_id)
        self.stats["polls"] += 1
        if (info.status, info.request_counts) != (batch.record.status, batch.record.request_counts):
            batch.record = replace(batch.record, status=info.status, request_counts=info.request_counts)
            await asyncio.to_thread(write_record, self.output, batch.record, self.epoch)  # for `status`
        if info.status in RESULT_STATUSES:
            await self._collect(batch, info)
        elif info.status == "failed":
            await self._refused(batch, info)
        else:
            batch.next_poll = time.monotonic() + poll_delay_s(time.monotonic() - batch.since, self.cfg.poll_interval_s)

    async def _collect(self, batch: OpenBatch, info: BatchInfo) -> None:
        """Journal the answers, check the failures, then mark the batch collected and tidy up."""
        journal = BatchJournal(self.output, batch.record)
        await asyncio.to_thread(journal.reset)  # a collection a kill cut short starts again
        outcome = Outcome(len(batch.requests))
        paths = await download(self.client, self.submit.tmp, info)
        try:
            if batch.record.probe and not self.owner.space_checked:
                vectors = await asyncio.to_thread(probe_vectors, paths, self.decode, self.job.embedding.dimensions,
                                                  self.cfg.name)
                if vectors is None:  # its probe line failed: the probe goes again, alone; this batch waits for it
                    log.info("%s: the probe line of batch %s failed; sending it again", self.cfg.name, info.id)
                    self.submit.probe_sub = None
                    self.submit.probe_batch()
                    await self.submit.flush()
                    batch.next_poll = time.monotonic() + self.cfg.poll_interval_s
                    return
                await self.owner.check_space(vectors)
            await asyncio.to_thread(read_results, paths, batch.requests, journal, outcome, decode=self.decode,
                                    dim=self.owner.dim, provider=self.cfg.name, store=self.store)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)
        if outcome.unusable is not None:
            raise outcome.unusable
        outcome.unseen(batch.requests)
        record = replace(batch.record, state="collected", status=info.status, request_counts=info.request_counts,
                         answered=tuple(sorted(outcome.answered.items())), failed=tuple(sorted(outcome.failed.items())),
                         isolate=tuple(sorted(outcome.isolate)), error=outcome.error)
        record = await self._tidy(record, info)
        paid = sum(outcome.answered.values())
        self.spend.settle(record.tokens, paid)
        self.counters.tokens += paid
        self.stats.update(batches_collected=1, tokens=paid, usage_tokens=outcome.usage)
        self.stats.update({f"failures_{kind}": n for kind, n in outcome.kinds.items()})
        log.info("%s: collected batch %s (%s): %s of %s lines answered, %s tokens", self.cfg.name, info.id, info.status,
                 f"{len(batch.requests) - outcome.lines_failed:,}", f"{len(batch.requests):,}", f"{paid:,}")
        if outcome.lines_failed:
            self.last_error = outcome.error
            log.warning("%s: batch %s (%s): %d line(s) not answered; their texts are sent again (last: %s)",
                        self.cfg.name, info.id, info.status, outcome.lines_failed, outcome.error)
        await self.owner.closed(record, await asyncio.to_thread(journal.read, self.owner.dim))

    async def _refused(self, batch: OpenBatch, info: BatchInfo) -> None:
        """Failed at validation: a full queue is waited out (and learned); anything
        else counts as a failed attempt of every line."""
        errors, queue_full = batch_errors(info, self.cfg.name)
        for err in errors:
            if err.kind == "unusable":
                raise err
        failed: dict[int, int] = {}
        if queue_full:
            self.submit.queue_full(batch.record, str(errors[0]))
            self.stats["queue_full"] += 1
        else:
            for request in batch.requests:
                failed[request.unit] = max(failed.get(request.unit, 0), request.attempt)
            self.last_error = str(errors[0])
            log.warning("%s: batch %s failed (%s); its texts are sent again", self.cfg.name, info.id, errors[0])
        record = replace(batch.record, state="failed", status=info.status, request_counts=info.request_counts,
                         failed=tuple(sorted(failed.items())), error=str(errors[0]))
        record = await self._tidy(record, info)
        self.spend.settle(record.tokens, 0)
        self.stats["batches_failed"] += 1
        if record.sub == self.submit.probe_sub:
            self.submit.probe_sub = None  # the next batch carries the probe
        await self.owner.closed(record, None)

    async def _tidy(self, record: BatchRecord, info: BatchInfo) -> BatchRecord:
        """The batch is closed in the checkpoint, then its requests and the provider's
        files go (the record names them until they are gone: a kill halfway is tidied
        by the next run)."""
        files = () if self.cfg.keep_files else tuple(f for f in (info.input_file_id, info.output_file_id,
                                                                    info.error_file_id) if f)
        record = replace(record, files=files)
        await asyncio.to_thread(write_record, self.output, record, self.epoch)
        await asyncio.to_thread(delete_requests, self.output, record)
        return await delete_files(self.client, self.output, self.epoch, record)


async def delete_files(client: BatchClient, output: Output, epoch: str, record: BatchRecord) -> BatchRecord:
    """Delete a closed batch's files from the provider, then from its record."""
    if not record.files:
        return record
    for file_id in record.files:
        await client.delete_file(file_id)
    record = replace(record, files=())
    await asyncio.to_thread(write_record, output, record, epoch)
    return record
