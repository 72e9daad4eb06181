"""Wires the stages together: sources -> texts -> packing -> dispatch -> sink -> manifest.

Owns the event loop, the bounded window of work in flight (units by count
and input bytes; their slices by the bytes their vectors take, units.py),
the start-up probe, and the closing summary.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ..checkpoint import layout
from ..core import probe
from ..checkpoint import parts
from ..batch.run import NO_REQUESTS, BatchRun
from ..batch.submit import cancel_open_batches, warn_open_batches
from .inflight import MemoryBudget, Reservation
from ..cache import open_cache
from ..cache.vectors import Cache
from ..config.job import JobConfig
from .dispatch import Dispatcher
from .embedder import Embedder
from ..errors import EXIT_OK, ConfigError, PipelineError, ProviderError, WorkLeftError
from ..storage.fs import store_error
from ..checkpoint.manifest import Checkpoint, job_fingerprint
from ..core.pricing import cost_usd, job_price
from .progress import Progress, RunCounters, log_summary
from ..providers import Provider, build_provider
from .reuse import Reuse
from ..inputs.sources import InputFile, Unit, check_columns, find_inputs, iter_units, max_units, parquet_rows
from ..core.spend import Spend
from .stopper import Stopper
from ..storage import open_output
from ..inputs.texts import utf8_len
from .units import UnitWork

log = logging.getLogger("pipeline")

MAX_UNITS_IN_FLIGHT = 16  # units open at once (each holds its input rows and an open part file)
INPUT_WINDOW_BYTES = 128 * 2**20  # ... and at most this much input among them (one unit always fits)
VECTOR_WINDOW_BYTES = 48 * 2**20  # vectors of slices in flight: claimed, sent or waiting to be written (24 full answers)
GRACE_S = 20.0  # after SIGTERM/SIGINT, in-flight units get this long; inside Airflow's/k8s' 30 s


@dataclass(frozen=True)
class RunOptions:
    shard: layout.Shard | None = None
    limit: int | None = None  # embed only the first ROWS rows
    restart: bool = False
    progress: bool | None = None  # None: a bar on a terminal, lines otherwise
    grace_s: float = GRACE_S


def run_job(job: JobConfig, options: RunOptions) -> int:
    """Run a job to completion or to a clean stop. Returns the exit status;
    raises PipelineError for the one-line errors."""
    return asyncio.run(_Run(job, options).main())


class _Run:
    def __init__(self, job: JobConfig, options: RunOptions) -> None:
        self.job = job
        self.opts = options
        self.output = open_output(job.output.path, job.output.storage)
        self.counters = RunCounters()
        self.stop = Stopper(options.grace_s)
        self.files: list[InputFile] = []
        self.checkpoint: Checkpoint
        self.dispatcher: Dispatcher
        self.cache: Cache | None = None
        self.units: UnitWork
        self.progress: Progress
        self.vectors: MemoryBudget
        self.spend: Spend
        self.batches: BatchRun | None = None  # a job with an openai_batch provider (batches.py)
        self.dim = 0

    async def main(self) -> int:
        self.files = find_inputs(self.job.input)
        check_columns(self.files, self.job.input)
        self.output.prepare(layout.FOLDERS)
        try:
            with self.output.writer_lock(self.opts.shard):
                if self.opts.restart and (earlier := Checkpoint.read(self.output)) is not None:
                    await cancel_open_batches(self.output, self.job, earlier.epoch)  # before their records go
                self.checkpoint = Checkpoint.open(
                    self.output, self.job, job_fingerprint(self.job, self.files), restart=self.opts.restart,
                    shard=self.opts.shard, max_units=max_units(self.files, self.job.output.rows_per_part),
                )
                self.checkpoint.clean()
                if self.job.batch_provider is None:
                    warn_open_batches(self.output, self.checkpoint.epoch)
                if self.checkpoint.complete() and self.output.exists(layout.SUCCESS):
                    rows = self.checkpoint.counters()["rows_done"]
                    log.info("job %s is already complete: %s rows in %s (--restart redoes it)", self.job.name, f"{rows:,}", self.output)
                    return EXIT_OK
                self.cache = open_cache(self.job.cache, self.job.cache_storage)
                providers = [build_provider(cfg, self.job) for cfg in self.job.providers]
                try:
                    return await self._with_providers(providers)
                finally:
                    await asyncio.gather(*(p.close() for p in providers), return_exceptions=True)
                    if self.cache is not None:
                        self.cache.close()
        finally:
            self.output.close()

    async def _with_providers(self, providers: list[Provider]) -> int:
        self.dispatcher = Dispatcher(providers, self.job.retry, shards=self.opts.shard[1] if self.opts.shard else 1)
        self.progress = Progress(self._rows_to_do(), self.opts.progress)
        self.spend = Spend(self.job.budget_usd, job_price(self.job)[0], self.checkpoint.counters()["tokens"])
        self.vectors = MemoryBudget(VECTOR_WINDOW_BYTES)
        self.stop.install()
        try:
            await asyncio.gather(*(p.start() for p in providers))
            if self.job.batch_provider is not None:
                self.batches = BatchRun(
                    self.job, self.output, self.checkpoint, files=self.files, shard=self.opts.shard,
                    limit=self.opts.limit, stop=self.stop, counters=self.counters, cache=self.cache, spend=self.spend,
                    vectors=self.vectors, sync=providers[0],  # type: ignore[arg-type]
                    make_units=lambda dim: self._unit_work(dim, NO_REQUESTS),  # type: ignore[arg-type]
                )
                await self.batches.run()
            else:
                dim = await self.stop.abandonable(self._vector_space())
                self.dispatcher.dimensions = dim
                self._unit_work(dim, self.dispatcher)
                await self._process_units()
        except PipelineError as err:
            self.stop.fail(err)
        except OSError as err:
            self.stop.fail(self._disk_error(err))
        finally:
            self.stop.uninstall()
            self.progress.close()
        return self._finish()

    def _unit_work(self, dim: int, dispatcher: Dispatcher) -> UnitWork:
        """The unit code both paths write with, once the vectors' length is known."""
        self.dim = dim
        reuse = Reuse(self.job.embedding.model, self.job.embedding.dimensions, dim, self.cache)
        embedder = Embedder(self.job, dispatcher, reuse, dim, self.progress.advance, self.spend)
        self.units = UnitWork(self.job, self.output, self.checkpoint, embedder, self.stop, self.counters)
        return self.units

    def _rows_to_do(self) -> int | None:
        """Rows this run has left, when known without reading the inputs (for the ETA)."""
        if self.opts.shard is not None:
            return None
        total = self.checkpoint.meta.get("total_rows")
        if total is None and all(f.format == "parquet" for f in self.files):
            total = sum(parquet_rows(f) for f in self.files)
        if total is None:
            return None
        if self.opts.limit is not None:
            total = min(total, self.opts.limit)
        return max(0, total - self.checkpoint.counters()["rows_done"])

    def _disk_error(self, err: OSError) -> WorkLeftError:
        return WorkLeftError(f"cannot write to {self.output}: {err.strerror or store_error(err)}; what is done is kept, "
                             f"fix it and rerun to continue")

    async def _vector_space(self) -> int:
        """Probe every provider; keep those whose vectors agree with this
        output's (recorded by the run that started it, else the first
        provider's by priority). Returns the vectors' length."""
        recorded = self.checkpoint.meta.get("probes")
        reference = probe.decode(recorded) if recorded else None
        routes = sorted(self.dispatcher.routes, key=lambda r: r.priority)
        texts = list(probe.PROBE_TEXTS)
        tokens = sum(utf8_len(t) for t in texts)  # a bound: no tokenizer loaded for it
        answers = await asyncio.gather(
            *(self.dispatcher.embed_on(r, texts, tokens) for r in routes), return_exceptions=True
        )
        for route, answer in zip(routes, answers):
            if isinstance(answer, ProviderError):
                self.dispatcher.mark_unusable(route, f"start-up probe failed: {answer.message or answer.kind}")
            elif isinstance(answer, BaseException):
                raise answer
            elif reference is None:
                reference = answer.vectors
            elif (why := probe.mismatch(reference, answer.vectors)) is not None:
                self.dispatcher.mark_unusable(route, why)
        if reference is None:
            raise WorkLeftError(self.dispatcher.no_provider_message())
        dim = int(reference.shape[1])
        if not recorded:
            await asyncio.to_thread(self.checkpoint.learn, dimensions=dim, probes=probe.encode(reference))
        return dim

    # -- the unit loop ------------------------------------------------------

    def _wanted(self, seq: int) -> bool:
        return layout.owns(self.opts.shard, seq) and not self.checkpoint.is_done(seq)

    def _window(self) -> int:
        slots = sum(p.max_concurrency for p in self.job.providers)
        rows_in_flight = slots * self.job.request_limits(self.dim or None)[0]  # requests as sent, answers kept small
        return max(2, min(MAX_UNITS_IN_FLIGHT, math.ceil(rows_in_flight / self.job.output.rows_per_part) + 1))

    async def _process_units(self) -> None:
        totals: dict[str, int] = {}
        units = iter_units(self.files, self.job.input, self.job.output.rows_per_part, self._wanted, totals)
        window = asyncio.Semaphore(self._window())
        inputs = MemoryBudget(INPUT_WINDOW_BYTES)
        tasks: set[asyncio.Task[None]] = set()
        limit = self.opts.limit
        last_slice: Reservation | None = None
        last_round: asyncio.Task[None] | None = None
        try:
            while not self.stop.stopping:
                await window.acquire()
                unit = await asyncio.to_thread(next, units, None)
                if unit is None or self.stop.stopping or (limit is not None and unit.row_offset >= limit):
                    window.release()
                    if last_slice is not None and not self.stop.stopping:
                        last_round = asyncio.create_task(self._largest_first_after(last_slice))
                    break
                if unit.seq >= 10 ** self.checkpoint.part_digits:  # part names would no longer sort in input order
                    window.release()
                    raise ConfigError(
                        f"output.rows_per_part: {self.job.output.rows_per_part} makes more parts than this output's "
                        f"names allow ({10 ** self.checkpoint.part_digits:,}); raise it and rerun with --restart"
                    )
                held = inputs.reserve(unit.table.nbytes)
                await held.wait()
                end = unit.table.num_rows if limit is None else min(unit.table.num_rows, limit - unit.row_offset)
                slices, reservations = self.units.reserve(end, self.vectors)  # now, in input order
                last_slice = reservations[-1] if reservations else last_slice
                task = asyncio.create_task(self._unit(unit, slices, reservations))
                tasks.add(task)
                self.stop.track(task)
                task.add_done_callback(lambda t, held=held: (tasks.discard(t), held.release(), window.release()))
        except PipelineError as err:
            self.stop.fail(err)
        finally:
            if tasks:
                if self.stop.stopping:
                    self.stop.start_grace()
                await asyncio.wait(tasks)
            if last_round is not None:
                last_round.cancel()  # its slice may never get its bytes (a failed unit lets them go unused)
        if totals and self.checkpoint.meta.get("total_units") != totals["units"]:
            await asyncio.to_thread(self.checkpoint.learn, total_units=totals["units"], total_rows=totals["rows"])

    async def _largest_first_after(self, last_slice: Reservation) -> None:
        """Once the job's last slice has its bytes (granted in order), every
        request left is made or being made: the largest may go first."""
        await last_slice.wait()
        self.dispatcher.last_requests_made()

    async def _unit(self, unit: Unit, slices: list[tuple[int, int]], reservations: list[Reservation]) -> None:
        try:
            await self.units.run(unit, slices, reservations)
        except PipelineError as err:
            self.stop.fail(err)
        except OSError as err:  # a full disk or a lost permission: what is committed stays committed
            self.stop.fail(self._disk_error(err))
        except Exception as err:  # a bug: stop cleanly, keep what is done, say so
            log.debug("unit %d failed", unit.seq, exc_info=True)
            self.stop.fail(WorkLeftError(f"internal error in part {unit.seq}: {type(err).__name__}: {err}"))
        except asyncio.CancelledError:
            self.stop.fail(WorkLeftError("stopped before in-flight work finished; rerun to continue"))
            raise
        finally:
            for reservation in reservations:
                reservation.release()

    # -- the end --------------------------------------------------------------

    def _finish(self) -> int:
        """Record the run, write the summary, and `_SUCCESS` if the whole job
        is done, judged on the latest checkpoint: another shard may have just
        finished the last part."""
        error = self.stop.error
        done_here = error is None and not self.stop.stopping
        providers = self.dispatcher.provider_report()
        if self.batches is not None:
            self.batches.report(providers)
        try:
            self.checkpoint.refresh()
            complete = done_here and self.opts.limit is None and self.checkpoint.complete()
            status = "complete" if complete else ("done" if done_here else "stopped")
            summary = self._summary(status, providers)
            self.checkpoint.record_run(summary["run"], whole=complete)
            parts.merge_rejects(self.output, [*self.checkpoint.ledger.committed_seqs(), *self.checkpoint.ledger.partial],
                               self.checkpoint.part_digits)
            parts.write_json(self.output, layout.SUMMARY, summary)
            if complete:
                self.output.write(layout.SUCCESS, b"")
        except OSError as err:  # the disk that stopped the run may not take its record either
            if error is None:
                raise self._disk_error(err) from err
            log.warning("could not record this run in %s: %s", self.output, err.strerror or store_error(err))
            raise error
        log_summary(summary)
        if error is not None:
            raise error
        return EXIT_OK

    def _summary(self, status: str, providers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        elapsed = self.progress.elapsed_s()
        price, _ = job_price(self.job)
        job_counters = self.checkpoint.counters()
        c = self.counters
        return {
            "name": self.job.name,
            "status": status,
            "output": str(self.output),
            "model": self.job.embedding.model,
            "dimensions": self.dim,
            "error": str(self.stop.error) if self.stop.error else None,
            "price_per_million_tokens_usd": price,
            "run": {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - elapsed)),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "status": status,
                "shard": list(self.opts.shard) if self.opts.shard else None,
                "rows_embedded": c.rows_embedded,
                "rows_rejected": dict(c.rows_rejected),
                "rows_done": c.rows_done,
                "rows_from_providers": c.rows_embedded - c.rows_from["deduped"] - c.rows_from["from_cache"],
                "rows_deduped": c.rows_from["deduped"],
                "rows_from_cache": c.rows_from["from_cache"],
                "rows_from_journal": c.rows_from["journal"],
                "tokens": c.tokens,
                "tokens_reported_by_providers": c.tokens_reported,
                "cost_usd": cost_usd(c.tokens, price),
                "requests": sum(p["requests"] for p in providers.values()),
                "retries": sum(p["retries"] for p in providers.values()),
                "elapsed_s": round(elapsed, 3),
                "rows_per_s": round(c.rows_done / elapsed, 1) if elapsed > 0 else 0.0,
                "providers": providers,
            },
            "job": {
                **job_counters,
                "cost_usd": cost_usd(job_counters["tokens"], price),
                "total_rows": self.checkpoint.meta.get("total_rows"),
                "total_units": self.checkpoint.meta.get("total_units"),
            },
            "providers": providers,
        }
