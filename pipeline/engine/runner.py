"""The one unit engine: a run of a job, whichever way its vectors are got.

Opens the output (its writer lock, the checkpoint), walks the units this
writer owns in input order with the `--limit` cut and the part-name check,
learns the job's totals, settles the vector space, maps every failure to
the run's one error, and writes the closing summary, `_SUCCESS` included.
How a unit's vectors are got is the strategy's (strategy.py): requests.py
for synchronous requests, pipeline/batch/ for the Batch API; both write
through `unit_work` (units.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import numpy as np

from ..cache import open_cache
from ..cache.vectors import Cache
from ..checkpoint import layout, parts
from ..checkpoint.manifest import Checkpoint, job_fingerprint
from ..config.job import JobConfig
from ..core import probe
from ..core.money import Spend, cost_usd, job_price
from ..errors import EXIT_BATCHES_RUNNING, EXIT_OK, ConfigError, PipelineError, WorkLeftError
from ..inputs.sources import InputFile, Unit, check_columns, find_inputs, iter_units, max_units, parquet_rows
from ..storage import open_output
from ..storage.fs import store_error
from ..storage.output import Output
from .dispatch import Dispatcher
from .embedder import Embedder
from .inflight import MemoryBudget
from .progress import Progress, RunCounters, log_summary
from .reuse import Reuse
from .stopper import Stopper
from .strategy import Strategy
from .units import UnitWork

log = logging.getLogger("pipeline")

VECTOR_WINDOW_BYTES = 48 * 2**20  # vectors of slices in flight: claimed, sent or waiting to be written (24 full answers)
GRACE_S = 20.0  # after SIGTERM/SIGINT, in-flight units get this long; inside Airflow's/k8s' 30 s


@dataclass(frozen=True)
class RunOptions:
    shard: layout.Shard | None = None
    limit: int | None = None  # embed only the first ROWS rows
    restart: bool = False
    progress: bool | None = None  # None: a bar on a terminal, lines otherwise
    grace_s: float = GRACE_S
    wait: bool = True  # False (--no-wait): Batch API jobs return, exit 99, where they would wait on batches


@dataclass(frozen=True)
class Plan:
    """What the command layer chooses for a run: its strategy, and what to do
    with what earlier runs of another strategy left (batches still open)."""

    strategy: Callable[[Engine], Strategy]
    before_restart: Callable[[Output, JobConfig, str], Awaitable[object]]  # given the discarded epoch
    on_open: Callable[[Output, JobConfig, str], None]  # given the checkpoint's epoch


def run_job(job: JobConfig, options: RunOptions, plan: Plan) -> int:
    """Run a job to completion or to a clean stop. Returns the exit status;
    raises PipelineError for the one-line errors."""
    return asyncio.run(Engine(job, options).main(plan))


class Engine:
    def __init__(self, job: JobConfig, options: RunOptions) -> None:
        self.job = job
        self.opts = options
        self.output = open_output(job.output.path, job.output.storage)
        self.counters = RunCounters()
        self.stop = Stopper(options.grace_s)
        self.files: list[InputFile] = []
        self.checkpoint: Checkpoint
        self.cache: Cache | None = None
        self.progress: Progress
        self.vectors = MemoryBudget(VECTOR_WINDOW_BYTES)
        self.spend: Spend
        self.dim = 0

    async def main(self, plan: Plan) -> int:
        self.files = find_inputs(self.job.input)
        check_columns(self.files, self.job.input)
        self.output.prepare(layout.FOLDERS)
        try:
            with self.output.writer_lock(self.opts.shard):
                if self.opts.restart and (earlier := Checkpoint.read(self.output)) is not None:
                    await plan.before_restart(self.output, self.job, earlier.epoch)  # before their records go
                self.checkpoint = Checkpoint.open(
                    self.output, self.job, job_fingerprint(self.job, self.files), restart=self.opts.restart,
                    shard=self.opts.shard, max_units=max_units(self.files, self.job.output.rows_per_part),
                )
                self.checkpoint.clean()
                plan.on_open(self.output, self.job, self.checkpoint.epoch)
                if self.checkpoint.complete() and self.output.exists(layout.SUCCESS):
                    rows = self.checkpoint.counters()["rows_done"]
                    log.info("job %s is already complete: %s rows in %s (--restart redoes it)", self.job.name, f"{rows:,}", self.output)
                    return EXIT_OK
                self.cache = open_cache(self.job.cache, self.job.cache_storage)
                try:
                    return await self._run(plan.strategy)
                finally:
                    if self.cache is not None:
                        self.cache.close()
        finally:
            self.output.close()

    async def _run(self, make_strategy: Callable[[Engine], Strategy]) -> int:
        self.progress = Progress(self._rows_to_do(), self.opts.progress)
        self.spend = Spend(self.job.budget_usd, job_price(self.job)[0], self.checkpoint.counters()["tokens"])
        strategy = make_strategy(self)
        self.stop.install()
        try:
            totals: dict[str, int] = {}  # filled once the walk has read every input
            try:
                try:
                    await strategy.open()
                    await self._walk(strategy, totals)
                except BaseException as err:  # stops the run before the strategy drains what is in flight
                    self.stop.fail(self.failure(err, "while taking units"))
                    if not isinstance(err, Exception):
                        raise
                finally:
                    await strategy.drain()
                # Learnt after the units in flight are committed: learning compacts the checkpoint.
                if totals and self.checkpoint.meta.get("total_units") != totals["units"]:
                    await asyncio.to_thread(self.checkpoint.learn, total_units=totals["units"], total_rows=totals["rows"])
            except (PipelineError, OSError) as err:
                self.stop.fail(self.failure(err, "while learning the job's totals"))
        finally:
            await strategy.close()
            self.stop.uninstall()
            self.progress.close()
        return self._finish(strategy.report(), strategy.waiting())

    # -- what the strategies share -------------------------------------------

    def unit_work(self, dim: int, dispatcher: Dispatcher | None) -> UnitWork:
        """The unit code both strategies write with, once the vectors' length
        is known. Without a dispatcher, every text must come known (a batch's)."""
        self.dim = dim
        reuse = Reuse(self.job.embedding.model, self.job.embedding.dimensions, dim, self.cache, self.job.vector_options)
        embedder = Embedder(self.job, dispatcher, reuse, dim, self.progress.advance, self.spend)
        return UnitWork(self.job, self.output, self.checkpoint, embedder, self.stop, self.counters)

    def owned(self, seq: int) -> bool:
        """A unit this writer owns and nobody has committed."""
        return layout.owns(self.opts.shard, seq) and not self.checkpoint.is_done(seq)

    def end_of(self, unit: Unit) -> int:
        """How many of the unit's rows this run takes (the `--limit` cut)."""
        limit = self.opts.limit
        return unit.table.num_rows if limit is None else max(0, min(unit.table.num_rows, limit - unit.row_offset))

    def units_of(self, wanted: Callable[[int], bool], totals: dict[str, int] | None = None) -> Iterator[Unit]:
        """The wanted units, in input order, read from the inputs."""
        return iter_units(self.files, self.job.input, self.job.output.rows_per_part, wanted, totals)

    async def settle_space(self, answers: list[np.ndarray]) -> list[str | None]:
        """Each provider's probe vectors (in priority order) against this
        output's vector space: the probes recorded by the run that started it,
        else the first answer's, then recorded. None where one agrees, else why not."""
        recorded = self.checkpoint.meta.get("probes")
        reference = probe.decode(recorded) if recorded else (answers[0] if answers else None)
        verdicts = [probe.mismatch(reference, a) if reference is not None else None for a in answers]
        if not recorded and reference is not None:
            await asyncio.to_thread(self.checkpoint.learn, dimensions=int(reference.shape[1]),
                                    probes=probe.encode(reference))
        return verdicts

    def disk_error(self, err: OSError) -> WorkLeftError:
        return WorkLeftError(f"cannot write to {self.output}: {err.strerror or store_error(err)}; what is done is kept, "
                             f"fix it and rerun to continue")

    def failure(self, err: BaseException, where: str) -> PipelineError:
        """The run's error for whatever stopped a piece of work (`where`: "in part 12")."""
        if isinstance(err, PipelineError):
            return err
        if isinstance(err, OSError):  # a full disk or a lost permission: what is committed stays committed
            return self.disk_error(err)
        if isinstance(err, asyncio.CancelledError):
            return WorkLeftError("stopped before in-flight work finished; rerun to continue")
        if isinstance(err, KeyboardInterrupt):
            return WorkLeftError("interrupted; rerun to continue")
        log.debug("failure %s", where, exc_info=err)  # a bug: stop cleanly, keep what is done, say so
        return WorkLeftError(f"internal error {where}: {type(err).__name__}: {err}")

    # -- the unit loop ------------------------------------------------------

    async def _walk(self, strategy: Strategy, totals: dict[str, int]) -> None:
        units = self.units_of(lambda seq: self.owned(seq) and strategy.wants(seq), totals)
        limit = self.opts.limit
        while not self.stop.stopping:
            unit = await asyncio.to_thread(next, units, None)
            if unit is None or self.stop.stopping or (limit is not None and unit.row_offset >= limit):
                break
            if unit.seq >= 10 ** self.checkpoint.part_digits:  # part names would no longer sort in input order
                raise ConfigError(
                    f"output.rows_per_part: {self.job.output.rows_per_part} makes more parts than this output's "
                    f"names allow ({10 ** self.checkpoint.part_digits:,}); raise it and rerun with --restart"
                )
            await strategy.take(unit, self.end_of(unit))
        if not self.stop.stopping:
            await strategy.after_last()

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

    # -- the end --------------------------------------------------------------

    def _finish(self, providers: dict[str, dict[str, Any]], waiting: bool) -> int:
        """Record the run, write the summary, and `_SUCCESS` if the whole job
        is done, judged on the latest checkpoint: another shard may have just
        finished the last part."""
        error = self.stop.error
        done_here = error is None and not self.stop.stopping
        try:
            self.checkpoint.refresh()
            complete = done_here and self.opts.limit is None and self.checkpoint.complete()
            waiting = done_here and waiting  # --no-wait: work left is waiting on batches still running
            status = "complete" if complete else ("waiting" if waiting else "done" if done_here else "stopped")
            summary = self._summary(status, providers)
            self.checkpoint.record_run(summary["run"], whole=complete)
            parts.merge_rejects(self.output, [*self.checkpoint.ledger.committed_seqs(), *self.checkpoint.ledger.partial],
                                self.checkpoint.part_digits)
            parts.write_json(self.output, layout.SUMMARY, summary)
            if complete:
                self.output.write(layout.SUCCESS, b"")
        except OSError as err:  # the disk that stopped the run may not take its record either
            if error is None:
                raise self.disk_error(err) from err
            log.warning("could not record this run in %s: %s", self.output, err.strerror or store_error(err))
            raise error
        log_summary(summary)
        if error is not None:
            raise error
        if status == "waiting":
            log.info("batches still running: run again later to collect them (exit %d)", EXIT_BATCHES_RUNNING)
            return EXIT_BATCHES_RUNNING
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
