"""Wires the stages together: sources -> texts -> packing -> dispatch -> sink -> manifest.

Owns the event loop, the bounded window of units in flight, progress, the
closing summary and the graceful stop.
"""
from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Coroutine, TypeVar

import pyarrow as pa

from . import probe, sink, storage
from .cache import Cache
from .config import JobConfig
from .dispatch import Dispatcher
from .embedder import Embedded, Embedder
from .errors import EXIT_OK, ConfigError, PipelineError, ProviderError, WorkLeftError
from .locks import RunLock
from .manifest import MAX_RUNS_KEPT, Manifest, job_fingerprint, manifest_lock, orphan_parts
from .prices import cost_usd, job_price
from .progress import Progress, RunCounters, log_summary
from .providers import Provider, build_provider
from .reuse import Reuse
from .segments import open_cache
from .sources import InputFile, Unit, check_columns, find_inputs, iter_units, parquet_rows
from .texts import encoding, needs_exact_tokens, prepare, row_texts

log = logging.getLogger("pipeline")
T = TypeVar("T")

MAX_UNITS_IN_FLIGHT = 16  # bounds memory: each unit holds rows_per_part rows and their vectors
GRACE_S = 20.0  # after SIGTERM/SIGINT, in-flight units get this long; inside Airflow's/k8s' 30 s


@dataclass(frozen=True)
class RunOptions:
    shard: tuple[int, int] | None = None  # (k, n)
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
        self.output = storage.open_output(job.output.path, job.output.storage)
        self.counters = RunCounters()
        self.error: PipelineError | None = None
        self.stopping = False
        self.files: list[InputFile] = []
        self.manifest: Manifest
        self.dispatcher: Dispatcher
        self.cache: Cache | None = None
        self.embedder: Embedder
        self.progress: Progress
        self.dim = 0
        self.in_flight: set[asyncio.Task[Any]] = set()  # cancelled when the grace period ends
        self.committing: set[asyncio.Task[Any]] = set()  # writing to disk: left to finish (milliseconds)
        self.grace: asyncio.TimerHandle | None = None
        self.grace_over = False

    async def main(self) -> int:
        self.files = find_inputs(self.job.input)
        check_columns(self.files, self.job.input)
        self.output.prepare()
        with RunLock(self.output, self.opts.shard):
            self.manifest = Manifest.open(
                self.output, self.job, job_fingerprint(self.job, self.files), restart=self.opts.restart,
                shard=self.opts.shard,
            )
            with manifest_lock(self.output):
                self.manifest.refresh()  # a shard may have committed a part since `open`
                self.output.clean_temp_files((sink.REJECTS_DIR, sink.PARTIAL_DIR))
                for orphan in orphan_parts(self.output, self.manifest, self.opts.shard):
                    self.output.delete(orphan)
            if self.manifest.complete() and self.output.exists("_SUCCESS"):
                rows = self.manifest.counters()["rows_done"]
                log.info("job %s is already complete: %s rows in %s (--restart redoes it)", self.job.name, f"{rows:,}", self.output)
                return EXIT_OK
            self.output.make_folders((sink.REJECTS_DIR, sink.PARTIAL_DIR))
            self.cache = open_cache(self.job.cache, self.job.cache_storage)
            providers = [build_provider(cfg, self.job) for cfg in self.job.providers]
            try:
                return await self._with_providers(providers)
            finally:
                await asyncio.gather(*(p.close() for p in providers), return_exceptions=True)
                if self.cache is not None:
                    self.cache.close()

    async def _with_providers(self, providers: list[Provider]) -> int:
        self.dispatcher = Dispatcher(providers, self.job.retry)
        self.progress = Progress(self._rows_to_do(), self.opts.progress)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await asyncio.gather(*(p.start() for p in providers))
            self.dim = await self._abandonable(self._vector_space())
            self.dispatcher.dimensions = self.dim
            reuse = Reuse(self.job.embedding.model, self.job.embedding.dimensions, self.dim, self.cache)
            self.embedder = Embedder(self.job, self.dispatcher, reuse, self.progress, self.dim)
            await self._process_units()
        except PipelineError as err:
            self.error = self.error or err
        except OSError as err:
            self.error = self.error or self._disk_error(err)
        finally:
            if self.grace is not None:
                self.grace.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.progress.close()
        return self._finish()

    def _rows_to_do(self) -> int | None:
        """Rows this run has left, when known without reading the inputs (for the ETA)."""
        if self.opts.shard is not None:
            return None
        total = self.manifest.data.get("total_rows")
        if total is None and all(f.format == "parquet" for f in self.files):
            total = sum(parquet_rows(f) for f in self.files)
        if total is None:
            return None
        if self.opts.limit is not None:
            total = min(total, self.opts.limit)
        return max(0, total - self.manifest.counters()["rows_done"])

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.grace is not None:
            log.warning("second %s: stopping now", sig.name)
            self.grace.cancel()
            self._end_grace()
            return
        log.warning("%s: finishing in-flight work (up to %gs), then stopping", sig.name, self.opts.grace_s)
        self.stopping = True
        self.error = self.error or WorkLeftError(f"interrupted by {sig.name}; rerun to continue")
        self._start_grace()

    def _start_grace(self) -> None:
        """From now, in-flight work has `grace_s` to finish; what is still
        waiting on a provider then is abandoned (a rerun redoes it)."""
        if self.grace is None:
            self.grace = asyncio.get_running_loop().call_later(self.opts.grace_s, self._end_grace)

    def _end_grace(self) -> None:
        self.grace_over = True
        waiting = [t for t in self.in_flight if not t.done() and t not in self.committing]
        if waiting:
            log.warning("stopping: abandoning %d part(s) still waiting on providers; a rerun redoes them", len(waiting))
        for task in waiting:
            task.cancel()

    async def _abandonable(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` as in-flight work: the end of the grace period cancels it."""
        task = asyncio.ensure_future(work)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        try:
            return await task
        except asyncio.CancelledError:
            if self.grace_over and task.cancelled():
                raise self.error or WorkLeftError("stopped; rerun to continue") from None
            raise

    def _disk_error(self, err: OSError) -> WorkLeftError:
        return WorkLeftError(f"cannot write to {self.output}: {err.strerror or storage.error_line(err)}; what is done is kept, "
                             f"fix it and rerun to continue")

    async def _vector_space(self) -> int:
        """Probe every provider; keep those whose vectors agree with this
        output's (recorded by the run that started it, else the first
        provider's by priority). Returns the vectors' length."""
        recorded = self.manifest.data.get("probes")
        reference = probe.decode(recorded) if recorded else None
        routes = sorted(self.dispatcher.routes, key=lambda r: r.priority)
        texts = list(probe.PROBE_TEXTS)
        tokens = sum(len(t) for t in encoding().encode_ordinary_batch(texts))
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
            self.manifest.update(lambda data: data.update(dimensions=dim, probes=probe.encode(reference)))
        return dim

    # -- the unit loop ------------------------------------------------------

    def _wanted(self, seq: int) -> bool:
        if self.manifest.is_done(seq):
            return False
        if self.opts.shard is not None:
            k, n = self.opts.shard
            return seq % n == k
        return True

    def _window(self) -> int:
        slots = sum(p.max_concurrency for p in self.job.providers)
        rows_in_flight = slots * self.job.batching.max_inputs_per_request
        return max(2, min(MAX_UNITS_IN_FLIGHT, math.ceil(rows_in_flight / self.job.output.rows_per_part) + 1))

    async def _process_units(self) -> None:
        totals: dict[str, int] = {}
        units = iter_units(self.files, self.job.input, self.job.output.rows_per_part, self._wanted, totals)
        window = asyncio.Semaphore(self._window())
        tasks: set[asyncio.Task[None]] = set()
        limit = self.opts.limit
        try:
            while not self.stopping:
                await window.acquire()
                unit = await asyncio.to_thread(next, units, None)
                if unit is None or self.stopping or (limit is not None and unit.row_offset >= limit):
                    window.release()
                    break
                if unit.seq >= sink.MAX_PARTS:  # part names would no longer sort in input order
                    window.release()
                    raise ConfigError(
                        f"output.rows_per_part: {self.job.output.rows_per_part} makes more than {sink.MAX_PARTS:,} "
                        f"parts; raise it and rerun with --restart"
                    )
                end = unit.table.num_rows if limit is None else min(unit.table.num_rows, limit - unit.row_offset)
                task = asyncio.create_task(self._unit(unit, end))
                tasks.add(task)
                self.in_flight.add(task)
                task.add_done_callback(
                    lambda t: (tasks.discard(t), self.in_flight.discard(t), self.committing.discard(t), window.release())
                )
        except PipelineError as err:
            self.error = self.error or err
        finally:
            if tasks:
                if self.stopping:
                    self._start_grace()
                await asyncio.wait(tasks)
        if totals and self.manifest.data.get("total_units") != totals["units"]:
            self.manifest.update(lambda d: d.update(total_units=totals["units"], total_rows=totals["rows"]))

    async def _unit(self, unit: Unit, end: int) -> None:
        try:
            await self._embed_unit(unit, end)
        except PipelineError as err:
            self.error = self.error or err
            self.stopping = True
        except OSError as err:  # a full disk or a lost permission: what is committed stays committed
            self.error = self.error or self._disk_error(err)
            self.stopping = True
        except Exception as err:  # a bug: stop cleanly, keep what is done, say so
            log.debug("unit %d failed", unit.seq, exc_info=True)
            self.error = self.error or WorkLeftError(f"internal error in part {unit.seq}: {type(err).__name__}: {err}")
            self.stopping = True
        except asyncio.CancelledError:
            self.error = self.error or WorkLeftError("stopped before in-flight work finished; rerun to continue")
            raise

    async def _embed_unit(self, unit: Unit, end: int) -> None:
        seq_key = str(unit.seq)
        partial = self.manifest.partial.get(seq_key)
        # The partial file, not the manifest, says how far it got: a kill may
        # fall between replacing it and recording it.
        begin = self.output.read_metadata(f"{sink.PARTIAL_DIR}/{partial['file']}").num_rows if partial else 0
        if begin >= end:
            return
        table = unit.table.slice(begin, end - begin)
        ids = sink.id_array(table, self.job, unit.row_offset + begin).to_pylist()
        texts = row_texts(table, self.job.input)
        prepared = await asyncio.to_thread(prepare, texts, self.job.embedding, ids, exact=needs_exact_tokens(self.job))

        embedded = await self.embedder.embed(prepared)
        task = asyncio.current_task()
        assert task is not None
        self.committing.add(task)  # the end of the grace period lets a commit finish
        await asyncio.to_thread(self._commit, unit, begin, end, embedded, partial)

    def _commit(self, unit: Unit, begin: int, end: int, embedded: Embedded, partial: dict[str, Any] | None) -> None:
        """Write the unit's part and its rejects, then record it in the manifest.

        A unit cut short by --limit is recorded as partial: its part holds the
        rows done so far, and `_partial.d` keeps their reasons for the run
        that finishes it.
        """
        seq, name = str(unit.seq), sink.part_name(unit.seq)
        result, tokens, sources = embedded.result, embedded.tokens, embedded.sources
        if partial:
            earlier = self.output.read_table(f"{sink.PARTIAL_DIR}/{partial['file']}")
            result = pa.concat_tables([earlier, result.cast(earlier.schema)])
            tokens += partial["tokens"]
        reasons = result.column(sink.REASON_COLUMN).to_pylist()
        self.counters.rows_rejected.update(r for r in reasons[begin:] if r is not None)
        self.counters.rows_embedded += sum(r is None for r in reasons[begin:])
        self.counters.rows_done += end - begin
        self.counters.tokens += tokens - (partial["tokens"] if partial else 0)
        self.counters.rows_from.update(sources)
        if partial:
            sources = {k: n + partial.get(k, 0) for k, n in sources.items()}
        finished = end == unit.table.num_rows

        part = sink.part_table(self.job, unit.table.slice(0, end), unit.row_offset, result.column("vector").combine_chunks(), self.dim)
        tables: dict[str, pa.Table] = {name: part}
        rejected = [i for i, r in enumerate(reasons) if r is not None]
        if rejected:
            ids = part.column(0).take(rejected).to_pylist()
            codes = result.column(sink.CODE_COLUMN).take(rejected).to_pylist()
            tables[f"{sink.REJECTS_DIR}/{name}"] = sink.rejects_table(ids, [reasons[i] for i in rejected], codes, name)
        if not finished:
            tables[f"{sink.PARTIAL_DIR}/{name}"] = result
        staged: storage.Staged | None = None

        def commit(data: dict[str, Any]) -> None:
            assert staged is not None
            if seq in data["units"]:  # another process finished it first
                staged.discard()
                return
            staged.publish()  # locally: renames of the staged temps; object store: the PUTs
            if f"{sink.REJECTS_DIR}/{name}" not in tables:  # a partial's, superseded
                self.output.delete(f"{sink.REJECTS_DIR}/{name}")
            record = {
                "rows": end,
                "embedded": sum(r is None for r in reasons),
                "rejected": dict(Counter(r for r in reasons if r is not None)),
                "tokens": tokens,
                **sources,
            }
            if finished:
                data["units"][seq] = record
                data["partial"].pop(seq, None)
            else:
                data["partial"][seq] = {**record, "file": name}

        # Staged under temp names and fsynced (locally); the commit renames them into place.
        staged = self.output.stage({rel: sink.table_bytes(table) for rel, table in tables.items()})
        try:
            self.manifest.update(commit)
        except BaseException:  # a full disk halfway: no staged file may outlive the attempt
            staged.discard()
            raise
        if finished:
            self.output.delete(f"{sink.PARTIAL_DIR}/{name}")

    # -- the end --------------------------------------------------------------

    def _finish(self) -> int:
        """Record the run, write the summary, and `_SUCCESS` if the whole job
        is done, judged on the latest manifest: another shard may have just
        finished the last part."""
        done_here = self.error is None and not self.stopping
        providers = self.dispatcher.provider_report()
        try:
            with manifest_lock(self.output):
                self.manifest.refresh()
                complete = done_here and self.opts.limit is None and self.manifest.complete()
                status = "complete" if complete else ("done" if done_here else "stopped")
                summary = self._summary(status, providers)
                runs = (self.manifest.data.get("runs", []) + [summary["run"]])[-MAX_RUNS_KEPT:]
                self.manifest.save({**self.manifest.data, "runs": runs}, whole=complete)
                sink.merge_rejects(self.output, (int(s) for s in [*self.manifest.units, *self.manifest.partial]))
                sink.write_json(self.output, "_summary.json", summary)
                if complete:
                    self.output.write("_SUCCESS", b"")
        except OSError as err:  # the disk that stopped the run may not take its record either
            if self.error is None:
                raise self._disk_error(err) from err
            log.warning("could not record this run in %s: %s", self.output, err.strerror or storage.error_line(err))
            raise self.error
        log_summary(summary)
        if self.error is not None:
            raise self.error
        return EXIT_OK

    def _summary(self, status: str, providers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        elapsed = self.progress.elapsed_s()
        price, _ = job_price(self.job)
        job_counters = self.manifest.counters()

        return {
            "name": self.job.name,
            "status": status,
            "output": str(self.output),
            "model": self.job.embedding.model,
            "dimensions": self.dim,
            "error": str(self.error) if self.error else None,
            "price_per_million_tokens_usd": price,
            "run": {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - elapsed)),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "status": status,
                "shard": list(self.opts.shard) if self.opts.shard else None,
                "rows_embedded": self.counters.rows_embedded,
                "rows_rejected": self.counters.rows_rejected,
                "rows_done": self.counters.rows_done,
                "rows_from_providers": self.counters.rows_embedded - sum(self.counters.rows_from.values()),
                "rows_deduped": self.counters.rows_from["deduped"],
                "rows_from_cache": self.counters.rows_from["from_cache"],
                "tokens": self.counters.tokens,
                "cost_usd": cost_usd(self.counters.tokens, price),
                "requests": sum(p["requests"] for p in providers.values()),
                "retries": sum(p["retries"] for p in providers.values()),
                "elapsed_s": round(elapsed, 3),
                "rows_per_s": round(self.counters.rows_done / elapsed, 1) if elapsed > 0 else 0.0,
                "providers": providers,
            },
            "job": {
                **job_counters,
                "cost_usd": cost_usd(job_counters["tokens"], price),
                "total_rows": self.manifest.data.get("total_rows"),
                "total_units": self.manifest.data.get("total_units"),
            },
            "providers": providers,
        }

