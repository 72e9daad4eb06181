"""`type: openai_batch`: a job's texts go through the Files + Batches API, at half price.

Batches fill journals; units finish from them. Three tasks share the state:

- *first sight* walks the units this writer owns and has not committed, in
  order, once. *Examining* a unit prepares its texts as a slice does, keys
  them, and sorts each distinct key: answered (its own journal, a collected
  batch's, the cache), pending in a batch (open, being uploaded or being
  built: in-run dedupe), or missing. Missing ones go into the batch being
  built (batchsubmit.py). A unit with nothing pending is finished at once
  through units.py, the synchronous path's own code, with the answers as its
  `Known`: its part is bit-identical to a synchronous run's.
- the *poller* polls open batches and collects finished ones (batchcollect.py):
  answers to the batch's journal and the cache, failures classified; then the
  batch is marked collected in the checkpoint and its files deleted.
- *rechecks* examine again the units whose batches were collected: finished
  when all is answered, their failed texts sent again otherwise (the one rule
  for resubmission: missing, and pending nowhere).

A collected batch's journal is kept until every unit that took answers from
it (or waited for them) is committed; a rerun keeps them until its first
sight has passed the units earlier runs examined, so a kill never makes a
text that was submitted go again.

Over 400 lines: the three tasks share one state (which batch holds or
answered which key, which unit waits on which batch, which journals are still
needed), and BatchRun is that state; its pieces without it are the modules
batchsubmit.py, batchcollect.py, batchfile.py and batchstate.py.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Coroutine, Iterable

import numpy as np

from ..checkpoint import layout
from ..core import probe
from ..checkpoint import parts
from .collect import Collector, delete_files
from .files import keys_array
from .state import Answers, BatchJournal, UnitKnown, delete_batch, delete_requests, orphan_files, read_records, read_requests
from .submit import Stopped, Submitter, Waker
from ..engine.inflight import MemoryBudget
from ..cache.vectors import Cache, text_keys
from ..config.job import JobConfig
from ..errors import ConfigError, EndpointMissingError, PipelineError, ProviderError, WorkLeftError
from ..checkpoint.journal import Journal, JournalContents
from ..checkpoint.manifest import Checkpoint
from ..core.packing import pack
from ..engine.progress import RunCounters
from ..providers.batch_api import BatchClient
from ..providers.openai import OpenAIProvider
from ..checkpoint.records import BatchRecord, BatchRequest
from ..engine.reuse import first_pieces
from ..inputs.sources import InputFile, Unit, iter_units
from ..core.spend import Spend
from ..engine.stopper import Stopper
from ..storage.output import Output, private_temp_dir
from ..inputs.texts import PreparedTexts, prepare, row_texts
from ..engine.units import UnitWork

log = logging.getLogger("pipeline")


class _NoRequests:
    """The dispatcher of a batch job's units: they finish from collected answers
    only, so a text without one is a bug, never a synchronous request."""

    dimensions: int | None = None

    async def embed(self, texts: list[str], tokens: int) -> Any:
        raise WorkLeftError(f"internal error: {len(texts)} text(s) of a part had no collected answer; rerun to continue")


NO_REQUESTS = _NoRequests()


class BatchRun:
    def __init__(self, job: JobConfig, output: Output, checkpoint: Checkpoint, *, files: list[InputFile],
                 shard: layout.Shard | None, limit: int | None, stop: Stopper, counters: RunCounters,
                 cache: Cache | None, spend: Spend, vectors: MemoryBudget, sync: OpenAIProvider,
                 make_units: Callable[[int], UnitWork], wait: bool = True) -> None:
        cfg = job.batch_provider
        assert cfg is not None
        self.job, self.cfg, self.output, self.checkpoint = job, cfg, output, checkpoint
        self.files, self.shard, self.limit = files, shard, limit
        self.stop, self.counters, self.cache, self.spend, self.vectors = stop, counters, cache, spend, vectors
        self.sync = sync  # the synchronous endpoint: the probe, and the one decoder of answers
        self.make_units = make_units
        self.wait = wait  # False: --no-wait, one pass of what needs no waiting (_without_waiting)
        self.running: set[int] = set()  # --no-wait: units with lines in batches still running, not read again
        self.client = BatchClient(cfg, job.retry)
        self.writer = layout.writer_name(shard)
        self.waker = Waker(stop)
        self.submit: Submitter  # made in run(), with the temp folder
        self.dim = 0
        self.units: UnitWork | None = None
        self.space_checked = False  # the one-vector-space probe passed (synchronously, or in a batch)
        self.live: dict[str, BatchRecord] = {}  # collected or failed, kept while their units are not all committed
        self.answers = Answers()
        self.earlier: set[str] = set()  # kept batches an earlier run collected (their rows count as from the journal)
        self.paid: Counter[int] = Counter()  # unit -> tokens of its answered lines in kept batches
        self.waits: dict[int, set[str]] = {}  # unit -> batches it waits on
        self.waiters: dict[str, set[int]] = {}
        self.users: dict[str, set[int]] = {}  # kept batch -> uncommitted units that take answers from it
        self.uses: dict[int, set[str]] = {}
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
        self.last_error: str | None = None  # what the last failed line or batch said
        self._lock = asyncio.Lock()  # one unit's texts are sorted and added at a time: each text once
        self._unit_tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        tmp = private_temp_dir("batch")
        self._loop = asyncio.get_running_loop()
        self.submit = Submitter(self.job, self.output, self.checkpoint.epoch, self.writer, self.client, self.spend,
                                self.waker, tmp, needs_probe=lambda: not self.space_checked, cursor=lambda: self.cursor)
        collector = Collector(self, self.job, self.output, self.checkpoint.epoch, self.client, self.submit, self.waker,
                              self.spend, self.counters, decode=self.sync.vectors, store=self._store)
        await self.client.start()
        try:
            await self._probe()
            await self._adopt()
            if not self.space_checked and self.submit.probe_sub is None and self.submit.open:
                self.submit.probe_batch()  # batches of earlier runs wait for the probe: it goes first, alone
                await self.submit.flush()
            works = (self._first_sight(), self._rechecks(), collector.poll()) if self.wait else \
                (self._without_waiting(collector),)
            tasks = [asyncio.ensure_future(self._guard(work)) for work in works]
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
            self.submit.discard()
            await self.client.close()
            shutil.rmtree(tmp, ignore_errors=True)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Stopped:
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
        recorded = self.checkpoint.meta.get("probes")
        if recorded and (why := probe.mismatch(probe.decode(recorded), vectors)) is not None:
            raise self._unusable(why)
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

    def _wanted(self, seq: int) -> bool:
        return layout.owns(self.shard, seq) and not self.checkpoint.is_done(seq) and seq not in self.running

    async def _first_sight(self) -> None:
        totals: dict[str, int] = {}
        units = iter_units(self.files, self.job.input, self.job.output.rows_per_part, self._wanted, totals)
        while not self.stop.stopping:
            unit = await asyncio.to_thread(next, units, None)
            if unit is None or (self.limit is not None and unit.row_offset >= self.limit):
                break
            if unit.seq >= 10 ** self.checkpoint.part_digits:
                raise ConfigError(f"output.rows_per_part: {self.job.output.rows_per_part} makes more parts than "
                                  f"this output's names allow ({10 ** self.checkpoint.part_digits:,}); raise it and "
                                  f"rerun with --restart")
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
            await self.waker.wait(lambda: bool(self.recheck) or self.finished())
            if not self.recheck:
                return
            seqs, self.recheck = self.recheck, set()
            self.rechecking = True
            try:
                last = max((s for s in seqs if self._wanted(s)), default=-1)
                units = iter_units(self.files, self.job.input, self.job.output.rows_per_part,
                                   lambda s: s in seqs and self._wanted(s))
                while last >= 0 and not self.stop.stopping:
                    unit = await asyncio.to_thread(next, units, None)
                    if unit is None:
                        break
                    await self._examine(unit)
                    if unit.seq >= last:
                        break
            finally:
                self.rechecking = False
            await self._flush_if_idle()

    async def _flush_if_idle(self) -> None:
        """Submit what is built once nothing else will be added soon."""
        if self.first_done and not self.rechecking and not self.recheck:
            await self.submit.flush()

    async def _examine(self, unit: Unit) -> None:
        """Finish the unit if every text is answered; else send what is missing and wait.
        A unit whose batches all closed while it was examined is examined again."""
        seq = unit.seq
        if seq in self.examining or self.checkpoint.is_done(seq):
            return  # the other task's examination ends by looking again if it must
        self.examining.add(seq)
        self.waited.discard(seq)
        try:
            await self._examine_once(unit)
        finally:
            self.examining.discard(seq)
        if seq in self.waited and not self.waits.get(seq) and not self.checkpoint.is_done(seq):
            self.recheck.add(seq)
            self.waker.notify()

    async def _examine_once(self, unit: Unit) -> None:
        seq = unit.seq
        end = unit.table.num_rows if self.limit is None else min(unit.table.num_rows, self.limit - unit.row_offset)
        earlier = self.checkpoint.partial(seq)
        if end <= 0 or (earlier is not None and earlier.rows >= end):
            return
        table = unit.table.slice(0, end)
        ids = parts.id_array(table, self.job, unit.row_offset).to_pylist()
        prepared = await asyncio.to_thread(prepare, row_texts(table, self.job.input), self.job.embedding, ids)
        keys = text_keys(prepared.pieces, self.job.embedding.model, self.job.embedding.dimensions)
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
                                f"last: {self.last_error or 'no answer'}")
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

    def _use(self, seq: int, subs: Iterable[str]) -> None:
        for sub in subs:
            self.users.setdefault(sub, set()).add(seq)
            self.uses.setdefault(seq, set()).add(sub)

    def _wait_on(self, seq: int, subs: Iterable[str]) -> None:
        self.waited.add(seq)
        for sub in subs:
            self.waits.setdefault(seq, set()).add(sub)
            self.waiters.setdefault(sub, set()).add(seq)

    async def _finish(self, unit: Unit, end: int, own: JournalContents) -> None:
        """Write and commit the unit through the synchronous path's code, from the answers."""
        units = self.units
        assert units is not None
        self.waits.pop(unit.seq, None)
        known = UnitKnown(own, self.answers, own.tokens + self.paid[unit.seq], self.earlier)
        earlier = self.checkpoint.partial(unit.seq)  # paid by a synchronous run before the job moved to batches
        self.spend.settle(0, max(0, own.tokens - (earlier.tokens if earlier else 0)))
        slices, reservations = units.reserve(end, self.vectors)

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
        contents = self.answers.drop(sub)
        if contents is not None and self.units is not None:  # in-run dedupe keeps the latest of them, as a synchronous run would
            self.units.embedder.reuse.remember(contents)
        self.users.pop(sub, None)
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
        for seq in self.waiters.pop(sub, set()):
            if contents is not None:
                self._use(seq, {sub})  # it waited for answers in there: they are kept until it commits
            waiting = self.waits.get(seq)
            if waiting is not None:
                waiting.discard(sub)
                if not waiting:
                    del self.waits[seq]
                    self.recheck.add(seq)
        self.waker.notify()
        await self._release(sub)

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Collected answers go to the cache at once (called from the collecting thread)."""
        if self.units is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.units.embedder.reuse.store(keys, vectors), self._loop).result()

    # -- the summary ------------------------------------------------------------------------

    def report(self, providers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The batch provider's line of the summary: request lines for requests."""
        s = self.stats + self.submit.stats
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


__all__ = ["NO_REQUESTS", "BatchRun"]
