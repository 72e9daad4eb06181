"""`type: openai_batch`: the engine's Batch API strategy. A job's texts go
through the Files + Batches API, at half price.

Batches fill journals; units finish from them. Three tasks share the state:

- *first sight* is the engine's walk over the units this writer owns and
  has not committed, in order, once (`take`). *Examining* a unit prepares its texts as a slice does, keys
  them, and sorts each distinct key: answered (its own journal, a collected
  batch's, the cache), pending in a batch (open, being uploaded or being
  built: in-run dedupe), or missing. Missing ones go into the batch being
  built (submit.py). A unit with nothing pending is finished at once
  through the engine's unit code (engine/units.py), with the answers as its
  `Known`: its part is bit-identical to a synchronous run's.
- the *poller* polls open batches and collects finished ones (collect.py):
  answers to the batch's journal and the cache, failures classified; then the
  batch is marked collected in the checkpoint and its files deleted.
- *rechecks* examine again the units whose batches were collected: finished
  when all is answered, their failed texts sent again otherwise (the one rule
  for resubmission: missing, and pending nowhere).

A collected batch's journal is kept until every unit that took answers from
it (or waited for them) is committed; a rerun keeps them until its first
sight has passed the units earlier runs examined, so a kill never makes a
text that was submitted go again.

The bookkeeping is plain data, each piece with one owner: the answers of
kept batches (state.Answers), the units tied to batches (links.Links: the
batches a unit waits on, the kept batches a unit takes answers from), what
is being built, uploaded and open (submit.Submitter). Over 400 lines: the
three tasks share that state; its pieces without it are submit.py,
collect.py, files.py, state.py and links.py.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from dataclasses import replace
from typing import Any, Coroutine, Iterable

import numpy as np

from ..cache.vectors import text_keys
from ..checkpoint import layout, parts
from ..checkpoint.batch_records import BatchRecord, BatchRequest
from ..checkpoint.journal import Journal, JournalContents
from ..core import probe
from ..core.packing import pack
from ..engine.dispatch import ProviderStats
from ..engine.reuse import first_pieces
from ..engine.runner import Engine
from ..engine.units import UnitWork
from ..errors import EndpointMissingError, PipelineError, ProviderError, WorkLeftError
from ..inputs.sources import Unit
from ..inputs.texts import PreparedTexts, prepare, row_texts, tokenizing
from ..providers.batch_api import BatchClient
from ..providers.openai import OpenAIProvider
from ..storage.output import private_temp_dir
from .collect import Collector, delete_files
from .files import keys_array
from .links import Links
from .state import (
    Answers,
    BatchJournal,
    UnitKnown,
    delete_batch,
    delete_requests,
    orphan_files,
    read_records,
    read_requests,
)
from .submit import Stopped, Submitter, Waker

log = logging.getLogger("pipeline")


class BatchStrategy:
    def __init__(self, engine: Engine) -> None:
        job = engine.job
        cfg = job.batch_provider
        assert cfg is not None
        self.engine = engine
        self.job, self.cfg, self.output, self.checkpoint = job, cfg, engine.output, engine.checkpoint
        self.shard = engine.opts.shard
        self.stop, self.counters, self.cache, self.spend = engine.stop, engine.counters, engine.cache, engine.spend
        # the synchronous endpoint: the probe, and the one decoder of answers
        self.sync = OpenAIProvider(cfg, job.embedding.dimensions)
        self.wait = engine.opts.wait  # False: --no-wait, one pass of what needs no waiting
        self.running: set[int] = set()  # --no-wait: units with lines in batches still running, not read again
        self.client = BatchClient(cfg, job.retry)
        self.writer = layout.writer_name(self.shard)
        self.waker = Waker(self.stop)
        self.dim = 0
        self.units: UnitWork | None = None
        self.space_checked = False  # the one-vector-space probe passed (synchronously, or in a batch)
        self.live: dict[str, BatchRecord] = {}  # collected or failed, kept while their units are not all committed
        self.answers = Answers()
        self.earlier: set[str] = set()  # kept batches an earlier run collected (their rows count as from the journal)
        self.paid: Counter[int] = Counter()  # unit -> tokens of its answered lines in kept batches
        self.waits = Links()  # unit <-> the batches it waits on
        self.uses = Links()  # uncommitted unit <-> the kept batches it takes answers from
        self.recheck: set[int] = set()
        self.rechecking = False
        self.examining: set[int] = set()  # one examination of a unit at a time (first sight or a recheck)
        self.waited: set[int] = set()  # units that registered a wait during their current examination
        self.attempts: dict[int, int] = {}  # unit -> the highest attempt of its failed lines
        self.isolate: set[int] = set()
        self.cursor = -1  # the last unit first sight examined
        self.first_done = False
        self.gate = -1  # journals are kept until first sight passes the units earlier runs examined
        self.deferred: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.reason: str | None = None  # why the provider cannot be used, for the summary
        self._lock = asyncio.Lock()  # one unit's texts are sorted and added at a time: each text once
        self._unit_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Future[None]] = []  # the rechecks and the poller
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tmp = private_temp_dir("batch")  # the batch being built; removed by close()
        self.submit = Submitter(self.job, self.output, self.checkpoint.epoch, self.writer, self.client, self.spend,
                                self.waker, self._tmp, needs_probe=lambda: not self.space_checked,
                                cursor=lambda: self.cursor)
        self.collector = Collector(self, self.job, self.output, self.checkpoint.epoch, self.client, self.submit,
                                   self.waker, self.spend, self.counters, decode=self.sync.vectors, store=self._store)

    # -- the run ------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.sync.start()
        await self.client.start()
        await self._probe()
        await self._adopt()
        if not self.space_checked and self.submit.probe_sub is None and self.submit.open:
            self.submit.probe_batch()  # batches of earlier runs wait for the probe: it goes first, alone
            await self.submit.flush()
        if not self.wait:
            await self.collector.poll_once()
            self.waker.park()  # nothing closes from here on: no recheck can come but those already due
            # A unit with lines in a running batch cannot finish before it does: not read (nor its texts
            # prepared) again. Of a unit a full queue or a kill cut short, the texts not yet submitted go
            # once that batch is collected.
            self.running = {u for batch in self.submit.open.values() for u in batch.record.units}
            return
        for work in (self._rechecks(), self.collector.poll()):
            task = asyncio.ensure_future(self._guard(work))
            self.stop.track(task)
            self._tasks.append(task)

    def wants(self, seq: int) -> bool:
        return seq not in self.running

    async def take(self, unit: Unit, end: int) -> None:
        """First sight of a unit."""
        try:
            await self._examine(unit, end)
            self.cursor = unit.seq
            if self.deferred and self.cursor >= self.gate:
                for sub in list(self.deferred):
                    await self._release(sub)
        except Stopped:
            pass
        except ProviderError as err:
            raise self._provider_failed(err) from None
        finally:
            self.waker.notify()

    async def after_last(self) -> None:
        self.first_done = True
        await self._guard(self._after_first_sight())

    async def _after_first_sight(self) -> None:
        for sub in list(self.deferred):
            await self._release(sub)
        await self._flush_if_idle()

    async def drain(self) -> None:
        self.waker.notify()  # the walk may have stopped the run: the rechecks and the poller look again
        try:
            if not self.wait and self.first_done:
                await self._guard(self._rechecks())  # those already due; any wait on a running batch ends them
            if self._tasks:
                await asyncio.wait(self._tasks)
        finally:
            if self.stop.stopping:
                self.stop.start_grace()
            for outcome in await asyncio.gather(*self._unit_tasks, return_exceptions=True):
                if isinstance(outcome, PipelineError):
                    self.stop.fail(outcome)

    async def close(self) -> None:
        self.submit.discard()
        await self.client.close()
        await self.sync.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Stopped:
            pass
        except ProviderError as err:
            self.stop.fail(self._provider_failed(err))
        except asyncio.CancelledError as err:
            self.stop.fail(WorkLeftError("stopped while batches were being submitted or collected; rerun to continue"))
            raise err
        except Exception as err:  # noqa: BLE001 - PipelineError, a disk error, or a bug: the engine words it
            self.stop.fail(self.engine.failure(err, "in batches"))
        finally:
            self.waker.notify()

    def _provider_failed(self, err: ProviderError) -> WorkLeftError:
        if err.kind == "unusable":
            return self._unusable(str(err).removeprefix(f"{self.cfg.name}: "))
        return WorkLeftError(f"{err}; every batch submitted is recorded: rerun to continue")

    def _unusable(self, why: str) -> WorkLeftError:
        self.reason = why
        return WorkLeftError(f"no provider can take work ({self.cfg.name}: {why})")

    async def _without_waiting(self, collector: Collector) -> None:
        """--no-wait: collect what finished, then one first sight (which finishes every unit
        now answered and submits what fits the queue); any wait on a running batch ends it."""
        await collector.poll_once()
        self.waker.park()  # nothing closes from here on: no recheck can come but those already due
        # A unit with lines in a running batch cannot finish before it does: not read (nor its texts
        # prepared) again. Of a unit a full queue or a kill cut short, the texts not yet submitted go
        # once that batch is collected.
        self.running = {u for batch in self.submit.open.values() for u in batch.record.units}
        await self._first_sight()
        await self._rechecks()

    @property
    def parked(self) -> bool:
        """--no-wait left work waiting on batches that still run."""
        return not self.wait and not self.finished()

    def waiting(self) -> bool:
        """--no-wait left work waiting on batches that still run."""
        return not self.wait and not self.finished()

    def finished(self) -> bool:
        return self.first_done and not self.recheck and not self.rechecking and not self.waits and self.submit.idle

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
            raise self._unusable(f"start-up probe failed: {err.message or err.kind}") from None
        await self.check_space(answer.vectors)

    async def check_space(self, vectors: np.ndarray) -> None:
        (why,) = await self.engine.settle_space([vectors])
        if why is not None:
            raise self._unusable(why)
        self._learn_dim(int(vectors.shape[1]))
        self.space_checked = True

    def _learn_dim(self, dim: int) -> None:
        if not self.dim:
            self.dim = dim
            self.units = self.engine.unit_work(dim, None)

    # -- start: what earlier runs left ---------------------------------------------------

    async def _adopt(self) -> None:
        """Take over this writer's recorded batches (the unsharded run takes every writer's)."""
        writer = None if self.shard is None else self.writer
        records = await asyncio.to_thread(read_records, self.output, self.checkpoint.epoch, writer)
        for rel in await asyncio.to_thread(orphan_files, self.output, writer, records):
            await asyncio.to_thread(self.output.delete_log if rel.endswith(".journal") else self.output.delete, rel)
        self.gate = max([self.gate, *(max(r.examined_through, *r.units) for r in records)])
        for record in records:
            if record.state == "submitting" and (settled := await self.submit.settle(record)) is not None:
                record = settled
            if record.state == "submitted":
                await self._adopt_open(record)
            elif record.state != "submitting":
                await self._keep(record)

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
        self.submit.adopt(record, requests)

    async def _keep(self, record: BatchRecord) -> None:
        """A collected (or failed) batch whose units are not all committed yet. Its
        failed lines count as attempts of the run that collected it only."""
        contents = None
        record = await delete_files(self.client, self.output, self.checkpoint.epoch, record)  # a kill left them
        if record.state == "collected":
            await asyncio.to_thread(delete_requests, self.output, record)
            contents = await asyncio.to_thread(BatchJournal(self.output, record).read, self.dim)
            self.earlier.add(record.sub)
            self.spend.settle(0, sum(t for u, t in record.answered if not self.checkpoint.is_done(u)))
        await self.closed(replace(record, failed=()), contents)

    # -- first sight and rechecks ---------------------------------------------------------

    async def _rechecks(self) -> None:
        while True:
            await self.waker.wait(lambda: bool(self.recheck) or self.finished())
            if not self.recheck:
                return
            seqs, self.recheck = self.recheck, set()
            self.rechecking = True
            try:
                owned = self.engine.owned
                last = max((s for s in seqs if owned(s)), default=-1)
                units = self.engine.units_of(lambda s: s in seqs and owned(s))
                while last >= 0 and not self.stop.stopping:
                    unit = await asyncio.to_thread(next, units, None)
                    if unit is None:
                        break
                    await self._examine(unit, self.engine.end_of(unit))
                    if unit.seq >= last:
                        break
            finally:
                self.rechecking = False
            await self._flush_if_idle()

    async def _flush_if_idle(self) -> None:
        """Submit what is built once nothing else will be added soon."""
        if self.first_done and not self.rechecking and not self.recheck:
            await self.submit.flush()

    async def _examine(self, unit: Unit, end: int) -> None:
        """Finish the unit if every text is answered; else send what is missing and wait.
        A unit whose batches all closed while it was examined is examined again."""
        seq = unit.seq
        if seq in self.examining or self.checkpoint.is_done(seq):
            return  # the other task's examination ends by looking again if it must
        self.examining.add(seq)
        self.waited.discard(seq)
        try:
            await self._examine_once(unit, end)
        finally:
            self.examining.discard(seq)
        if seq in self.waited and not self.waits.batches_of(seq) and not self.checkpoint.is_done(seq):
            self.recheck.add(seq)
            self.waker.notify()

    async def _examine_once(self, unit: Unit, end: int) -> None:
        seq = unit.seq
        earlier = self.checkpoint.partial(seq)
        if end <= 0 or (earlier is not None and earlier.rows >= end):
            return
        table = unit.table.slice(0, end)
        ids = parts.id_array(table, self.job, unit.row_offset).to_pylist()
        prepared = await tokenizing(prepare, row_texts(table, self.job.input), self.job.embedding, ids)
        keys = text_keys(prepared.pieces, self.job.embedding.model, self.job.embedding.dimensions,
                         self.job.vector_options)
        first_of, _ = first_pieces(keys)
        own = await asyncio.to_thread(Journal(self.output, seq, self.dim).read) if self.dim else JournalContents(dim=0)
        todo = [i for k, i in first_of.items() if k not in own and k not in own.refused]
        if self.units is not None:  # in-run dedupe as a synchronous run has it: recent vectors, kept in the unit's journal
            recent = self.units.embedder.reuse.remembered([keys[i] for i in todo if not self._answered(keys[i])])
            if recent:
                await asyncio.to_thread(Journal(self.output, seq, self.dim).answered, list(recent),
                                        np.stack(list(recent.values())), 0)
                own = await asyncio.to_thread(Journal(self.output, seq, self.dim).read)
                todo = [i for i in todo if keys[i] not in recent]
        cached = await self._cached([keys[i] for i in todo if not self._answered(keys[i])])
        unknown = self._unanswered(seq, keys, [i for i in todo if keys[i] not in cached])
        if unknown:
            async with self._lock:  # from here to each registration, no await: nothing collected is missed
                missing = self._pending(seq, keys, self._unanswered(seq, keys, unknown))
                if missing:
                    await self._send(seq, prepared, keys, missing)
        if not self.space_checked:  # answers wait for the probe line's check
            self._wait_on(seq, {self.submit.probe_batch()})
        if seq not in self.waited:  # every text answered now: waits that emptied meanwhile may have failed
            await self._finish(unit, end, own)

    def _answered(self, key: bytes) -> bool:
        return key in self.answers or key in self.answers.refused

    def _unanswered(self, seq: int, keys: list[bytes], pieces: list[int]) -> list[int]:
        """The pieces no kept batch answers; the unit keeps the batches that answer the others."""
        self.uses.add(seq, {s for i in pieces if (s := self.answers.batch_of(keys[i])) is not None})
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
        """Wait on the batches that hold some of these pieces' texts already; the pieces of the others."""
        keys = [all_keys[i] for i in pieces]
        left = np.ones(len(keys), dtype=bool)
        for sub, hit in self.submit.pending(keys, keys_array(keys)):
            if (hit & left).any():
                self._wait_on(seq, {sub})
                left &= ~hit
        return [pieces[j] for j in np.flatnonzero(left)]

    async def _send(self, seq: int, prepared: PreparedTexts, keys: list[bytes], pieces: list[int]) -> None:
        attempt = self.attempts.get(seq, 0) + 1
        if attempt > self.job.retry.max_attempts:
            raise WorkLeftError(f"texts of part {seq} failed in {attempt - 1} batches (retry.max_attempts); "
                                f"last: {self.collector.last_error or 'no answer'}")
        max_inputs, max_tokens = self.job.request_limits()
        limit = self.submit.queue_limit()
        order = np.asarray(pieces, dtype=np.int64)
        slices = pack(prepared.piece_tokens[order], prepared.piece_bytes[order],
                      max_inputs=1 if seq in self.isolate else max_inputs,
                      max_tokens=min(max_tokens, limit) if limit else max_tokens)
        for a, b in slices:
            chosen = order[a:b]
            request = BatchRequest(seq, attempt, int(prepared.piece_tokens[chosen].sum()), b"".join(keys[i] for i in chosen))
            self._wait_on(seq, {await self.submit.add(request, [prepared.pieces[i] for i in chosen])})
            self.stats["lines_resubmitted"] += int(attempt > 1)

    def _wait_on(self, seq: int, subs: Iterable[str]) -> None:
        self.waited.add(seq)
        self.waits.add(seq, subs)

    async def _finish(self, unit: Unit, end: int, own: JournalContents) -> None:
        """Write and commit the unit through the synchronous path's code, from the answers."""
        units = self.units
        assert units is not None
        self.waits.drop_unit(unit.seq)
        known = UnitKnown(own, self.answers, own.tokens + self.paid[unit.seq], self.earlier)
        earlier = self.checkpoint.partial(unit.seq)  # paid by a synchronous run before the job moved to batches
        self.spend.settle(0, max(0, own.tokens - (earlier.tokens if earlier else 0)))
        slices, reservations = units.reserve(end, self.engine.vectors)

        async def write() -> None:
            try:
                await units.run(unit, slices, reservations, known)
            finally:
                for reservation in reservations:
                    reservation.release()

        task = asyncio.ensure_future(write())
        self.stop.track(task)
        self._unit_tasks.add(task)
        task.add_done_callback(self._unit_tasks.discard)
        await asyncio.shield(task)  # a unit committing is left to finish when the grace period ends
        self.paid.pop(unit.seq, None)
        for sub in self.uses.drop_unit(unit.seq):
            await self._release(sub)
        for sub, record in list(self.live.items()):
            if unit.seq in record.units:
                await self._release(sub)

    async def _release(self, sub: str) -> None:
        """Delete a kept batch once every unit that needs it is committed."""
        record = self.live.get(sub)
        if record is None or self.uses.units_of(sub) or any(not self.checkpoint.is_done(u) for u in record.units):
            return
        if not self.first_done and self.cursor < self.gate:
            self.deferred.add(sub)  # a unit earlier runs examined may still need it: wait until first sight is past them
            return
        self.deferred.discard(sub)
        self.live.pop(sub)
        contents = self.answers.drop(sub)
        if contents is not None and self.units is not None:  # in-run dedupe keeps the latest of them, as a synchronous run would
            self.units.embedder.reuse.remember(contents)
        self.uses.drop_batch(sub)
        await asyncio.to_thread(delete_batch, self.output, record)

    async def closed(self, record: BatchRecord, contents: JournalContents | None) -> None:
        """A batch is no longer open: keep its answers, and look again at the units waiting on it
        (or let it go: its units may be committed already, from the cache its answers went to
        before a kill)."""
        sub = record.sub
        self.submit.open.pop(sub, None)
        if contents is not None:
            self.answers.add(sub, contents)
        self.live[sub] = record
        for unit, tokens in record.answered:
            self.paid[unit] += tokens
        for unit, attempt in record.failed:
            self.attempts[unit] = max(self.attempts.get(unit, 0), attempt)
        self.isolate.update(record.isolate)
        for seq in self.waits.drop_batch(sub):
            if contents is not None:
                self.uses.add(seq, {sub})  # it waited for answers in there: they are kept until it commits
            if not self.waits.batches_of(seq):
                self.recheck.add(seq)
        self.waker.notify()
        await self._release(sub)

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Collected answers go to the cache at once (called from the collecting thread)."""
        if self.units is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.units.embedder.reuse.store(keys, vectors), self._loop).result()

    # -- the summary ------------------------------------------------------------------------

    def report(self) -> dict[str, dict[str, Any]]:
        """The batch provider's line of the summary: request lines for requests."""
        s = self.stats + self.submit.stats + self.collector.stats
        stats = ProviderStats(
            requests=s["lines"], inputs=s["inputs"], tokens=s["tokens"], usage_tokens=s["usage_tokens"],
            retries=s["lines_resubmitted"], rate_limited=s["queue_full"],
            failures=Counter({k.removeprefix("failures_"): n for k, n in s.items() if k.startswith("failures_")}),
        )
        return {self.cfg.name: {
            "state": "unusable" if self.reason else "ready", "reason": self.reason, **stats.to_json(),
            "batches_submitted": s["batches_submitted"], "batches_collected": s["batches_collected"],
            "batches_failed": s["batches_failed"],
        }}


__all__ = ["BatchStrategy"]
