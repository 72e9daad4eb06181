"""Airflow: embed one job as N mapped shard tasks, then check it is complete.

    embed[0] ... embed[N-1]  -> check_complete
    `run JOB --shard K/N`       `status JOB --check`

Two ways to run the shards (EMBEDDING_MODE):

- `cli` (default): each shard task is the CLI in a BashOperator, holding its
  worker slot until its shard is done. For synchronous providers (and the
  local model): the slot does the work.
- `deferrable`: each shard task is pipeline.airflow.EmbeddingJobOperator
  with `deferrable=True`, for `type: openai_batch` jobs: it submits its
  batches, collects and writes what finished, and while batches run it
  hands a small trigger to Airflow's triggerer and frees the worker slot;
  it resumes when a batch finishes. Needs Airflow 3 and the pipeline
  installed in the Airflow environment (workers and triggerer), and the
  key's variable set in the triggerer's environment too. The output's asset
  event (rows, model, dimensions, dtype, shard in its extra) goes through
  the asset alias `embedding-pipeline-output`.

In the `cli` mode each shard task is the CLI; a failed try (a provider down, a worker lost, a
SIGTERM from Airflow) leaves its finished parts checkpointed, and Airflow's
retry runs the same command, which continues where the try stopped: no
`--restart` anywhere. The shard that finishes the last part writes
`_SUCCESS`; `check_complete` fails unless it is there (`status --check` exits
1 while work is left).

Copy this file into your DAGs folder and set, in the scheduler's and workers'
environment (or edit the defaults below):

    EMBEDDING_JOB       the job file, readable by every worker (default /jobs/docs.yaml)
    EMBEDDING_SHARDS    how many shard tasks (default 4)
    EMBEDDING_MODE      cli (default) or deferrable, as above
    EMBEDDING_CLI       the command (default: this interpreter's `python -m pipeline`)
    EMBEDDING_DAG_ID    the DAG's id (default embed_<job file stem>)
    EMBEDDING_RETRIES, EMBEDDING_RETRY_DELAY_S   per shard (default 5, from 120 s, doubling)

Every shard writes into the job's one output directory, so the workers share
one host or a POSIX filesystem with working `flock`. Provider keys come from
the workers' environment, as `${VAR}` in the job file says. A job file or
input that is wrong (exit 2) fails the task at once, without the retries
that could not help: fix it, then clear the task.
"""
from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.x
    from airflow import DAG
    from airflow.exceptions import AirflowException, AirflowFailException
    from airflow.operators.bash import BashOperator

JOB = os.environ.get("EMBEDDING_JOB", "/jobs/docs.yaml")
MODE = os.environ.get("EMBEDDING_MODE", "cli")  # cli | deferrable
SHARDS = int(os.environ.get("EMBEDDING_SHARDS", "4"))
CLI = os.environ.get("EMBEDDING_CLI", f"{shlex.quote(sys.executable)} -m pipeline")
DAG_ID = os.environ.get("EMBEDDING_DAG_ID", f"embed_{Path(JOB).stem}".replace("-", "_"))
RETRIES = int(os.environ.get("EMBEDDING_RETRIES", "5"))  # each retry resumes; only lost in-flight parts are redone
RETRY_DELAY_S = float(os.environ.get("EMBEDDING_RETRY_DELAY_S", "120"))  # a provider outage gets time to pass
GRACE_S = 20  # after Airflow's SIGTERM, in-flight parts may finish; under its 30 s before SIGKILL

EXIT_FIX_JOB = 2  # the pipeline's "the job file or its inputs are wrong": a retry fails the same way


class PipelineOperator(BashOperator):
    """A BashOperator whose command exiting 2 fails the task without retries."""

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except AirflowException:
            process = self.subprocess_hook.sub_process
            if process is not None and process.returncode == EXIT_FIX_JOB:
                raise AirflowFailException("the job file or its inputs are wrong (exit 2): fix them, then clear "
                                           "the task; the log above says what") from None
            raise


job = shlex.quote(JOB)

with DAG(
    dag_id=DAG_ID,
    description=f"Embed {JOB} in {SHARDS} shards, resumably",
    schedule=None,  # run on demand, or set a schedule: a run on a complete output exits 0 at once
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # a second run's shards would find the first's shard locks held (exit 1)
    default_args={
        "retries": RETRIES,
        "retry_delay": timedelta(seconds=RETRY_DELAY_S),
        "retry_exponential_backoff": True,
    },
    tags=["embedding"],
) as dag:
    if MODE == "deferrable":  # Batch API jobs: no worker slot held while batches run
        from airflow.sdk import AssetAlias

        from pipeline.airflow import EmbeddingJobOperator  # only here: the cli mode needs no pipeline in Airflow's env
        from pipeline.airflow.operator import DEFAULT_ALIAS

        embed = EmbeddingJobOperator.partial(
            task_id="embed", job=JOB, deferrable=True, grace_s=GRACE_S,
            outlets=[AssetAlias(DEFAULT_ALIAS)],  # each shard's event for the output's URI: schedule on the Asset
        ).expand(shard=[f"{k}/{SHARDS}" for k in range(SHARDS)])
    elif MODE == "cli":
        embed = PipelineOperator.partial(task_id="embed").expand(
            # exec: Airflow's SIGTERM on timeout or kill reaches the pipeline, which checkpoints
            bash_command=[
                f"exec {CLI} --log-format json run {job} --shard {k}/{SHARDS} --no-progress --grace-seconds {GRACE_S}"
                for k in range(SHARDS)
            ],
        )
    else:
        raise ValueError(f"EMBEDDING_MODE={MODE!r}: write cli or deferrable")
    check_complete = PipelineOperator(
        task_id="check_complete",
        bash_command=f"exec {CLI} --log-format json status {job} --check",
        retries=0,  # nothing to wait for: the shards are done or they failed
    )
    embed >> check_complete
