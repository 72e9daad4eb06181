"""The figures on realistic documents (bench/corpus.py): the client's CPU and
rows/s against the fair SDK loop (bench/baseline.py) at 1,536 and 3,072
dimensions with the stage split, the latency-bound share on a server whose
latency follows the request's size, and peak memory of a default job at
20,000 and 200,000 rows.

Every speed figure is a ratio against the fair loop run on the same server a
moment apart: REPEATS rounds, each the pipeline then the loop, the ratio taken
within each round; the table shows the median round and the spread (lowest
to highest) of the rounds, so a neighbour's burst on a shared machine moves
one round, not the figure."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from figures import Row, Sizes, at_floor, check, fresh, peak_text
from statistics import median

from harness import (
    PYTHON,
    REPO,
    Measured,
    Server,
    job_file,
    output_rows,
    pipeline_args,
    run,
)
from stages import STAGES, split

PY_SPY = str(Path(PYTHON).with_name("py-spy"))
CONCURRENCY = 16
ROWS_PER_REQUEST = 100  # the job: 100 inputs a request, 16 in flight
CPU_LATENCY_MS = 20  # a fast loopback server: the client's CPU is what binds
CPU_DIMS = (1536, 3072)
JUDGED_DIM = 1536  # the latency-bound figure's
JUDGED_DIMS = (1536, 3072)  # the CPU-bound targets hold at both (issue 25)
SPEED_TARGET = 2.5  # rows/s against the fair SDK loop's
CPU_TARGET = 0.30  # client CPU a row against the fair SDK loop's
LATENCY_RUNS = 3  # the latency-bound share must hold in every one
START_ROWS = 100  # a run this long is the start-up cost (one request's rows)
REPEATS = 3  # rounds of (pipeline, fair loop); the ratio is taken within a round, the median round shown
SIZE_LATENCY_MS, SIZE_LATENCY_MS_PER_1K = 300, 50  # a provider's time: fixed + per 1,000 tokens
MEMORY_DIMS = (1536, 3072)
MEMORY_LIMIT_MB = 500
MEMORY_GROWTH_LIMIT = 1.25


def corpus(work: Path, rows: int) -> tuple[Path, str]:
    """The corpus of `rows` documents and its measured distribution, both
    made in a child process (see harness.Measured.floor_mb)."""
    path = work / f"corpus-{rows}"
    done = subprocess.run([PYTHON, "bench/corpus.py", str(path), str(rows)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return path, done.stdout.strip()


def baseline(inputs: Path, out: Path, server: Server, dim: int, *, naive: bool = False,
             limit: int | None = None) -> Measured:
    """The fair SDK loop (or, `naive`, the SDK's defaults with every vector held to the end)."""
    return run([PYTHON, "bench/baseline.py", str(inputs), str(out), "--base-url", server.base_url, "--dim", str(dim),
                "--batch", str(ROWS_PER_REQUEST), "--concurrency", str(CONCURRENCY), *(["--naive"] if naive else []),
                *(["--limit", str(limit)] if limit else [])])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median of `values` and their range, for the table."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def cpu_real(work: Path, sizes: Sizes) -> list[Row]:
    n = sizes.real_rows
    inputs, described = corpus(work, n)
    rows = [Row(f"realistic corpus, {n:,} rows", described, "cl100k; bench/corpus.py", None, "", None)]
    with Server(latency_ms=CPU_LATENCY_MS) as server:
        for dim in CPU_DIMS:
            name = f"cpu-real-{dim}"
            job = job_file(work, name, inputs, server, dim=dim, concurrency=CONCURRENCY,
                           rows_per_request=ROWS_PER_REQUEST, rows_per_part=None)
            rounds: list[tuple[Measured, Measured]] = []
            for _ in range(REPEATS):
                fresh(work, name)
                ours = run(pipeline_args(job))
                check(ours, f"CPU-bound run at {dim} dims")
                assert output_rows(work / "out" / name) == n
                fair = baseline(inputs, work / "baseline.f32", server, dim)
                check(fair, f"fair SDK loop at {dim} dims")
                rounds.append((ours, fair))
            # Start-up (imports, the probe, the tokenizer's load): a run of the
            # first request's rows, each side; what is left is the cost a row.
            fresh(work, name)
            ours_start = run(pipeline_args(job, "--limit", str(START_ROWS)))
            check(ours_start, f"start-up run at {dim} dims")
            fair_start = baseline(inputs, work / "baseline.f32", server, dim, limit=START_ROWS)
            check(fair_start, f"fair SDK loop's start-up at {dim} dims")
            naive = baseline(inputs, work / "baseline.parquet", server, dim, naive=True)
            check(naive, f"naive SDK loop at {dim} dims")
            (work / "baseline.parquet").unlink(missing_ok=True)
            (work / "baseline.f32").unlink(missing_ok=True)
            speeds = [fair.wall_s / ours.wall_s for ours, fair in rounds]
            cpu_shares = [ours.cpu_s / fair.cpu_s for ours, fair in rounds]
            mid = sorted(range(REPEATS), key=lambda i: speeds[i])[REPEATS // 2]  # the median round, shown
            ours, fair = rounds[mid]
            us = [o.cpu_s / n * 1e6 for o, _ in rounds]
            fair_us = [f.cpu_s / n * 1e6 for _, f in rounds]
            speed, cpu_share = median(speeds), median(cpu_shares)
            past = n - START_ROWS
            ours_row = (median(o.cpu_s for o, _ in rounds) - ours_start.cpu_s) / past * 1e6
            fair_row = (median(f.cpu_s for _, f in rounds) - fair_start.cpu_s) / past * 1e6
            ours_rate = past / (median(o.wall_s for o, _ in rounds) - ours_start.wall_s)
            fair_rate = past / (median(f.wall_s for _, f in rounds) - fair_start.wall_s)
            judged = dim in JUDGED_DIMS
            rows += [
                Row(f"CPU-bound real text {dim}: rows/s", f"{n / ours.wall_s:,.0f}; x{spread(speeds)}",
                    f"fair SDK loop {n / fair.wall_s:,.0f} rows/s", speed, f">= {SPEED_TARGET}",
                    speed >= SPEED_TARGET if judged else None),
                Row(f"CPU-bound real text {dim}: client CPU per row",
                    f"{spread(us, '{:,.0f}')} us (sys {ours.sys_s / n * 1e6:,.0f}); x{spread(cpu_shares)}",
                    f"fair SDK loop {spread(fair_us, '{:,.0f}')} us", cpu_share, f"<= {CPU_TARGET}",
                    cpu_share <= CPU_TARGET if judged else None),
                Row(f"CPU-bound real text {dim}: past start-up", f"{ours_row:,.0f} us a row, {ours_rate:,.0f} rows/s "
                    f"(start-up {ours_start.cpu_s:.2f} s CPU, {ours_start.wall_s:.2f} s)",
                    f"fair SDK loop {fair_row:,.0f} us, {fair_rate:,.0f} rows/s (start-up {fair_start.cpu_s:.2f} s CPU)",
                    ours_row / fair_row, "", None),
                Row(f"CPU-bound real text {dim}: peak RSS", f"{max(o.peak_rss_mb for o, _ in rounds):,.0f} MB",
                    f"fair SDK loop {max(f.peak_rss_mb for _, f in rounds):,.0f} MB", None, f"< {MEMORY_LIMIT_MB} MB",
                    max(o.peak_rss_mb for o, _ in rounds) < MEMORY_LIMIT_MB),
                Row(f"CPU-bound real text {dim}: naive SDK loop", f"{n / naive.wall_s:,.0f} rows/s, "
                    f"{naive.cpu_s / n * 1e6:,.0f} us/row, {naive.peak_rss_mb:,.0f} MB",
                    f"the pipeline, median round: {n / ours.wall_s / (n / naive.wall_s):.2f}x rows/s",
                    naive.wall_s / ours.wall_s, "", None),
            ]
            if dim == CPU_DIMS[0]:
                profile = work / "cpu-real-profile.txt"
                fresh(work, name)
                prof = run([PY_SPY, "record", "-r", "250", "-f", "raw", "-o", str(profile), "--", *pipeline_args(job)])
                check(prof, "CPU-bound run under py-spy")
                shares = split(profile)
                us_row = median(us)
                rows += [Row(f"  stage {stage}", f"{shares[stage] * us_row:,.1f} us/row", "client CPU", shares[stage],
                             "", None) for stage in STAGES]
        fresh(work, f"cpu-real-{CPU_DIMS[-1]}")
    return rows


def served(st: dict[str, np.ndarray], rows: int) -> tuple[float, float, float]:
    """(rows/s over the span from the first request to the last answer, the
    ideal: the server's own time for those requests at CONCURRENCY in flight,
    the share of it)."""
    work_ = ~st["probe"] & (st["status"] == 200)
    span = st["answered"][work_].max() - st["arrived"][~st["probe"]].min()
    ideal = (st["answered"][work_] - st["arrived"][work_]).sum() / CONCURRENCY
    return rows / span, rows / ideal, ideal / span


def latency_real(work: Path, sizes: Sizes) -> list[Row]:
    """LATENCY_RUNS rounds of (pipeline, fair loop) on the size-dependent
    server: the share of the ideal must hold in every round (not the best
    one), and at least the loop's own in the same round."""
    n = sizes.real_rows
    inputs, _ = corpus(work, n)
    ours: list[tuple[float, float, float]] = []
    sdk: list[tuple[float, float, float]] = []
    with Server(latency_ms=SIZE_LATENCY_MS, latency_ms_per_1k_tokens=SIZE_LATENCY_MS_PER_1K) as server:
        job = job_file(work, "latency-real", inputs, server, dim=JUDGED_DIM, concurrency=CONCURRENCY,
                       rows_per_request=ROWS_PER_REQUEST, rows_per_part=None)
        for _ in range(LATENCY_RUNS):
            fresh(work, "latency-real")
            server.reset()
            check(run(pipeline_args(job)), "latency-bound run on real text")
            ours.append(served(server.stats(), n))
            server.reset()
            check(baseline(inputs, work / "baseline.f32", server, JUDGED_DIM), "fair SDK loop, latency-bound")
            sdk.append(served(server.stats(), n))
        fresh(work, "latency-real")
        (work / "baseline.f32").unlink(missing_ok=True)
    limit = f"{SIZE_LATENCY_MS} ms + {SIZE_LATENCY_MS_PER_1K} ms/1k tokens x {CONCURRENCY}"
    shares, sdk_shares = [o[2] for o in ours], [s[2] for s in sdk]
    every = ", ".join(f"{x:.3f}" for x in shares)
    lowest = min(shares)
    beats = [o[2] >= s[2] for o, s in zip(ours, sdk)]
    return [
        Row("latency-bound real text: rows/s", f"{spread([o[0] for o in ours], '{:,.0f}')}; shares {every}",
            f"ideal {ours[0][1]:,.0f} ({limit})", lowest, ">= 0.95 every run", lowest >= 0.95),
        Row("latency-bound real text: fair SDK loop rows/s", f"{spread([s[0] for s in sdk], '{:,.0f}')}; shares "
            + ", ".join(f"{x:.3f}" for x in sdk_shares), f"ideal {sdk[0][1]:,.0f}", median(sdk_shares), "", None),
        Row("latency-bound real text: pipeline / SDK share", f"{sum(beats)} of {len(beats)} rounds at least the loop's",
            "the loop's share in the same round", median(o / s for o, s in zip(shares, sdk_shares)),
            ">= 1 every round", all(beats)),
    ]


def memory_real(work: Path, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    small, large = sizes.memory_small, sizes.memory_large
    with Server() as server:
        for dim in MEMORY_DIMS:
            peaks: dict[int, float] = {}
            for n in (small, large):
                inputs, _ = corpus(work, n)
                name = f"mem-real-{n}-{dim}"
                job = job_file(work, name, inputs, server, dim=dim, concurrency=None, rows_per_request=None,
                               rows_per_part=None)  # a default job
                fresh(work, name)
                m = run(pipeline_args(job))
                check(m, f"memory run of {n:,} rows at {dim} dims")
                assert output_rows(work / "out" / name) == n
                fresh(work, name)  # gigabytes of parts at 200k rows
                peaks[n] = m.peak_rss_mb
                rows.append(Row(f"memory real text {dim}: peak RSS {n // 1000:,}k rows", peak_text(m),
                                "default job", None, f"< {MEMORY_LIMIT_MB} MB",
                                None if at_floor(m) else m.peak_rss_mb < MEMORY_LIMIT_MB))
            growth = peaks[large] / peaks[small]
            rows.append(Row(f"memory real text {dim}: {large // 1000:,}k / {small // 1000:,}k", f"{growth:.2f}x",
                            f"{peaks[small]:,.0f} MB at {small // 1000:,}k", growth, f"<= {MEMORY_GROWTH_LIMIT}",
                            growth <= MEMORY_GROWTH_LIMIT))
    return rows
