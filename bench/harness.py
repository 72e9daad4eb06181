"""What every benchmark needs: generated inputs, the bench server in its own
process, and a job run through `python -m pipeline run` with its wall time,
CPU time and peak RSS measured for that one process."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
KEY_VAR = "BENCH_API_KEY"
WORDS = (
    "the of and to in is was for on that with as by at from his her an which are this be were or has had "
    "embedding vector provider request token window latency batch parquet arrow column model answer limit "
    "river mountain city garden market history science music letter winter summer ocean forest engine"
).split()


def make_input(path: Path, rows: int, *, words_per_row: int = 12, files: int = 1, seed: int = 0) -> Path:
    """`rows` short English-like texts in `files` Parquet files under `path` (made once, reused).
    Made in a child process: see `Measured.floor_mb`."""
    done = path / "_READY"
    if not (done.exists() and done.read_text() == f"{rows} {words_per_row} {files} {seed}"):
        subprocess.run([PYTHON, __file__, "make-input", str(path), str(rows), str(words_per_row), str(files), str(seed)],
                       check=True)
    return path


def _write_input(path: Path, rows: int, words_per_row: int, files: int, seed: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS, dtype=object)
    per_file = -(-rows // files)
    for f in range(files):
        start, end = f * per_file, min(rows, (f + 1) * per_file)
        if start >= end:
            break
        picks = vocab[rng.integers(0, len(vocab), size=(end - start, words_per_row))]
        texts = [f"doc {start + i}: " + " ".join(row) for i, row in enumerate(picks)]
        pq.write_table(pa.table({"body": pa.array(texts, pa.string())}), path / f"in-{f:03d}.parquet")
    (path / "_READY").write_text(f"{rows} {words_per_row} {files} {seed}")


class Server:
    """bench/server.py in its own process."""

    def __init__(self, **options: Any) -> None:
        args = [PYTHON, str(REPO / "bench" / "server.py")]
        for key, value in options.items():
            if value is True:  # a flag
                args.append(f"--{key.replace('_', '-')}")
            elif value is not None and value is not False:
                args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"bench server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, np.ndarray]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=30) as resp:
            cols = json.load(resp)
        return {k: np.asarray(v) for k, v in cols.items()}

    def reset(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=30).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def job_file(work: Path, name: str, inputs: Path, server: Server, *, dim: int, concurrency: int | None,
             rows_per_request: int | None, rows_per_part: int | None, rpm: int | None = None,
             tpm: int | None = None, provider: dict[str, Any] | None = None) -> Path:
    """A job on `server`; None for concurrency, rows_per_request or rows_per_part
    leaves the key out (the job's default, as a new user's job has it)."""
    entry: dict[str, Any] = {"name": "bench", "base_url": server.base_url, "api_key": "${" + KEY_VAR + "}",
                             "timeout_s": 60}
    if concurrency is not None:
        entry["max_concurrency"] = concurrency
    if rpm:
        entry["requests_per_minute"] = rpm
    if tpm:
        entry["tokens_per_minute"] = tpm
    output: dict[str, Any] = {"path": str(work / "out" / name)}
    if rows_per_part is not None:
        output["rows_per_part"] = rows_per_part
    job: dict[str, Any] = {
        "name": name,
        "input": {"path": str(inputs), "text_column": "body"},
        "output": output,
        "embedding": {"model": "text-embedding-3-small", "dimensions": dim},
        "providers": [provider or entry],
        "retry": {"max_attempts": 8, "initial_backoff_s": 0.2, "max_backoff_s": 5},
    }
    if rows_per_request is not None:
        job["batching"] = {"max_inputs_per_request": rows_per_request, "max_tokens_per_request": 300_000}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@dataclass(frozen=True)
class Measured:
    rc: int
    started: float  # time.time() just before the process started
    wall_s: float
    cpu_s: float  # user + system of that process (its threads included)
    sys_s: float  # of which system: page faults, syscalls, the kernel's copies
    peak_rss_mb: float
    # The bench's own peak RSS when it started the process: Linux carries a
    # parent's high-water mark into a child across fork and exec, so the
    # child's peak reads as at least this. The bench keeps it low (inputs are
    # made in child processes); a peak at the floor is not a measurement.
    floor_mb: float
    stderr: str


def run(args: list[str], *, env: dict[str, str] | None = None, stop_when: Any = None, timeout_s: float = 900) -> Measured:
    """Run one process and measure it alone (os.wait4: its own rusage, not the server's).
    `stop_when()` is polled; when true the process gets SIGTERM."""
    full_env = {**os.environ, KEY_VAR: "sk-bench", "PYTHONUNBUFFERED": "1", **(env or {})}
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-stderr-{os.getpid()}.txt"
    with open(err_path, "w") as err:
        floor_mb = self_rss_mb()
        started = time.time()
        proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if stop_when is not None and stop_when():
                proc.terminate()
                stop_when = None
            if time.time() > deadline:
                proc.kill()
            time.sleep(0.02)
    wall = time.time() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text()
    err_path.unlink(missing_ok=True)
    return Measured(proc.returncode, started, wall, usage.ru_utime + usage.ru_stime, usage.ru_stime,
                    usage.ru_maxrss / 1024.0, floor_mb, stderr)


def pipeline_args(job: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "pipeline", "run", str(job), "--no-progress", *extra]


def output_rows(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in sorted(out.glob("part-*.parquet")))


def self_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    if sys.argv[1:2] == ["make-input"]:
        _write_input(Path(sys.argv[2]), *(int(a) for a in sys.argv[3:7]))
    else:
        raise SystemExit("usage: harness.py make-input PATH ROWS WORDS_PER_ROW FILES SEED")
