"""The example DAG (jobs/embed_dag.py) parses and runs in a real Airflow: N
mapped shard tasks and the completion check, against a loopback provider;
a shard whose try fails on a provider fault is retried by Airflow and the
retry resumes instead of starting over; a wrong job (exit 2) is not retried.
In the deferrable mode (EMBEDDING_MODE=deferrable: pipeline.airflow's
EmbeddingJobOperator) against a loopback Files + Batches server: every shard
defers while its batches run, BatchTrigger polls them and resumes it, the
output is complete and exact and each shard emits the output's asset event
with its extra; a wrong job fails each shard once. The trigger serialises to
batch ids, URL and the key's variable name (never the key) and keeps the
triggerer's event loop free; a synchronous job runs in execute.

Airflow runs in its own environment, as in production: `.venv-airflow` at the
repository root (what `.ci/run` builds from `.ci/airflow-requirements.txt`),
or this interpreter's if it has Airflow. Its tasks run the pipeline from this
interpreter through EMBEDDING_CLI in the cli mode; the deferrable mode imports
the checkout's pipeline (PYTHONPATH) with its dependencies, which
.ci/airflow-requirements.txt pins too. Skipped where neither has Airflow (CI,
which sets EMBEDDING_TEST_REQUIRE_AIRFLOW, fails instead). To run it:

    python3 -m venv .venv-airflow && .venv-airflow/bin/pip install -r .ci/airflow-requirements.txt
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import (KEY, KEY_VAR, MODEL, REPO, assert_vectors_exact, cli_env, docs_table, provider_entry, read_parts, rows_sent,
                      sample_texts, write_job, write_parquet)
from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider
from pipeline.core.probe import PROBE_TEXTS

TRIGGER_AGENT = "embedding-pipeline/0.1 (airflow trigger)"  # pipeline/airflow/trigger.py's polls

AIRFLOW_VENV_PYTHON = REPO / ".venv-airflow" / "bin" / "python"
REQUIRE_AIRFLOW_ENV = "EMBEDDING_TEST_REQUIRE_AIRFLOW"  # set by .ci/run: a missing Airflow fails the suite


def airflow_python() -> str | None:
    """The interpreter that has Airflow: its own environment first, else this one."""
    if AIRFLOW_VENV_PYTHON.exists():
        return str(AIRFLOW_VENV_PYTHON)
    return sys.executable if importlib.util.find_spec("airflow") is not None else None


AIRFLOW_PYTHON = airflow_python()
if AIRFLOW_PYTHON is None and os.environ.get(REQUIRE_AIRFLOW_ENV):
    raise RuntimeError(f"{REQUIRE_AIRFLOW_ENV} is set but no Airflow was found: {AIRFLOW_VENV_PYTHON} is missing")
pytestmark = pytest.mark.skipif(AIRFLOW_PYTHON is None, reason="no Airflow: see this file's docstring to install it")

N_ROWS = 60
ROWS_PER_PART = 5
SHARDS = 3
DAG_ID = "embed_job"
AIRFLOW_TIMEOUT_S = 280  # migrating a fresh sqlite database alone takes a while


def airflow_env(tmp: Path, job: Path) -> dict[str, str]:
    home = tmp / "airflow"
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "jobs" / "embed_dag.py", dags / "embed_dag.py")
    return cli_env(env_extra={
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "EMBEDDING_JOB": str(job),
        "EMBEDDING_SHARDS": str(SHARDS),
        "EMBEDDING_RETRY_DELAY_S": "1",
        "EMBEDDING_DAG_ID": DAG_ID,
        # the pipeline from this interpreter, whatever environment Airflow has
        "EMBEDDING_CLI": f"{shlex.quote(sys.executable)} -m pipeline",
        "PYTHONPATH": str(REPO),  # the checkout's pipeline, installed or not
    })


def airflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert AIRFLOW_PYTHON is not None
    return subprocess.run([AIRFLOW_PYTHON, "-m", "airflow", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=AIRFLOW_TIMEOUT_S)


def task_tries(home: Path) -> dict[tuple[str, int], tuple[str, int]]:
    """(task_id, map_index) -> (state, try_number) of the DAG's one run."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = ?",
                          (DAG_ID,)).fetchall()
    return {(task, index): (state, tries) for task, index, state, tries in rows}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow home with a migrated database, made once."""
    tmp = tmp_path_factory.mktemp("airflow-home")
    result = airflow(airflow_env(tmp, tmp / "job.yaml"), "db", "migrate")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "airflow"


def with_home(tmp: Path, migrated: Path, job: Path) -> dict[str, str]:
    shutil.copytree(migrated, tmp / "airflow")
    return airflow_env(tmp, job)


def in_airflow(env: dict[str, str], script: str, *args: str) -> dict[str, Any]:
    """Run a script in Airflow's interpreter; the JSON object it prints last."""
    assert AIRFLOW_PYTHON is not None
    result = subprocess.run([AIRFLOW_PYTHON, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=AIRFLOW_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


PARSE = """
import json, os
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
dag = bag.dags.get(os.environ["EMBEDDING_DAG_ID"])
embed = dag and dag.task_dict["embed"]
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": sorted(dag.task_dict) if dag else None,
    "commands": embed and embed.expand_input.value.get("bash_command"),
    "check_upstream": dag and sorted(dag.task_dict["check_complete"].upstream_task_ids),
    "retries": embed and embed.partial_kwargs.get("retries"),
    "operator": embed and embed.operator_name,
    "shards": embed and embed.expand_input.value.get("shard"),
    "job": embed and embed.partial_kwargs.get("job"),
    "deferrable": embed and embed.partial_kwargs.get("deferrable"),
    "outlets": embed and [type(o).__name__ + ":" + o.name for o in embed.partial_kwargs.get("outlets") or []],
}))
"""


def test_the_dag_parses_into_mapped_shards_and_a_completion_check(tmp_path: Path, migrated: Path) -> None:
    env = with_home(tmp_path, migrated, tmp_path / "jobs dir" / "job.yaml")  # a path that needs quoting
    parsed = in_airflow(env, PARSE)
    assert parsed["errors"] == {} and parsed["dags"] == [DAG_ID]
    assert parsed["tasks"] == ["check_complete", "embed"] and parsed["check_upstream"] == ["embed"]
    assert parsed["retries"] == 5
    commands = parsed["commands"]
    assert len(commands) == SHARDS
    for k, command in enumerate(commands):
        assert f"run '{tmp_path}/jobs dir/job.yaml' --shard {k}/{SHARDS}" in command
        assert "--restart" not in command




def test_the_deferrable_dag_parses_into_mapped_operator_shards_with_the_output_alias(
        tmp_path: Path, migrated: Path) -> None:
    env = {**with_home(tmp_path, migrated, tmp_path / "job.yaml"), "EMBEDDING_MODE": "deferrable"}
    parsed = in_airflow(env, PARSE)
    assert parsed["errors"] == {} and parsed["tasks"] == ["check_complete", "embed"]
    assert parsed["operator"] == "EmbeddingJobOperator" and parsed["deferrable"] is True
    assert parsed["shards"] == [f"{k}/{SHARDS}" for k in range(SHARDS)] and parsed["job"] == str(tmp_path / "job.yaml")
    assert parsed["outlets"] == ["AssetAlias:embedding-pipeline-output"]


def test_the_dag_runs_every_shard_retries_a_failed_one_and_the_retry_resumes(tmp_path: Path, migrated: Path) -> None:
    texts = sample_texts(N_ROWS)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    # One request at a time and one request per part: a fault costs at most the parts in flight.
    # The 9th request has its key refused: the try running then (the second
    # shard's, its third part, when Airflow runs the shards one by one) exits 1.
    script = ["ok"] * 8 + ["401"]
    with FakeProvider(dim=8, script=script) as fp:
        job = write_job(tmp_path, [provider_entry(fp, max_concurrency=1)], rows_per_part=ROWS_PER_PART,
                        batching={"max_inputs_per_request": ROWS_PER_PART})
        env = with_home(tmp_path, migrated, job)
        result = airflow(env, "dags", "test", DAG_ID)
        sent = rows_sent(fp)
    log = result.stdout + result.stderr
    tries = task_tries(tmp_path / "airflow")
    assert tries.get(("check_complete", -1)) == ("success", 1), log[-5000:]
    shards = {index: tries[("embed", index)] for index in range(SHARDS)}
    assert all(state == "success" for state, _ in shards.values()), shards
    assert sorted(n for _, n in shards.values()) == [1] * (SHARDS - 1) + [2], shards  # one shard retried once

    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    table = read_parts(out)
    assert table.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(N_ROWS)]
    assert set(sent) == set(texts)
    # The retry resumed: the failed try had committed parts, the retry did
    # only the rest, and no row was answered twice (one request at a time:
    # the refused one was the only one in flight).
    runs = json.loads((out / "_manifest.json").read_text())["runs"]
    (stopped,) = [r for r in runs if r["status"] == "stopped"]
    k = stopped["shard"][0]
    (retry,) = [r for r in runs if r["shard"] == [k, SHARDS] and r["status"] != "stopped"]
    shard_rows = len(range(k, N_ROWS // ROWS_PER_PART, SHARDS)) * ROWS_PER_PART
    assert 0 < stopped["rows_done"] < shard_rows
    assert retry["rows_done"] == shard_rows - stopped["rows_done"]
    assert [t for t, n in sent.items() if n > 1] == []


def test_a_wrong_job_fails_each_shard_at_once_without_retries(tmp_path: Path, migrated: Path) -> None:
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], input_path="missing/*.parquet")  # exit 2: no input
        env = with_home(tmp_path, migrated, job)
        result = airflow(env, "dags", "test", DAG_ID)
        assert fp.count() == 0
    tries = task_tries(tmp_path / "airflow")
    log = result.stdout + result.stderr
    assert [tries[("embed", k)] for k in range(SHARDS)] == [("failed", 1)] * SHARDS, log[-5000:]
    assert tries[("check_complete", -1)][0] == "upstream_failed"
    assert "exit 2" in log


# ------------------------------------------------------------------ deferrable Batch API shards
def batch_entry(api: FakeBatchAPI) -> dict[str, Any]:
    return provider_entry(api.base_url, name="batch", type="openai_batch", poll_interval_s=0.05,
                          max_inputs_per_batch=ROWS_PER_PART * 2)


def asset_events(home: Path) -> list[tuple[str, dict[str, Any], int]]:
    """(asset uri, event extra, source map index) of every asset event of the DAG's run."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT a.uri, e.extra, e.source_map_index FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                          "WHERE e.source_dag_id = ?", (DAG_ID,)).fetchall()
    return [(uri, json.loads(extra) if isinstance(extra, str) else extra, index) for uri, extra, index in rows]


def test_deferrable_batch_shards_defer_while_batches_run_finish_and_emit_the_output_asset(
        tmp_path: Path, migrated: Path) -> None:
    texts = sample_texts(N_ROWS)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeBatchAPI(dim=8, duration_s=1.0) as api:
        job = write_job(tmp_path, [batch_entry(api)], rows_per_part=ROWS_PER_PART)
        env = {**with_home(tmp_path, migrated, job), "EMBEDDING_MODE": "deferrable"}
        result = airflow(env, "dags", "test", DAG_ID)
        trigger_polls = api.user_agents[TRIGGER_AGENT]
    log = result.stdout + result.stderr
    tries = task_tries(tmp_path / "airflow")
    assert tries.get(("check_complete", -1)) == ("success", 1), log[-5000:]
    assert [tries[("embed", k)] for k in range(SHARDS)] == [("success", 1)] * SHARDS, log[-5000:]
    # Every shard deferred (its batches were running) and was resumed by its trigger, which polled them.
    assert log.count("deferring until one finishes") >= SHARDS, log[-5000:]
    assert log.count("running trigger in line") >= SHARDS and trigger_polls >= SHARDS

    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), texts, 8)
    assert Counter(t for t in api.submitted.elements() if t not in PROBE_TEXTS) == Counter(texts)

    events = asset_events(tmp_path / "airflow")
    assert sorted(index for _, _, index in events) == list(range(SHARDS)), events
    for uri, extra, index in events:
        assert uri == out.resolve().as_uri()
        assert extra["shard"] == f"{index}/{SHARDS}" and extra["model"] == MODEL
        assert extra["dimensions"] == 8 and extra["dtype"] == "float32" and 0 < extra["rows"] <= N_ROWS
    assert max(extra["rows"] for _, extra, _ in events) == N_ROWS  # the last shard saw the whole job done


def test_a_wrong_job_fails_each_deferrable_shard_at_once_without_retries(tmp_path: Path, migrated: Path) -> None:
    with FakeBatchAPI(dim=8) as api:
        job = write_job(tmp_path, [batch_entry(api)], input_path="missing/*.parquet")  # exit 2: no input
        env = {**with_home(tmp_path, migrated, job), "EMBEDDING_MODE": "deferrable"}
        result = airflow(env, "dags", "test", DAG_ID)
        assert api.created == [] and api.polls == 0
    tries = task_tries(tmp_path / "airflow")
    log = result.stdout + result.stderr
    assert [tries[("embed", k)] for k in range(SHARDS)] == [("failed", 1)] * SHARDS, log[-5000:]
    assert tries[("check_complete", -1)][0] == "upstream_failed"
    assert "exit 2" in log
    assert asset_events(tmp_path / "airflow") == []


DIRECT = """
import asyncio, json, logging, sys
from airflow.sdk.exceptions import TaskDeferred
from pipeline.airflow import BatchTrigger, EmbeddingJobOperator

phase, arg = sys.argv[1], sys.argv[2]
if phase == "defer":
    try:
        EmbeddingJobOperator(task_id="embed", job=arg, deferrable=True).execute({})
        print(json.dumps({"deferred": False}))
    except TaskDeferred as deferred:
        path, kwargs = deferred.trigger.serialize()
        print(json.dumps({"deferred": True, "path": path, "kwargs": kwargs, "method": deferred.method_name}))
elif phase == "outcome":  # which exception a failed run raises
    try:
        EmbeddingJobOperator(task_id="embed", job=arg, deferrable=True).execute({})
        print(json.dumps({"raised": None}))
    except Exception as err:
        print(json.dumps({"raised": type(err).__name__, "message": str(err)}))
elif phase == "sync":  # a synchronous job runs to its end in execute, and emits the output's event
    from airflow.sdk import AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors
    from pipeline.airflow.operator import DEFAULT_ALIAS
    events = OutletEventAccessors()
    result = EmbeddingJobOperator(task_id="embed", job=arg, deferrable=True).execute({"outlet_events": events})
    alias = events[AssetAlias(DEFAULT_ALIAS)].asset_alias_events
    print(json.dumps({"result": result, "events": [[e.dest_asset_key.uri, e.extra] for e in alias]}))
else:  # run the trigger rebuilt from its serialised form to its first event (or time out), in asyncio's debug mode
    slow = []
    handler = logging.Handler()
    handler.emit = lambda record: slow.append(record.getMessage()) if "took" in record.getMessage() else None
    logging.getLogger("asyncio").addHandler(handler)
    path, kwargs = json.loads(arg)
    async def first():
        asyncio.get_running_loop().slow_callback_duration = 0.05
        try:
            return (await asyncio.wait_for(anext(BatchTrigger(**kwargs).run()), 2.0)).payload
        except asyncio.TimeoutError:
            return None
    print(json.dumps({"event": asyncio.run(first(), debug=True), "slow": slow}))
"""


def test_the_trigger_carries_batch_ids_url_and_the_key_variable_name_never_the_key(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(20)))
    with FakeBatchAPI(dim=8) as api:
        api.hold()
        job = write_job(tmp_path, [batch_entry(api)], rows_per_part=ROWS_PER_PART)
        env = airflow_env(tmp_path, job)
        deferred = in_airflow(env, DIRECT, "defer", str(job))
        assert deferred["deferred"] and deferred["method"] == "resume"
        assert deferred["path"] == "pipeline.airflow.trigger.BatchTrigger"
        kwargs = deferred["kwargs"]
        assert sorted(kwargs["batch_ids"]) == sorted(api.created) and len(api.created) >= 2
        assert kwargs["base_url"] == api.base_url and kwargs["api_key_env"] == KEY_VAR
        assert KEY not in json.dumps(deferred)
        serialised = json.dumps([deferred["path"], kwargs])

        polls = api.user_agents[TRIGGER_AGENT]
        held = in_airflow(env, DIRECT, "trigger", serialised)  # batches running: it polls and does not fire
        assert held["event"] is None and api.user_agents[TRIGGER_AGENT] > polls
        api.release()
        fired = in_airflow(env, DIRECT, "trigger", serialised)
        assert fired["event"]["status"] == "finished" and fired["event"]["batch_id"] in api.created
        assert fired["slow"] == [], "a blocking call held the triggerer's event loop"
        polls = api.user_agents[TRIGGER_AGENT]
        no_key = in_airflow({k: v for k, v in env.items() if k != KEY_VAR}, DIRECT, "trigger", serialised)
        assert no_key["event"]["status"] == "error" and KEY_VAR in no_key["event"]["message"]
        assert api.user_agents[TRIGGER_AGENT] == polls


def test_the_trigger_polls_with_the_providers_auth_headers_and_query_filled_from_the_triggerers_environment(
        tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(20)))
    org = "org-secret-4711"
    with FakeBatchAPI(dim=8, auth="api-key", required_query={"api-version": "2024-10-21"},
                      required_headers={"X-Org": org}) as api:  # Azure's key header and route, a gateway's header
        api.hold()
        entry = {**batch_entry(api), "auth": "api-key", "query": {"api-version": "2024-10-21"},
                 "headers": {"X-Org": "${ORG_ID}"}}
        job = write_job(tmp_path, [entry], rows_per_part=ROWS_PER_PART)
        env = {**airflow_env(tmp_path, job), "ORG_ID": org}
        deferred = in_airflow(env, DIRECT, "defer", str(job))
        kwargs = deferred["kwargs"]
        assert deferred["deferred"] and kwargs["auth"] == "api-key"
        assert kwargs["headers"] == {"X-Org": "${ORG_ID}"} and kwargs["query"] == {"api-version": "2024-10-21"}
        assert org not in json.dumps(deferred) and KEY not in json.dumps(deferred)  # names stored, never values
        serialised = json.dumps([deferred["path"], kwargs])

        api.release()
        fired = in_airflow(env, DIRECT, "trigger", serialised)  # a Bearer poll without them reads a 404
        assert fired["event"]["status"] == "finished" and fired["event"]["batch_id"] in api.created
        polls = api.user_agents[TRIGGER_AGENT]
        no_org = in_airflow({k: v for k, v in env.items() if k != "ORG_ID"}, DIRECT, "trigger", serialised)
        assert no_org["event"]["status"] == "error" and "ORG_ID" in no_org["event"]["message"]
        assert api.user_agents[TRIGGER_AGENT] == polls  # nothing sent without it


def test_a_synchronous_job_runs_to_its_end_in_execute_and_emits_the_output_asset(tmp_path: Path) -> None:
    texts = sample_texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=ROWS_PER_PART)
        ran = in_airflow(airflow_env(tmp_path, job), DIRECT, "sync", str(job))
    out = (tmp_path / "out").resolve()
    assert (out / "_SUCCESS").exists() and set(rows_sent(fp)) == set(texts)
    ((uri, extra),) = ran["events"]
    assert uri == out.as_uri() and ran["result"]["uri"] == uri
    assert extra == {"job": "test-job", "rows": 20, "total_rows": 20, "complete": True, "model": MODEL,
                     "dimensions": 8, "dtype": "float32", "shard": None}


def test_exit_1_raises_a_retried_failure_and_exit_2_one_that_is_not(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(10)))
    with FakeBatchAPI(dim=8, api_key="sk-another-key") as api:  # our key is refused: exit 1
        job = write_job(tmp_path, [batch_entry(api)])
        refused = in_airflow(airflow_env(tmp_path, job), DIRECT, "outcome", str(job))
        assert api.created == []
    assert refused["raised"] == "AirflowException" and "exit 1" in refused["message"]
    assert KEY not in refused["message"]
    wrong = write_job(tmp_path, [batch_entry(api)], input_path="missing/*.parquet", file_name="wrong.yaml")
    failed = in_airflow(airflow_env(tmp_path, wrong), DIRECT, "outcome", str(wrong))
    assert failed["raised"] == "AirflowFailException" and "exit 2" in failed["message"]
