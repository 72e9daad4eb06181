"""The `run` command: a job's run through the engine, with the strategy its
providers call for (the Batch API for an `openai_batch` provider, requests
otherwise), and the batches earlier runs left open dealt with."""
from __future__ import annotations

from ..batch.strategy import BatchStrategy
from ..batch.submit import cancel_open_batches, warn_open_batches
from ..config.job import JobConfig
from ..engine.requests import RequestStrategy
from ..engine.runner import Plan, RunOptions, run_job
from ..storage.output import Output


def run(job: JobConfig, options: RunOptions) -> int:
    """Run a job to completion or to a clean stop; returns the exit status."""
    batch = job.batch_provider is not None
    return run_job(job, options, Plan(
        strategy=BatchStrategy if batch else RequestStrategy,
        before_restart=cancel_open_batches,
        on_open=(lambda output, job, epoch: None) if batch else _warn_open_batches,
    ))


def _warn_open_batches(output: Output, job: JobConfig, epoch: str) -> None:
    warn_open_batches(output, epoch)  # a job moved off the Batch API: its batches are not collected


__all__ = ["RunOptions", "run"]
