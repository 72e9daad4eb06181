"""`type: openai_batch`: a job's texts go through the Files + Batches API, at half price.

Batches fill journals; units finish from them. Three tasks share the state:

- *first sight* walks the units this writer owns and has not committed, in
  order, once. *Examining* a unit prepares its texts as a slice does, keys
  them, and sorts each distinct key: answered (its own journal, a collected
  batch's, the cache), pending in a batch (open, being uploaded, or being
  built: in-run dedupe), or missing. Missing ones go into the batch being
  built, a request per line holding texts of that one unit. A unit with
  nothing pending is finished at once through units.py, the synchronous
  path's own code, with the answers as its `Known`: output bit-identical.
- the *poller* polls open batches and collects finished ones: their answers
  go to the batch's journal and the cache, failures are classified; then the
  batch is marked collected in the checkpoint and its files deleted.
- *rechecks* examine again the units whose batches were collected: finished
  when all is answered, their failed texts sent again otherwise (the one rule
  for resubmission: missing, and pending nowhere).

A batch is recorded before anything waits on it (records.py: `submitting`
before the upload and the create, then `submitted`); a record left at
`submitting` by a kill is settled at the next start by listing the
provider's files and batches (the metadata names our submission), so
nothing submitted is submitted again. A collected batch's journal is kept
until every unit that used it is committed.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import layout, probe, sink
from .batchfile import PROBE_ID, BatchFile, BatchLimits, KeySet, custom_id, keys_array, poll_delay_s, request_index, results
from .batchstate import (Answers, BatchJournal, UnitKnown, delete_batch, delete_requests, orphan_files, read_records,
                         read_requests, write_record, write_requests)
from .budget import MemoryBudget
from .cache import KEY_BYTES, Cache, text_keys
from .config import JobConfig
from .errors import BadResponseError, EndpointMissingError, PipelineError, ProviderError, WorkLeftError, classify
from .journal import Journal, JournalContents
from .manifest import Checkpoint
from .packing import pack
from .progress import RunCounters
from .providers.base import check_vectors
from .providers.batch_api import RESULT_STATUSES, BatchClient, BatchInfo
from .providers.openai import OpenAIProvider
from .records import BatchRecord, BatchRequest
from .reuse import first_pieces
from .sources import InputFile, Unit, iter_units
from .spend import Spend
from .stopper import Stopper
from .storage import Output, private_temp_dir
from .texts import encoding, prepare, row_texts
from .units import UnitWork

log = logging.getLogger("pipeline")

WAIT_CHECK_S = 0.2  # waits look at the stop flag this often
MAX_OPEN_BATCHES = 100  # bounds the pending keys held in memory (16 bytes a text) and the polls per interval


class _Stopped(Exception):
    """The run is stopping: a task leaves what it was waiting for."""


@dataclass
class _Open:
    record: BatchRecord
    requests: list[BatchRequest]
    keys: KeySet
    next_poll: float
    since: float  # monotonic time it was submitted or adopted


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class BatchRun:
    def __init__(self, job: JobConfig, output: Output, checkpoint: Checkpoint, *, files: list[InputFile],
                 shard: layout.Shard | None, limit: int | None, stop: Stopper, counters: RunCounters,
                 cache: Cache | None, spend: Spend, vectors: MemoryBudget, sync: OpenAIProvider,
                 make_units: Callable[[int], UnitWork]) -> None:
        cfg = job.batch_provider
        assert cfg is not None
        self.job, self.cfg, self.output, self.checkpoint = job, cfg, output, checkpoint
        self.files, self.shard, self.limit = files, shard, limit
        self.stop, self.counters, self.cache, self.spend, self.vectors = stop, counters, cache, spend, vectors
        self.sync = sync  # the synchronous endpoint: the probe, and the one decoder of answers
        self.make_units = make_units
        self.client = BatchClient(cfg, job.retry)
        self.writer = layout.writer_name(shard)
        self.dim = 0
        self.units: UnitWork | None = None
        self.space_checked = False  # the one-vector-space probe passed (synchronously, or in a batch)
        self.probe_sub: str | None = None  # the batch carrying the probe line
        self.open: dict[str, _Open] = {}
        self.flushing: dict[str, BatchFile] = {}  # being uploaded and created: their texts are pending already
        self.file: BatchFile | None = None  # being built
        self.live: dict[str, BatchRecord] = {}  # collected or failed, kept while their units are not all committed
        self.answers = Answers()
        self.earlier: set[str] = set()  # kept batches an earlier run collected (their rows count as from the journal)
        self.paid: Counter[int] = Counter()  # unit -> tokens of its answered lines in kept batches
        self.waits: dict[int, set[str]] = {}  # unit -> batches it waits on
        self.waiters: dict[str, set[int]] = {}
        self.users: dict[str, set[int]] = {}  # kept batch -> uncommitted units that took answers from it
        self.uses: dict[int, set[str]] = {}
        self.recheck: set[int] = set()
        self.rechecking = False
        self.attempts: dict[int, int] = {}  # unit -> the highest attempt of its failed lines
        self.isolate: set[int] = set()
        self.cursor = -1  # the last unit first sight examined
        self.first_done = False
        self.gate = -1  # journals are kept until first sight passes the units earlier runs examined
        self.deferred: set[str] = set()
        self.learned_limit: int | None = None  # the provider's queue, learned from token_limit_exceeded
        self.stats: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._submitting = asyncio.Lock()  # one unit's texts are sorted and added at a time: each text once
        self._unit_tasks: set[asyncio.Task[None]] = set()
        self._tmp: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reason: str | None = None  # why the provider cannot be used, for the summary
        self.last_error: str | None = None  # what the last failed line or batch said

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        self._tmp = private_temp_dir("batch")
        self._loop = asyncio.get_running_loop()
        await self.client.start()
        try:
            await self._probe()
            await self._adopt()
            if not self.space_checked and self.probe_sub is None and self.open:
                self._probe_batch()  # batches of earlier runs wait for it: it goes first, alone
                await self._flush()
            tasks = [asyncio.ensure_future(self._guard(work)) for work in
                     (self._first_sight(), self._rechecks(), self._poll())]
            for task in tasks:
                self.stop.track(task)
            try:
                await asyncio.wait(tasks)
            finally:
                if self.stop.stopping:
                    self.stop.start_grace()
                for outcome in await asyncio.gather(*self._unit_tasks, return_exceptions=True):
                    if isinstance(outcome, PipelineError):
                        self.stop.fail(outcome)
        finally:
            for file in [*self.flushing.values(), *([self.file] if self.file else [])]:
                file.discard()
            await self.client.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except _Stopped:
            pass
        except ProviderError as err:
            self.stop.fail(self._provider_failed(err))
        except PipelineError as err:
            self.stop.fail(err)
        except OSError as err:
            self.stop.fail(WorkLeftError(f"cannot write to {self.output}: {err.strerror or err}; what is done is kept, "
                                         f"fix it and rerun to continue"))
        except asyncio.CancelledError:
            self.stop.fail(WorkLeftError("stopped while batches were being submitted or collected; rerun to continue"))
        except Exception as err:  # a bug: stop cleanly, keep what is done, say so
            log.debug("batch task failed", exc_info=True)
            self.stop.fail(WorkLeftError(f"internal error in batches: {type(err).__name__}: {err}"))
        finally:
            self._notify()

    def _provider_failed(self, err: ProviderError) -> WorkLeftError:
        if err.kind == "unusable":
            self.reason = str(err).removeprefix(f"{self.cfg.name}: ")
            return WorkLeftError(f"no provider can take work ({self.cfg.name}: {self.reason})")
        return WorkLeftError(f"{err}; every batch submitted is recorded: rerun to continue")

    def _finished(self) -> bool:
        return (self.first_done and not self.recheck and not self.rechecking and not self.waits and not self.open
                and not self.flushing and not self.file)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait(self, ready: Callable[[], bool], until: float | None = None) -> None:
        """Until `ready()` (or, with `until`, that monotonic time); _Stopped when the run stops."""
        while not ready():
            if self.stop.stopping:
                raise _Stopped
            timeout = min(WAIT_CHECK_S, (until or float("inf")) - time.monotonic())
            if timeout <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # -- the vector space ---------------------------------------------------------------

    async def _probe(self) -> None:
        """The synchronous /embeddings of the same base_url embeds the probe texts;
        without one (404), the first batch carries them as a line of its own."""
        try:
            answer = await self.client.retrying(lambda: self.sync.embed(list(probe.PROBE_TEXTS)), "the start-up probe")
        except EndpointMissingError:
            log.info("%s: no synchronous /embeddings; the first batch carries the probe texts", self.cfg.name)
            if self.checkpoint.meta.get("dimensions"):
                self._learn_dim(int(self.checkpoint.meta["dimensions"]))
            return
        except ProviderError as err:
            self.reason = f"start-up probe failed: {err.message or err.kind}"
            raise WorkLeftError(f"no provider can take work ({self.cfg.name}: {self.reason})") from None
        await self._check_space(answer.vectors)

    async def _check_space(self, vectors: np.ndarray) -> None:
        recorded = self.checkpoint.meta.get("probes")
        if recorded and (why := probe.mismatch(probe.decode(recorded), vectors)) is not None:
            self.reason = why
            raise WorkLeftError(f"no provider can take work ({self.cfg.name}: {why})")
        if not recorded:
            await asyncio.to_thread(self.checkpoint.learn, dimensions=int(vectors.shape[1]), probes=probe.encode(vectors))
        self._learn_dim(int(vectors.shape[1]))
        self.space_checked = True

    def _learn_dim(self, dim: int) -> None:
        if not self.dim:
            self.dim = dim
            self.units = self.make_units(dim)

    # -- start: what earlier runs left ---------------------------------------------------

    async def _adopt(self) -> None:
        """Take over this writer's recorded batches (the unsharded run takes every writer's)."""
        records = await asyncio.to_thread(read_records, self.output, self.checkpoint.epoch,
                                          None if self.shard is None else self.writer)
        for rel in await asyncio.to_thread(orphan_files, self.output, None if self.shard is None else self.writer, records):
            await asyncio.to_thread(self.output.delete_log if rel.endswith(".journal") else self.output.delete, rel)
        for record in records:
            self.gate = max(self.gate, record.examined_through, *record.units)
            if record.state == "submitting":
                record = await self._settle_submission(record)
                if record is None:
                    continue
            if record.state == "submitted":
                await self._adopt_open(record)
            else:
                await self._keep(record)
        for sub in list(self.live):
            await self._release(sub)

    async def _settle_submission(self, record: BatchRecord) -> BatchRecord | None:
        """A kill came between recording a batch and learning its id: find what
        the provider has (the upload, the batch) and go on from there."""
        if record.input_file_id is None:
            found = await self.client.find_file(self._file_name(record))
            if found is not None:
                await self.client.delete_file(found)
            await asyncio.to_thread(delete_batch, self.output, record)
            return None  # never created: its texts are missing again, and sent again
        info = await self.client.find_batch(record.input_file_id)
        if info is None:
            try:
                info = await self.client.create(record.input_file_id, self._metadata(record))
            except EndpointMissingError:  # the file is gone: nothing was created from it
                await asyncio.to_thread(delete_batch, self.output, record)
                return None
        else:
            log.info("%s: adopted batch %s, created by a run that stopped before recording it", self.cfg.name, info.id)
        record = replace(record, state="submitted", batch_id=info.id, status=info.status)
        await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
        return record

    async def _adopt_open(self, record: BatchRecord) -> None:
        try:
            requests = await asyncio.to_thread(read_requests, self.output, record)
        except (FileNotFoundError, ValueError):
            log.warning("%s: batch %s has lost its requests file; cancelled, its texts are sent again",
                        self.cfg.name, record.batch_id)
            if record.batch_id:
                await self.client.cancel(record.batch_id)
            await asyncio.to_thread(delete_batch, self.output, record)
            return
        self.spend.in_flight(record.tokens)
        self.open[record.sub] = _Open(record, requests, KeySet(b"".join(r.keys for r in requests)),
                                      next_poll=0.0, since=time.monotonic())
        if record.probe and not self.space_checked:
            self.probe_sub = record.sub

    async def _keep(self, record: BatchRecord) -> None:
        """A collected (or failed) batch whose units are not all committed yet."""
        if record.state == "collected":
            if not self.dim:  # cannot happen: collecting learns the vector length
                log.warning("%s: batch %s was collected before the vector length was known; its texts are sent again",
                            self.cfg.name, record.batch_id)
                await asyncio.to_thread(delete_batch, self.output, record)
                return
            await asyncio.to_thread(delete_requests, self.output, record)
            contents = await asyncio.to_thread(BatchJournal(self.output, record).read, self.dim)
            self.answers.add(record.sub, contents)
            self.earlier.add(record.sub)
        self.live[record.sub] = record
        for unit, tokens in record.answered:
            self.paid[unit] += tokens
        for unit, attempt in record.failed:
            self.attempts[unit] = max(self.attempts.get(unit, 0), attempt)
        self.isolate.update(record.isolate)

    # -- first sight and rechecks ---------------------------------------------------------

    def _wanted(self, seq: int) -> bool:
        return layout.owns(self.shard, seq) and not self.checkpoint.is_done(seq)

    def _end(self, unit: Unit) -> int:
        return unit.table.num_rows if self.limit is None else min(unit.table.num_rows, self.limit - unit.row_offset)

    async def _first_sight(self) -> None:
        totals: dict[str, int] = {}
        units = iter_units(self.files, self.job.input, self.job.output.rows_per_part, self._wanted, totals)
        while not self.stop.stopping:
            unit = await asyncio.to_thread(next, units, None)
            if unit is None or (self.limit is not None and unit.row_offset >= self.limit):
                break
            if unit.seq >= 10 ** self.checkpoint.part_digits:
                raise WorkLeftError(f"output.rows_per_part: {self.job.output.rows_per_part} makes more parts than "
                                    f"this output's names allow; raise it and rerun with --restart")
            await self._examine(unit)
            self.cursor = unit.seq
            if self.deferred and self.cursor >= self.gate:
                for sub in list(self.deferred):
                    await self._release(sub)
        if self.stop.stopping:
            return
        if totals and self.checkpoint.meta.get("total_units") != totals["units"]:
            await asyncio.to_thread(self.checkpoint.learn, total_units=totals["units"], total_rows=totals["rows"])
        self.first_done = True
        for sub in list(self.deferred):
            await self._release(sub)
        await self._flush_if_idle()

    async def _rechecks(self) -> None:
        while True:
            await self._wait(lambda: bool(self.recheck) or self._finished())
            if not self.recheck:
                return
            seqs, self.recheck = self.recheck, set()
            self.rechecking = True
            try:
                wanted = [s for s in sorted(seqs) if self._wanted(s)]
                if wanted:
                    units = iter_units(self.files, self.job.input, self.job.output.rows_per_part,
                                       lambda s: s in seqs and self._wanted(s))
                    while not self.stop.stopping and (unit := await asyncio.to_thread(next, units, None)) is not None:
                        if unit.seq > wanted[-1]:
                            break
                        await self._examine(unit)
            finally:
                self.rechecking = False
            await self._flush_if_idle()

    async def _examine(self, unit: Unit) -> None:
        """Finish the unit if every text is answered; else send what is missing and wait."""
        seq, end = unit.seq, self._end(unit)
        earlier = self.checkpoint.partial(seq)
        if end <= 0 or (earlier is not None and earlier.rows >= end):
            return
        table = unit.table.slice(0, end)
        ids = sink.id_array(table, self.job, unit.row_offset).to_pylist()
        prepared = await asyncio.to_thread(prepare, row_texts(table, self.job.input), self.job.embedding, ids)
        keys = text_keys(prepared.pieces, self.job.embedding.model, self.job.embedding.dimensions)
        first_of, _ = first_pieces(keys)
        own = await asyncio.to_thread(Journal(self.output, seq, self.dim).read) if self.dim else JournalContents(dim=0)
        todo = [i for k, i in first_of.items() if k not in own and k not in own.refused]
        cached = await self._cached([keys[i] for i in todo if not self._answered(keys[i])])
        unknown = self._unanswered(seq, keys, [i for i in todo if keys[i] not in cached])
        if unknown:
            async with self._submitting:  # from here to each registration, no await: nothing collected is missed
                missing = self._pending(seq, keys, self._unanswered(seq, keys, unknown))
                if missing:
                    await self._submit(seq, prepared, keys, missing)
        if not self.space_checked:  # answers wait for the probe line's check
            self._wait_on(seq, {self._probe_batch()})
        if not self.waits.get(seq):
            await self._finish(unit, end, own)

    def _answered(self, key: bytes) -> bool:
        return key in self.answers or key in self.answers.refused

    def _unanswered(self, seq: int, keys: list[bytes], pieces: list[int]) -> list[int]:
        """The pieces no kept batch answers; the unit keeps the batches that answer the others."""
        self._use(seq, {s for i in pieces if (s := self.answers.batch_of(keys[i])) is not None})
        return [i for i in pieces if not self._answered(keys[i])]

    async def _cached(self, keys: list[bytes]) -> set[bytes]:
        if self.cache is None or not keys:
            return set()
        if self.units is not None:
            return await self.units.embedder.reuse.cached(keys)
        try:  # no vector length yet: any stored vector will do to decide what to submit
            return await asyncio.to_thread(self.cache.contains, keys)
        except Exception:  # noqa: BLE001 - the cache's own errors are reported when it is read for real
            return set()

    def _pending(self, seq: int, all_keys: list[bytes], pieces: list[int]) -> list[int]:
        """Wait on the batches that already hold some of these pieces' texts; the pieces of the others."""
        keys = [all_keys[i] for i in pieces]
        probe_keys = keys_array(keys)
        left = np.ones(len(keys), dtype=bool)
        sets: list[tuple[str, Any]] = [(s, o.keys) for s, o in self.open.items()]
        sets += [(s, f.keys) for s, f in self.flushing.items()] + ([(self.file.sub, self.file.keys)] if self.file else [])
        for sub, pending in sets:
            if isinstance(pending, KeySet):
                hit = pending.contains(probe_keys) & left
            else:
                hit = np.fromiter((k in pending for k in keys), dtype=bool, count=len(keys)) & left
            if hit.any():
                self._wait_on(seq, {sub})
                left &= ~hit
        return [pieces[j] for j in np.flatnonzero(left)]

    async def _submit(self, seq: int, prepared: Any, keys: list[bytes], pieces: list[int]) -> None:
        attempt = self.attempts.get(seq, 0) + 1
        if attempt > self.job.retry.max_attempts:
            raise WorkLeftError(f"texts of part {seq} failed in {attempt - 1} batches (retry.max_attempts); "
                                f"last: {self.last_error or 'no answer'}")
        max_inputs, max_tokens = self.job.request_limits()
        limit = self._queue_limit()
        order = np.asarray(pieces, dtype=np.int64)
        slices = pack(prepared.piece_tokens[order], prepared.piece_bytes[order],
                      max_inputs=1 if seq in self.isolate else max_inputs,
                      max_tokens=min(max_tokens, limit) if limit else max_tokens)
        for a, b in slices:
            chosen = order[a:b]
            request = BatchRequest(seq, attempt, int(prepared.piece_tokens[chosen].sum()),
                                   b"".join(keys[i] for i in chosen))
            sub = await self._add(request, [prepared.pieces[i] for i in chosen])
            self._wait_on(seq, {sub})
            self.stats["lines_resubmitted" if attempt > 1 else "lines_submitted_first"] += 1

    def _use(self, seq: int, subs: set[str]) -> None:
        for sub in subs:
            self.users.setdefault(sub, set()).add(seq)
            self.uses.setdefault(seq, set()).add(sub)

    def _wait_on(self, seq: int, subs: Iterable[str]) -> None:
        for sub in subs:
            self.waits.setdefault(seq, set()).add(sub)
            self.waiters.setdefault(sub, set()).add(seq)

    def _probe_batch(self) -> str:
        """The batch that carries (or will carry) the probe line."""
        if self.probe_sub is None:
            if self.file is None:
                self.file = self._new_file()
            else:
                self.file.add_probe(list(probe.PROBE_TEXTS))
                self.probe_sub = self.file.sub
        assert self.probe_sub is not None
        return self.probe_sub

    async def _finish(self, unit: Unit, end: int, own: JournalContents) -> None:
        """Write and commit the unit through the synchronous path's code, from the answers."""
        assert self.units is not None
        self.waits.pop(unit.seq, None)
        known = UnitKnown(own, self.answers, own.tokens + self.paid[unit.seq], self.earlier)
        slices, reservations = self.units.reserve(end, self.vectors)

        async def write() -> None:
            try:
                await self.units.run(unit, slices, reservations, known)  # type: ignore[union-attr]
            finally:
                for reservation in reservations:
                    reservation.release()

        task = asyncio.ensure_future(write())
        self.stop.track(task)
        self._unit_tasks.add(task)
        task.add_done_callback(self._unit_tasks.discard)
        await asyncio.shield(task)  # a unit committing is left to finish when the grace period ends
        self.paid.pop(unit.seq, None)
        for sub in self.uses.pop(unit.seq, set()):
            self.users.get(sub, set()).discard(unit.seq)
            await self._release(sub)
        for sub, record in list(self.live.items()):
            if unit.seq in record.units:
                await self._release(sub)

    async def _release(self, sub: str) -> None:
        """Delete a kept batch once every unit that needs it is committed."""
        record = self.live.get(sub)
        if record is None or self.users.get(sub) or any(not self.checkpoint.is_done(u) for u in record.units):
            return
        if not self.first_done and self.cursor < self.gate:
            self.deferred.add(sub)  # a unit earlier runs examined may still need it: wait until first sight is past them
            return
        self.deferred.discard(sub)
        self.live.pop(sub)
        self.answers.drop(sub)
        self.users.pop(sub, None)
        await asyncio.to_thread(delete_batch, self.output, record)

    # -- building and submitting -----------------------------------------------------------

    def _queue_limit(self) -> int | None:
        limits = [x for x in (self.cfg.enqueued_tokens_limit, self.learned_limit) if x]
        return min(limits) if limits else None

    def _enqueued(self) -> int:
        return sum(o.record.tokens for o in self.open.values()) + sum(f.tokens for f in self.flushing.values())

    def _room_for(self, tokens: int) -> bool:
        limit = self._queue_limit()
        return limit is None or self._enqueued() + (self.file.tokens if self.file else 0) + tokens <= limit

    def _new_file(self) -> BatchFile:
        assert self._tmp is not None
        sub = uuid.uuid4().hex[:16]
        file = BatchFile(sub, self._tmp / f"{sub}.jsonl", str(self.cfg.model), self.job.embedding.dimensions,
                         BatchLimits(inputs=self.cfg.max_inputs_per_batch))
        if not self.space_checked and self.probe_sub is None:
            file.add_probe(list(probe.PROBE_TEXTS))
            self.probe_sub = sub
        return file

    async def _add(self, request: BatchRequest, texts: list[str]) -> str:
        """Put a request line in the batch being built (submitting that one first when
        full, and waiting for the provider's queue); returns the batch's submission id."""
        if self.file is not None and not self.file.fits(texts):
            await self._flush()
        if not self._room_for(request.tokens):
            await self._flush()
            await self._wait(lambda: self._room_for(request.tokens))
        try:
            self.spend.hold(request.tokens)
        except PipelineError:
            await self._flush()  # what is built fits the budget: it goes, then the run stops
            raise
        self.file = self.file or self._new_file()
        self.file.add(request, texts)
        return self.file.sub

    async def _flush_if_idle(self) -> None:
        """Submit what is built once nothing else will be added soon."""
        if self.first_done and not self.rechecking and not self.recheck and self.file is not None:
            await self._flush()

    async def _flush(self) -> None:
        file, self.file = self.file, None
        if file is None:
            return
        if self.stop.stopping or not len(file):
            file.discard()
            if file.sub == self.probe_sub:
                self.probe_sub = None
            return
        self.flushing[file.sub] = file
        try:
            await self._wait(lambda: len(self.open) + len(self.flushing) <= MAX_OPEN_BATCHES)
            record = BatchRecord(file.sub, self.writer, self.cfg.name, "submitting", _now(), len(file.requests),
                                 file.inputs, file.tokens, tuple(sorted(file.units)), self.cursor, probe=file.probe)
            path = file.close()
            await asyncio.to_thread(write_requests, self.output, record, file.requests)
            await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
            record = replace(record, input_file_id=await self.client.upload(path, self._file_name(record)))
            await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
            info = await self.client.create(str(record.input_file_id), self._metadata(record))
            record = replace(record, state="submitted", batch_id=info.id, status=info.status)
            await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
        finally:
            file.discard()
            self.flushing.pop(file.sub, None)
        log.info("%s: submitted batch %s: %s texts in %s lines, %s tokens", self.cfg.name, info.id,
                 f"{file.inputs:,}", f"{len(file):,}", f"{file.tokens:,}")
        self.stats.update(batches_submitted=1, lines=len(file.requests), inputs=file.inputs)
        self.open[file.sub] = _Open(record, file.requests, KeySet(b"".join(r.keys for r in file.requests)),
                                    next_poll=time.monotonic() + poll_delay_s(0, self.cfg.poll_interval_s),
                                    since=time.monotonic())
        self._notify()

    def _file_name(self, record: BatchRecord) -> str:
        return f"{self.job.name}.{record.writer}.{record.sub}.jsonl"

    def _metadata(self, record: BatchRecord) -> dict[str, str]:
        return {"pipeline_job": self.job.name[:512], "pipeline_writer": record.writer, "pipeline_submission": record.sub}

    # -- polling and collecting ------------------------------------------------------------

    async def _poll(self) -> None:
        while not self._finished():
            for sub, batch in self._pollable():
                if batch.next_poll <= time.monotonic():
                    if self.stop.stopping:
                        raise _Stopped
                    await self._look(sub, batch)
            await self._wait(lambda due=self._next_poll(): self._finished() or self._next_poll() < due, until=self._next_poll())

    def _next_poll(self) -> float:
        return min((b.next_poll for _, b in self._pollable()), default=float("inf"))

    def _pollable(self) -> list[tuple[str, _Open]]:
        """Open batches; while the vector space is unchecked, only the probe's: nothing is collected before it."""
        return [(s, b) for s, b in self.open.items() if self.space_checked or s == self.probe_sub]

    async def _look(self, sub: str, batch: _Open) -> None:
        assert batch.record.batch_id is not None
        info = await self.client.get(batch.record.batch_id)
        self.stats["polls"] += 1
        if (info.status, info.request_counts) != (batch.record.status, batch.record.request_counts):
            batch.record = replace(batch.record, status=info.status, request_counts=info.request_counts)
            await asyncio.to_thread(write_record, self.output, batch.record, self.checkpoint.epoch)
        if info.status in RESULT_STATUSES:
            await self._collect(sub, batch, info)
        elif info.status == "failed":
            await self._failed(sub, batch, info)
        else:
            batch.next_poll = time.monotonic() + poll_delay_s(time.monotonic() - batch.since, self.cfg.poll_interval_s)

    async def _collect(self, sub: str, batch: _Open, info: BatchInfo) -> None:
        """Journal the answers, check the failures, then mark the batch collected and tidy up."""
        assert self._tmp is not None
        journal = BatchJournal(self.output, batch.record)
        await asyncio.to_thread(journal.reset)
        outcome = _Outcome(len(batch.requests))
        paths = []
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                path = self._tmp / f"{sub}-{file_id}.jsonl"
                await self.client.download(file_id, path)
                paths.append(path)
        try:
            if batch.record.probe and not self.space_checked:
                vectors = await asyncio.to_thread(self._probe_line, paths)
                if vectors is None:  # its probe line failed: a batch of the probe alone goes, this one waits for it
                    log.info("%s: the probe line of batch %s failed; sending it again", self.cfg.name, info.id)
                    self.probe_sub = None
                    self._probe_batch()
                    await self._flush()
                    batch.next_poll = time.monotonic() + self.cfg.poll_interval_s
                    return
                await self._check_space(vectors)
            index = request_index(batch.requests)
            for path in paths:
                await asyncio.to_thread(self._read, path, batch.requests, index, journal, outcome)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)
        if outcome.unusable is not None:
            raise outcome.unusable
        for i in np.flatnonzero(~outcome.done):  # neither answered nor refused: sent again
            request = batch.requests[i]
            outcome.failed[request.unit] = max(outcome.failed.get(request.unit, 0), request.attempt)
        record = replace(batch.record, state="collected", status=info.status, request_counts=info.request_counts,
                         answered=tuple(sorted(outcome.answered.items())), failed=tuple(sorted(outcome.failed.items())),
                         isolate=tuple(sorted(outcome.isolate)), error=outcome.error)
        await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
        await asyncio.to_thread(delete_requests, self.output, record)
        await self._delete_files(info)
        paid = sum(outcome.answered.values())
        self.spend.settle(record.tokens, paid)
        self.counters.tokens += paid
        self.stats.update(batches_collected=1, tokens=paid, usage_tokens=outcome.usage, lines_failed=len(outcome.failed))
        self.stats.update({f"failures_{k}": n for k, n in outcome.kinds.items()})
        if outcome.error:
            self.last_error = outcome.error
            log.warning("%s: batch %s (%s): %d line(s) failed; their texts are sent again (last: %s)",
                        self.cfg.name, info.id, info.status, int((~outcome.done).sum()), outcome.error)
        contents = await asyncio.to_thread(journal.read, self.dim)
        self._closed(sub, record, contents)

    async def _failed(self, sub: str, batch: _Open, info: BatchInfo) -> None:
        """Refused at validation: a full queue is waited out (and learned); anything
        else counts as a failed attempt of every line."""
        errors = [classify(provider=self.cfg.name, body={"error": {"code": code, "message": message}})
                  for code, message in info.errors] or [classify(provider=self.cfg.name, body="batch failed")]
        for err in errors:
            if err.kind == "unusable":
                raise err
        queue_full = any(err.kind == "rate_limited" for err in errors)
        failed: dict[int, int] = {}
        if queue_full:
            others = self._enqueued() - batch.record.tokens
            self.learned_limit = max(others, batch.record.tokens) if others > 0 else batch.record.tokens // 2
            if self.learned_limit < self.job.embedding.max_input_tokens:
                raise WorkLeftError(f"{self.cfg.name}: the provider's batch queue takes fewer tokens than one text "
                                    f"({errors[0]}); rerun later")
            self.stats["queue_full"] += 1
            log.info("%s: batch %s refused, the queue is full (%s); its texts go again once running batches finish "
                     "(queue taken as %s tokens)", self.cfg.name, info.id, errors[0], f"{self.learned_limit:,}")
        else:
            for request in batch.requests:
                failed[request.unit] = max(failed.get(request.unit, 0), request.attempt)
            self.last_error = str(errors[0])
            log.warning("%s: batch %s failed (%s); its texts are sent again", self.cfg.name, info.id, errors[0])
        record = replace(batch.record, state="failed", status=info.status, request_counts=info.request_counts,
                         failed=tuple(sorted(failed.items())), error=str(errors[0]))
        await asyncio.to_thread(write_record, self.output, record, self.checkpoint.epoch)
        await asyncio.to_thread(delete_requests, self.output, record)
        await self._delete_files(info)
        self.spend.settle(record.tokens, 0)
        self.stats["batches_failed"] += 1
        if record.probe and not self.space_checked:
            self.probe_sub = None
        self._closed(sub, record, None)

    def _closed(self, sub: str, record: BatchRecord, contents: JournalContents | None) -> None:
        """A batch is no longer open: keep its answers, and look again at the units waiting on it."""
        self.open.pop(sub, None)
        if contents is not None:
            self.answers.add(sub, contents)
        self.live[sub] = record
        for unit, tokens in record.answered:
            self.paid[unit] += tokens
        for unit, attempt in record.failed:
            self.attempts[unit] = max(self.attempts.get(unit, 0), attempt)
        self.isolate.update(record.isolate)
        for seq in self.waiters.pop(sub, set()):
            if contents is not None:
                self._use(seq, {sub})  # it waited for answers in there: they are kept until it commits
            waiting = self.waits.get(seq)
            if waiting is not None:
                waiting.discard(sub)
                if not waiting:
                    del self.waits[seq]
                    self.recheck.add(seq)
        self._notify()

    async def _delete_files(self, info: BatchInfo) -> None:
        if self.cfg.keep_files:
            return
        for file_id in (info.input_file_id, info.output_file_id, info.error_file_id):
            if file_id:
                await self.client.delete_file(file_id)

    def _probe_line(self, paths: list[Path]) -> np.ndarray | None:
        """The probe line's vectors, checked as any answer; None if it failed."""
        for path in paths:
            for line in results(path):
                if line.custom_id == PROBE_ID and line.ok:
                    vectors = self.sync._vectors(line.body, len(probe.PROBE_TEXTS))
                    check_vectors(vectors, len(probe.PROBE_TEXTS), self.job.embedding.dimensions, self.cfg.name)
                    return vectors
        return None

    def _read(self, path: Path, requests: list[BatchRequest], index: dict[str, int], journal: BatchJournal,
              outcome: _Outcome) -> None:
        """One result file, in a worker thread: answers journaled (and cached), failures classified."""
        for line in results(path):
            i = index.get(line.custom_id)
            if i is None or outcome.done[i]:
                continue  # the probe line, or one we cannot place
            request = requests[i]
            keys = [request.keys[k:k + KEY_BYTES] for k in range(0, len(request.keys), KEY_BYTES)]
            if line.ok:
                try:
                    vectors = self.sync._vectors(line.body, len(keys))  # the synchronous answers' own decoder
                    check_vectors(vectors, len(keys), self.job.embedding.dimensions or self.dim or None, self.cfg.name)
                except BadResponseError as err:
                    outcome.fail(request, err)
                    continue
                journal.answered(keys, vectors, request.tokens)
                self._store(keys, vectors)
                outcome.answer(i, request, line.body)
                continue
            err = classify(provider=self.cfg.name, status=line.status, body=line.error_body())
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
                outcome.fail(request, err)

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Collected answers go to the cache at once (from the collecting thread)."""
        if self.units is not None and self._loop is not None:
            reuse = self.units.embedder.reuse
            asyncio.run_coroutine_threadsafe(reuse.store(keys, vectors), self._loop).result()

    # -- the summary ------------------------------------------------------------------------

    def report(self, providers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The batch provider's line of the summary: lines for requests."""
        s = self.stats
        providers[self.cfg.name] = {
            "state": "unusable" if self.reason else "ready", "reason": self.reason,
            "requests": s["lines"], "inputs": s["inputs"], "tokens": s["tokens"], "usage_tokens": s["usage_tokens"],
            "retries": s["lines_resubmitted"], "rate_limited": s["queue_full"],
            "failures": {k.removeprefix("failures_"): n for k, n in sorted(s.items()) if k.startswith("failures_")},
            "latency_p50_s": None, "latency_p95_s": None,
            "batches_submitted": s["batches_submitted"], "batches_collected": s["batches_collected"],
            "batches_failed": s["batches_failed"],
        }
        return providers


class _Outcome:
    """What a batch's result files said, line by line."""

    def __init__(self, n: int) -> None:
        self.done = np.zeros(n, dtype=bool)
        self.answered: Counter[int] = Counter()  # unit -> tokens of answered lines
        self.failed: dict[int, int] = {}  # unit -> attempt of its failed lines
        self.isolate: set[int] = set()
        self.kinds: Counter[str] = Counter()
        self.usage = 0
        self.error: str | None = None
        self.unusable: ProviderError | None = None

    def answer(self, i: int, request: BatchRequest, body: Any) -> None:
        self.done[i] = True
        self.answered[request.unit] += request.tokens
        usage = body.get("usage") if isinstance(body, dict) else None
        billed = usage.get("total_tokens", usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        self.usage += billed if isinstance(billed, int) else 0

    def fail(self, request: BatchRequest, err: ProviderError) -> None:
        self.failed[request.unit] = max(self.failed.get(request.unit, 0), request.attempt)
        self.kinds[err.kind] += 1
        self.error = str(err)


class _NoRequests:
    """The dispatcher of a batch job's units: they finish from collected answers
    only, so a text without one is a bug, never a synchronous request."""

    dimensions: int | None = None

    async def embed(self, texts: list[str], tokens: int) -> Any:
        raise WorkLeftError(f"internal error: {len(texts)} text(s) of a part had no collected answer; rerun to continue")


NO_REQUESTS = _NoRequests()


def warn_open_batches(output: Output, epoch: str) -> None:
    """A job without a batch provider over an output with batches still running."""
    running = [r for r in read_records(output, epoch) if r.open]
    if running:
        log.warning("%d batch(es) recorded by an earlier run are still open and this job has no openai_batch provider "
                    "to collect them: their texts are sent again (run with --restart and the batch provider to cancel them)",
                    len(running))


async def cancel_open_batches(output: Output, job: JobConfig) -> int:
    """--restart: cancel every recorded batch still running (and delete its input file); the count."""
    cfg = job.batch_provider
    checkpoint = Checkpoint.read(output)
    if cfg is None or checkpoint is None:
        return 0
    records = [r for r in read_records(output, checkpoint.epoch) if r.open and r.input_file_id]
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
            if batch_id is not None:
                info = await client.get(batch_id)
                if info.status not in (*RESULT_STATUSES, "failed", "cancelling"):
                    await client.cancel(batch_id)
                    cancelled += 1
            if not cfg.keep_files:
                await client.delete_file(str(record.input_file_id))
    finally:
        await client.close()
    if cancelled:
        log.info("--restart: cancelled %d running batch(es) of the earlier progress", cancelled)
    return cancelled


__all__ = ["NO_REQUESTS", "BatchRun", "cancel_open_batches", "warn_open_batches"]
