"""Submitting batches: the one being built, those being uploaded, the open
ones, and the provider's queue.

A request line goes into the batch being built; a full batch (or one that
must go before the run waits for the queue) is *flushed*: its requests and a
`submitting` record are written to the checkpoint, its file uploaded, the
record given the file's id, the batch created (with our submission id in its
metadata), and the record marked `submitted`, all before anything waits on
it. A kill at any point of that is settled at the next start (`settle`): the
upload is found by its file name, the batch by its input file, so nothing is
paid twice. With `enqueued_tokens_limit` (or a queue learned from
`token_limit_exceeded`), the tokens of open batches stay under it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..checkpoint.batch_records import BatchRecord, BatchRequest
from ..config.job import JobConfig
from ..core import probe
from ..core.money import Spend
from ..engine.stopper import Stopper
from ..errors import EndpointMissingError, PipelineError, WorkLeftError
from ..providers.batch_api import RESULT_STATUSES, BatchClient
from ..storage.output import Output
from .files import BatchFile, BatchLimits, KeySet, poll_delay_s
from .state import delete_batch, read_records, write_record, write_requests

log = logging.getLogger("pipeline")

WAIT_CHECK_S = 0.2  # waits look at the stop flag this often
MAX_OPEN_BATCHES = 100  # bounds the pending keys held in memory (16 bytes a text) and the polls per interval


class Stopped(Exception):
    """The run is stopping: a task leaves what it was waiting for."""


class Waker:
    """The batch tasks wait for conditions on their shared state: any change
    wakes them to look again; a stopping run ends every wait."""

    def __init__(self, stop: Stopper) -> None:
        self.stop = stop
        self.parked = False  # --no-wait: a wait that is not ready ends the task instead (BatchRun._without_waiting)
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    def park(self) -> None:
        """From now on, a wait whose condition is not ready raises Stopped at once."""
        self.parked = True
        self.notify()

    async def wait(self, ready: Callable[[], bool], until: float = float("inf")) -> None:
        """Until `ready()` or the monotonic time `until`; Stopped when the run stops (or is parked)."""
        while not ready():
            if self.stop.stopping or self.parked:
                raise Stopped
            timeout = min(WAIT_CHECK_S, until - time.monotonic())
            if timeout <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass


@dataclass
class OpenBatch:
    record: BatchRecord
    requests: list[BatchRequest]
    keys: KeySet
    next_poll: float  # monotonic
    since: float  # monotonic time it was submitted or adopted

    @classmethod
    def of(cls, record: BatchRecord, requests: list[BatchRequest], next_poll: float) -> OpenBatch:
        return cls(record, requests, KeySet(b"".join(r.keys for r in requests)), next_poll, time.monotonic())


class Submitter:
    def __init__(self, job: JobConfig, output: Output, epoch: str, writer: str, client: BatchClient, spend: Spend,
                 waker: Waker, tmp: Path, *, needs_probe: Callable[[], bool], cursor: Callable[[], int]) -> None:
        cfg = job.batch_provider
        assert cfg is not None
        self.job, self.cfg, self.output, self.epoch, self.writer = job, cfg, output, epoch, writer
        self.client, self.spend, self.waker, self.tmp = client, spend, waker, tmp
        self.needs_probe = needs_probe  # the vector space is unchecked: new batches carry the probe line
        self.cursor = cursor  # the last unit examined, recorded with each batch (strategy.py keeps journals by it)
        self.open: dict[str, OpenBatch] = {}
        self.flushing: dict[str, BatchFile] = {}  # being uploaded and created: their texts are pending already
        self.file: BatchFile | None = None  # being built
        self.probe_sub: str | None = None  # the batch carrying the probe line
        self.learned_limit: int | None = None  # the provider's queue, learned from token_limit_exceeded
        self.stats: Counter[str] = Counter()  # for the summary: batches, lines and texts this run submitted

    @property
    def idle(self) -> bool:
        return not self.open and not self.flushing and self.file is None

    def pending(self, keys: list[bytes], probe_keys: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """For each batch holding any of `keys` (open, uploading or being built): its id and which keys."""
        for sub, batch in self.open.items():
            yield sub, batch.keys.contains(probe_keys)
        for file in [*self.flushing.values(), *([self.file] if self.file else [])]:
            yield file.sub, np.fromiter((k in file.keys for k in keys), dtype=bool, count=len(keys))

    # -- the queue ----------------------------------------------------------------------

    def queue_limit(self) -> int | None:
        limits = [x for x in (self.cfg.enqueued_tokens_limit, self.learned_limit) if x]
        return min(limits) if limits else None

    def enqueued(self) -> int:
        return sum(b.record.tokens for b in self.open.values()) + sum(f.tokens for f in self.flushing.values())

    def room_for(self, tokens: int) -> bool:
        limit = self.queue_limit()
        return limit is None or self.enqueued() + (self.file.tokens if self.file else 0) + tokens <= limit

    def queue_full(self, refused: BatchRecord, why: str) -> None:
        """A batch was refused for the queue: the queue holds what is running now
        (or, with nothing running, less than that batch); it goes again then."""
        others = self.enqueued() - refused.tokens
        self.learned_limit = max(others, refused.tokens) if others > 0 else refused.tokens // 2
        if self.learned_limit < self.job.embedding.max_input_tokens:
            raise WorkLeftError(f"{self.cfg.name}: the provider's batch queue takes fewer tokens than one text "
                                f"({why}); rerun later")
        log.info("%s: batch %s refused, the queue is full (%s); its texts go again once running batches finish "
                 "(queue taken as %s tokens)", self.cfg.name, refused.batch_id, why, f"{self.learned_limit:,}")

    # -- building -------------------------------------------------------------------------

    def _new_file(self) -> BatchFile:
        sub = uuid.uuid4().hex[:16]
        file = BatchFile(sub, self.tmp / f"{sub}.jsonl", str(self.cfg.model), self.job.embedding.dimensions,
                         BatchLimits(inputs=self.cfg.max_inputs_per_batch), self.cfg.extra_body.to_dict())
        if self.needs_probe() and self.probe_sub is None:
            file.add_probe(list(probe.PROBE_TEXTS))
            self.probe_sub = sub
        return file

    def probe_batch(self) -> str:
        """The batch that carries (or will carry) the probe line."""
        if self.probe_sub is None:
            if self.file is None:
                self.file = self._new_file()
            if self.probe_sub is None:
                self.file.add_probe(list(probe.PROBE_TEXTS))
                self.probe_sub = self.file.sub
        assert self.probe_sub is not None
        return self.probe_sub

    async def add(self, request: BatchRequest, texts: list[str]) -> str:
        """Put a request line in the batch being built (submitting that one first when
        full, and waiting for the provider's queue); returns the batch's submission id."""
        if self.file is not None and not self.file.fits(texts):
            await self.flush()
        if not self.room_for(request.tokens):
            await self.flush()
            await self.waker.wait(lambda: self.room_for(request.tokens))
        try:
            self.spend.hold(request.tokens)
        except PipelineError:
            await self.flush()  # what is built fits the budget: it goes, then the run stops
            raise
        self.file = self.file or self._new_file()
        self.file.add(request, texts)
        return self.file.sub

    # -- submitting -----------------------------------------------------------------------

    async def flush(self) -> None:
        """Submit the batch being built: recorded before anything waits on it."""
        file, self.file = self.file, None
        if file is None:
            return
        if self.waker.stop.stopping or not len(file):
            file.discard()
            if file.sub == self.probe_sub:
                self.probe_sub = None
            return
        self.flushing[file.sub] = file
        try:
            await self.waker.wait(lambda: len(self.open) + len(self.flushing) <= MAX_OPEN_BATCHES)
            record = BatchRecord(file.sub, self.writer, self.cfg.name, "submitting", _now(), len(file.requests),
                                 file.inputs, file.tokens, tuple(sorted(file.units)), self.cursor(), probe=file.probe)
            path = file.close()
            await asyncio.to_thread(write_requests, self.output, record, file.requests)
            await self._record(record)
            record = await self._record(replace(record, input_file_id=await self.client.upload(path, self._name(record))))
            info = await self.client.create(str(record.input_file_id), self._metadata(record))
            record = await self._record(replace(record, state="submitted", batch_id=info.id, status=info.status))
        finally:
            file.discard()
            self.flushing.pop(file.sub, None)
        log.info("%s: submitted batch %s: %s texts in %s lines, %s tokens", self.cfg.name, info.id,
                 f"{file.inputs:,}", f"{len(file):,}", f"{file.tokens:,}")
        self.stats.update(batches_submitted=1, lines=len(file.requests), inputs=file.inputs)
        self.open[file.sub] = OpenBatch.of(record, file.requests, time.monotonic() + poll_delay_s(0, self.cfg.poll_interval_s))
        self.waker.notify()

    async def _record(self, record: BatchRecord) -> BatchRecord:
        await asyncio.to_thread(write_record, self.output, record, self.epoch)
        return record

    def _name(self, record: BatchRecord) -> str:
        return f"{self.job.name}.{record.writer}.{record.sub}.jsonl"

    def _metadata(self, record: BatchRecord) -> dict[str, str]:
        return {"pipeline_job": self.job.name[:512], "pipeline_writer": record.writer, "pipeline_submission": record.sub}

    async def settle(self, record: BatchRecord) -> BatchRecord | None:
        """A kill came between recording a batch and learning its id: find what the
        provider has (the upload, the batch) and go on from there; None when nothing
        was created (its texts are missing again, and sent again)."""
        if record.input_file_id is None:
            found = await self.client.find_file(self._name(record))
            if found is not None:
                await self.client.delete_file(found)
            await asyncio.to_thread(delete_batch, self.output, record)
            return None
        info = await self.client.find_batch(record.input_file_id)
        if info is None:
            try:
                info = await self.client.create(record.input_file_id, self._metadata(record))
            except EndpointMissingError:  # the file is gone: nothing was created from it
                await asyncio.to_thread(delete_batch, self.output, record)
                return None
        else:
            log.info("%s: adopted batch %s, created by a run that stopped before recording it", self.cfg.name, info.id)
        return await self._record(replace(record, state="submitted", batch_id=info.id, status=info.status))

    def adopt(self, record: BatchRecord, requests: list[BatchRequest]) -> None:
        """An open batch of an earlier run: polled at once, its tokens in flight."""
        self.spend.in_flight(record.tokens)
        self.open[record.sub] = OpenBatch.of(record, requests, next_poll=0.0)
        if record.probe and self.needs_probe():
            self.probe_sub = record.sub

    def discard(self) -> None:
        for file in [*self.flushing.values(), *([self.file] if self.file else [])]:
            file.discard()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def warn_open_batches(output: Output, epoch: str) -> None:
    """A job without a batch provider over an output with batches still running."""
    running = [r for r in read_records(output, epoch) if r.open]
    if running:
        log.warning("%d batch(es) recorded by an earlier run are still open and this job has no openai_batch provider "
                    "to collect them: their texts are sent again (run with --restart and the batch provider to cancel them)",
                    len(running))


async def cancel_open_batches(output: Output, job: JobConfig, epoch: str) -> int:
    """--restart: cancel every recorded batch still running (and delete its input file); the count."""
    cfg = job.batch_provider
    records = [r for r in read_records(output, epoch) if r.open and r.input_file_id]
    if cfg is None:
        if records:
            warn_open_batches(output, epoch)
        return 0
    if not records:
        return 0
    client = BatchClient(cfg, job.retry)
    await client.start()
    cancelled = 0
    try:
        for record in records:
            batch_id = record.batch_id
            if batch_id is None:
                found = await client.find_batch(str(record.input_file_id))
                batch_id = found.id if found else None
            if batch_id is not None and (await client.get(batch_id)).status not in (*RESULT_STATUSES, "failed", "cancelling"):
                await client.cancel(batch_id)
                cancelled += 1
            if not cfg.keep_files:
                await client.delete_file(str(record.input_file_id))
    finally:
        await client.close()
    log.info("--restart: cancelled %d running batch(es) of the earlier progress", cancelled)
    return cancelled
