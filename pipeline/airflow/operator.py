"""EmbeddingJobOperator: a job (or one `--shard K/N` of it) as an Airflow task.

    EmbeddingJobOperator(task_id="embed", job="/jobs/docs.yaml", shard="0/4", deferrable=True)

`execute` runs the job in the task's process, as `python -m pipeline run`
does. A job with a `type: openai_batch` provider and `deferrable=True` runs
as `run --no-wait`: it collects what finished, writes what is answered,
submits what fits the queue, and where a waiting run would wait on batches
the task defers to BatchTrigger (trigger.py) and gives its worker slot
back; the trigger resumes it when a batch finishes, to do the same again.
Synchronous providers (and `deferrable=False`) run to the end in `execute`.

Exit statuses become Airflow outcomes: 0 success; 1 (work left: a provider
failing, a kill) AirflowException, which Airflow retries and the retry
continues; 2 (the job file or inputs are wrong) AirflowFailException, failed
at once without the retries that could not help.

On success the task emits an asset event for the output directory (its
`s3://...` URI or a `file://` URI) with `extra` = rows, model, dimensions,
dtype, shard: on each Asset in `outlets` (declare it to schedule other DAGs
on it), and through each AssetAlias there (the default: the alias
`embedding-pipeline-output`, which creates the asset from the output's URI).
A mapped task (`.partial(...).expand(shard=...)`) declares its outlets in
`partial()`, so that the scheduler knows them before the task runs.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import Asset, AssetAlias, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from ..batch.watch import utc_stamp, waiting_for
from ..checkpoint import layout
from ..commands.run import RunOptions
from ..commands.run import run as run_job
from ..commands.status import job_status
from ..config.job import JobConfig, load_job
from ..engine.runner import GRACE_S
from ..engine.stopper import SIGNALS
from ..errors import EXIT_BAD_JOB, EXIT_BATCHES_RUNNING, EXIT_OK, EXIT_WORK_LEFT, ConfigError, PipelineError
from ..storage.fs import is_remote
from .trigger import BatchTrigger

log = logging.getLogger("pipeline")

DEFAULT_ALIAS = "embedding-pipeline-output"  # the asset alias the output's events go through by default
DEFER_TIMEOUT = timedelta(hours=26)  # one deferral waits for the first of its batches: each ends within 24 h
DEFAULT_DTYPE = "float32"  # the vector column's type unless the job's output says otherwise


@dataclass(frozen=True)
class Outcome:
    code: int  # the CLI's exit status
    message: str  # the one-line error, for exit 1 and 2


def run_in_process(job_file: str, shard: layout.Shard | None, *, wait: bool, grace_s: float = GRACE_S) -> Outcome:
    """`python -m pipeline run JOB [--shard K/N] [--no-wait] --no-progress`, in this process.
    The run handles SIGTERM/SIGINT itself (a graceful stop, then exit 1); the handlers that
    were there before (the task runner's) are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        job = load_job(job_file)
        return Outcome(run_job(job, RunOptions(shard=shard, progress=False, wait=wait, grace_s=grace_s)), "")
    except PipelineError as err:
        return Outcome(err.exit_code, str(err))
    except OSError as err:
        return Outcome(EXIT_WORK_LEFT, f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}")
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)


def parse_shard(shard: str | Sequence[int] | None) -> layout.Shard | None:
    """"K/N", (K, N) or [K, N] (as a mapped task receives it), or None for the whole job."""
    if shard is None or shard == "":
        return None
    text = shard if isinstance(shard, str) else "/".join(str(int(x)) for x in shard) if len(shard) == 2 else "?"
    try:
        return layout.parse_shard(text)
    except ValueError as err:
        raise ConfigError(f"shard: {err}") from None


def output_uri(job: JobConfig) -> str:
    """The output directory as an asset URI: its own URI, or file:// for a local path."""
    path = job.output.path
    return path.rstrip("/") if is_remote(path) else Path(path.removeprefix("file://")).resolve().as_uri()


def asset_extra(job_file: str, job: JobConfig, shard: layout.Shard | None) -> dict[str, Any]:
    """What the output holds now (read from its manifest), for the asset event."""
    report = job_status(job_file)
    return {
        "job": job.name,
        "rows": report.get("rows_done", 0),
        "total_rows": report.get("total_rows"),
        "complete": report.get("state") == "complete",
        "model": job.embedding.model,
        "dimensions": report.get("dimensions") or job.embedding.dimensions,
        "dtype": getattr(job.output, "vector_dtype", DEFAULT_DTYPE),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
    }


class EmbeddingJobOperator(BaseOperator):
    """Run an embedding job (or one shard of it); with `deferrable=True`, a Batch API job
    waits for its batches in the triggerer, not on a worker."""

    template_fields: Sequence[str] = ("job", "shard")
    ui_color = "#e8f0fe"

    def __init__(self, *, job: str, shard: str | Sequence[int] | None = None, deferrable: bool = False,
                 grace_s: float = GRACE_S, defer_timeout: timedelta | None = DEFER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.outlets:  # a mapped task declares its outlets in partial(): see the module's docstring
            self.outlets = [AssetAlias(DEFAULT_ALIAS)]
        self.job = job
        self.shard = shard
        self.deferrable = deferrable
        self.grace_s = grace_s
        self.defer_timeout = defer_timeout

    def execute(self, context: Any) -> dict[str, Any]:
        return self._run(context)

    def resume(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from BatchTrigger: a batch finished (or the trigger wants a run to look)."""
        event = event or {}
        if event.get("status") == "error":
            raise AirflowException(f"{event.get('message')}; a retry resumes the job")
        log.info("resumed: %s", event.get("reason") or f"batch {event.get('batch_id')} is {event.get('batch_status')}")
        return self._run(context)

    def _run(self, context: Any) -> dict[str, Any]:
        try:
            shard = parse_shard(self.shard)
        except ConfigError as err:
            raise AirflowFailException(str(err)) from None
        outcome = run_in_process(self.job, shard, wait=not self.deferrable, grace_s=self.grace_s)
        if outcome.code == EXIT_OK:
            return self._emit(context, shard)
        if outcome.code == EXIT_BATCHES_RUNNING:
            self._defer(shard)
        if outcome.code == EXIT_BAD_JOB:
            raise AirflowFailException(f"{outcome.message} (exit 2: the job file or its inputs are wrong; fix them, "
                                       f"then clear the task)")
        raise AirflowException(f"{outcome.message} (exit {outcome.code}: a retry continues where this try stopped)")

    def _defer(self, shard: layout.Shard | None) -> None:
        job = load_job(self.job, require_env=False)
        watch = waiting_for(job, self.job, shard)
        assert watch is not None, "exit 99 comes only from a job with a batch provider and a manifest"
        log.info("%d batch(es) running on %s; deferring until one finishes (first look due at %s)",
                 len(watch.batch_ids), watch.provider, utc_stamp(watch.next_check_s or time.time()))
        self.defer(trigger=BatchTrigger(batch_ids=list(watch.batch_ids), created_s=list(watch.created_s),
                                        base_url=watch.base_url, api_key_env=watch.api_key_env,
                                        provider=watch.provider, poll_interval_s=watch.poll_interval_s,
                                        max_attempts=job.retry.max_attempts, auth=watch.auth,
                                        headers=dict(watch.headers), query=dict(watch.query)),
                   method_name="resume", timeout=self.defer_timeout)

    def _emit(self, context: Any, shard: layout.Shard | None) -> dict[str, Any]:
        """The output's asset event, on every Asset and AssetAlias among the outlets; returns its extra."""
        job = load_job(self.job, require_env=False)
        uri, extra = output_uri(job), asset_extra(self.job, job, shard)
        events = context["outlet_events"]
        for outlet in self.outlets:
            if isinstance(outlet, AssetAlias):
                events[outlet].add(Asset(uri), extra=extra)
            elif isinstance(outlet, Asset):
                events[outlet].extra = extra
        log.info("output %s: %s rows, model %s, %s dimensions", uri, f"{extra['rows']:,}", extra["model"],
                 extra["dimensions"])
        return {"uri": uri, **extra}
