"""Issue 11's checkpoint figures: what a commit costs as parts accumulate.

- commit scale: the same job shape (5 rows a part, one request a part, a
  zero-latency server) at N and 8N parts; the time from the first request of
  rows to the process's exit (start-up and the probe left out) must stay
  within 1.1 x 8 of the small job's.
- many parts: more than 100,000 parts of one short row each, run to
  completion; the time per part over the first 1% of parts finished against
  the last 1% (part files' mtimes, in the order they were written): flat
  means near 1. A run still going after the cap is stopped (SIGTERM) and the
  figure says how far it got.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from figures import Row, Sizes, check, fresh
from harness import Server, job_file, make_input, output_rows, pipeline_args, run

ROWS_PER_PART = 5
SCALE = 8
SCALE_LIMIT = 1.1  # time at 8x the parts within 1.1 x 8 of the small job's
MANY_PARTS_LIMIT = 1.25  # time per part, last 1% over first 1%
DIM = 8  # what these figures measure is per-part overhead, not vectors


def work_time(server: Server, m_started: float, m_wall: float) -> float:
    st = server.stats()
    first = st["arrived"][~st["probe"]].min()
    return m_started + m_wall - first


def commit_scale(work: Path, sizes: Sizes) -> list[Row]:
    times: dict[int, float] = {}
    with Server() as server:
        for parts in (sizes.commit_parts, sizes.commit_parts * SCALE):
            inputs = make_input(work / f"in-commit-{parts}", parts * ROWS_PER_PART, words_per_row=6, seed=6)
            name = f"commit-{parts}"
            job = job_file(work, name, inputs, server, dim=DIM, concurrency=16, rows_per_request=ROWS_PER_PART,
                           rows_per_part=ROWS_PER_PART)
            fresh(work, name)
            server.reset()
            m = run(pipeline_args(job))
            check(m, f"commit-scale run of {parts:,} parts")
            assert output_rows(work / "out" / name) == parts * ROWS_PER_PART
            times[parts] = work_time(server, m.started, m.wall_s)
            fresh(work, name)
    small, large = times[sizes.commit_parts], times[sizes.commit_parts * SCALE]
    ratio = large / small
    return [
        Row(f"commit scale: {sizes.commit_parts:,} parts", f"{small:.2f} s", f"{ROWS_PER_PART} rows a part, a request a part",
            None, "", None),
        Row(f"commit scale: {sizes.commit_parts * SCALE:,} parts", f"{large:.2f} s ({ratio:.1f}x)",
            f"{SCALE} x {small:.2f} s = {SCALE * small:.2f} s", ratio / SCALE, f"<= {SCALE_LIMIT}",
            ratio / SCALE <= SCALE_LIMIT),
    ]


def per_part_s(mtimes: np.ndarray, window: int) -> tuple[float, float]:
    """Seconds per part over the first and the last `window` parts written."""
    t = np.sort(mtimes)
    return (t[window] - t[0]) / window, (t[-1] - t[-1 - window]) / window


def many_parts(work: Path, sizes: Sizes) -> list[Row]:
    n = sizes.many_parts
    inputs = make_input(work / f"in-parts-{n}", n, words_per_row=3, seed=7)
    name = f"parts-{n}"
    out = work / "out" / name
    with Server() as server:
        job = job_file(work, name, inputs, server, dim=DIM, concurrency=16, rows_per_request=1, rows_per_part=1)
        fresh(work, name)
        deadline = time.time() + sizes.many_parts_cap_s
        m = run(pipeline_args(job), stop_when=lambda: time.time() > deadline, timeout_s=sizes.many_parts_cap_s + 120)
    parts = sorted(out.glob("part-*.parquet"))
    done = len(parts)
    complete = m.rc == 0 and done == n and output_rows(out) == n
    window = max(1, n // 100)
    mtimes = np.asarray([p.stat().st_mtime for p in parts])
    fresh(work, name)
    if done <= 2 * window:
        return [Row(f"many parts: {n:,} parts of 1 row", f"{done:,} parts in {m.wall_s:,.0f} s (exit {m.rc})",
                    f"stopped at the {sizes.many_parts_cap_s:,.0f} s cap", None, "complete", False)]
    first, last = per_part_s(mtimes, window)
    status = "complete" if complete else f"stopped at the {sizes.many_parts_cap_s:,.0f} s cap: {done:,} of {n:,} parts"
    return [
        Row(f"many parts: {n:,} parts of 1 row", f"{m.wall_s:,.0f} s, {done / m.wall_s:,.0f} parts/s", status, None,
            "complete", complete),
        Row("many parts: time per part, last 1% / first 1%", f"{last * 1e3:.2f} / {first * 1e3:.2f} ms",
            f"windows of {window:,} parts", last / first, f"<= {MANY_PARTS_LIMIT}",
            complete and last / first <= MANY_PARTS_LIMIT),
    ]
