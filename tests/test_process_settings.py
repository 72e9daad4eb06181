"""Importing the package changes nothing in the importing process (an Airflow
worker, a notebook); the CLI's `main()` applies its process settings to its
own process only, and `EMBEDDING_PIPELINE_PROCESS_SETTINGS=off` keeps them off."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

# What a process looks like: its environment, Arrow's default pool, whether
# pyarrow was told pandas is absent (pandas is installed here, so pyarrow's
# own answer is True), its threads, the collector's threshold. glibc's
# settings cannot be read back.
PROBE = r"""
import gc, json, os, sys
env_before = dict(os.environ)
{action}
import pyarrow as pa
state = {{
    "threads": len(os.listdir("/proc/self/task")),  # native ones too: OpenBLAS's workers
    "gc_young": gc.get_threshold()[0],
    "env_changed": sorted(k for k in set(os.environ) | set(env_before) if os.environ.get(k) != env_before.get(k)),
    "pool": pa.default_memory_pool().backend_name,
    "pandas_loaded": "pandas" in sys.modules,
}}
state["pandas_probe_done"] = not pa.lib._pandas_api.have_pandas  # asks, unless it was asked already
print(json.dumps(state))
"""

IMPORT_ALL = """
import pipeline, pipeline.__main__, pipeline.cli.main, pipeline.engine.runner, pipeline.batch.strategy
import pipeline.commands.estimate, pipeline.commands.status, pipeline.commands.validate, pipeline.commands.run
import pipeline.providers.openai
"""
RUN_MAIN = """
import pipeline.cli.main
try:
    pipeline.cli.main.main(["validate", "/nonexistent/job.yaml"])
except SystemExit:
    pass
"""


def probe(action: str, **env: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(action=action)], cwd=REPO, env=cli_env(env_extra=env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_every_layer_changes_nothing_in_the_process() -> None:
    baseline = probe("")
    imported = probe(IMPORT_ALL)
    assert imported["env_changed"] == []
    assert imported["pool"] == baseline["pool"] != "system"  # Arrow's own default (mimalloc or jemalloc)
    assert imported["pandas_probe_done"] is False


def test_the_clis_main_applies_its_settings_to_its_own_process_without_touching_the_environment() -> None:
    state = probe(RUN_MAIN)
    assert state["pool"] == "system"
    assert state["pandas_probe_done"] is True and state["pandas_loaded"] is False
    assert state["env_changed"] == []  # nothing a child process would inherit
    assert state["gc_young"] >= 20_000


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no worker thread on one core")
def test_numpys_blas_starts_no_spinning_workers_under_the_cli() -> None:
    quiet, default = probe(RUN_MAIN), probe(RUN_MAIN, EMBEDDING_PIPELINE_PROCESS_SETTINGS="off")
    assert quiet["threads"] < default["threads"]
    assert quiet["env_changed"] == []  # set only while numpy loaded


def test_a_users_own_blas_threads_are_kept() -> None:
    assert probe(RUN_MAIN, OPENBLAS_NUM_THREADS="2")["threads"] >= 2


@pytest.mark.parametrize("value", ["off", "0"])
def test_the_process_settings_have_an_opt_out(value: str) -> None:
    state = probe(RUN_MAIN, EMBEDDING_PIPELINE_PROCESS_SETTINGS=value)
    assert state["pool"] != "system"
    assert state["pandas_probe_done"] is False
    assert state["gc_young"] < 20_000


def test_a_users_own_arrow_pool_is_kept() -> None:
    state = probe(RUN_MAIN, ARROW_DEFAULT_MEMORY_POOL="jemalloc")
    assert state["pool"] == "jemalloc"


def applied(**env: str) -> list[str]:
    code = "import json; from pipeline.cli.process import apply_process_settings; print(json.dumps(apply_process_settings()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(env_extra=env), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_each_glibc_setting_yields_to_the_users_own_variable() -> None:
    names = ("malloc_arenas", "malloc_mmap_threshold", "malloc_trim_threshold")
    assert set(names) <= set(applied())  # glibc here
    for name, var in zip(names, ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        got = applied(**{var: "1048576" if var != "MALLOC_ARENA_MAX" else "4"})
        assert name not in got and set(names) - {name} <= set(got)
