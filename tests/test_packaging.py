"""`pip install` of the project gives both `python -m pipeline` and the
`embedding-pipeline` console script, with the package and nothing else in
the wheel, and the extras users install."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import REPO

PIP_TIMEOUT_S = 240
SETUPTOOLS_MIN = "70.1"  # builds wheels without the `wheel` package; older venvs bundle 65


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The project built into a wheel (from a copy, so the checkout gets no
    build/ folder) and pip-installed into a target folder: (wheel, target)."""
    pytest.importorskip("setuptools", minversion=SETUPTOOLS_MIN,
                        reason=f"building the wheel offline needs setuptools>={SETUPTOOLS_MIN} (the test extra has it)")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No network: the build uses this interpreter's setuptools and no dependency is fetched.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=PIP_TIMEOUT_S)
    (wheel,) = (tmp / "dist").glob("embedding_pipeline-*.whl")
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=PIP_TIMEOUT_S)
    return wheel, target


def run_installed(target: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """A command run away from the checkout, so only the installed copy can be imported."""
    env = {"PYTHONPATH": str(target), "PATH": f"{target / 'bin'}:/usr/bin:/bin"}
    return subprocess.run(command, cwd=target.parent, env=env, capture_output=True, text=True, timeout=60)


def test_the_console_script_runs_the_installed_cli(installed: tuple[Path, Path]) -> None:
    _, target = installed
    result = run_installed(target, str(target / "bin" / "embedding-pipeline"), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m pipeline") and "validate" in result.stdout


def test_python_dash_m_pipeline_runs_the_installed_package(installed: tuple[Path, Path]) -> None:
    _, target = installed
    result = run_installed(target, sys.executable, "-c",
                           "import pipeline, runpy, sys; print(pipeline.__file__, file=sys.stderr); "
                           "sys.argv = ['pipeline', 'run', '--help']; runpy.run_module('pipeline', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(str(target / "pipeline"))  # the installed copy, not the checkout
    assert "--shard K/N" in result.stdout
    via_m = run_installed(target, sys.executable, "-m", "pipeline", "--help")
    assert via_m.returncode == 0 and "--log-format" in via_m.stdout


def test_the_wheel_holds_the_package_and_declares_the_extras(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(meta_name).decode())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"pipeline"}
    assert {"pipeline/__main__.py", "pipeline/providers/openai.py", "pipeline/logfmt.py",
            "pipeline/airflow/operator.py", "pipeline/airflow/trigger.py"} <= set(names)
    assert "embedding-pipeline = pipeline.cli.main:main" in entry_points
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"local", "test", "airflow"} <= extras
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("torch==2.13.0") and "extra == \"local\"" in r for r in requires)
    unbounded = [r for r in requires if "<" not in r.split(";")[0] and "==" not in r.split(";")[0]]
    assert unbounded == [], "every dependency is a range known to work, with an upper bound"
