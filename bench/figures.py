"""What every scenario shares: the table's rows, the suite's sizes, small helpers."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import Measured


@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    limit: str
    ratio: float | None
    target: str
    met: bool | None


@dataclass(frozen=True)
class Sizes:
    rate_windows: int  # 60-second windows the rate-limited run is measured over
    latency_rows: int  # short texts, fixed latency
    cpu_rows: int  # short texts, no latency
    real_rows: int  # realistic documents: CPU-bound and latency-bound (the 20,000)
    memory_small: int  # realistic documents, a default job
    memory_large: int
    resume_small: int  # short texts, 8 dims: the resume figure's job and its memory
    resume_large: int
    commit_parts: int  # commit scale: this many parts, then 8x as many
    many_parts: int  # the many-parts job: one row a part
    many_parts_cap_s: float  # stopped (SIGTERM) after this long; the figure then says so
    local_texts: int
    cache_entries: int
    checkpoint_parts: int = 1_000_000  # the checkpoint alone (checkpoint_alone.py)


FULL = Sizes(rate_windows=2, latency_rows=100_000, cpu_rows=50_000, real_rows=20_000, memory_small=20_000,
             memory_large=200_000, resume_small=200_000, resume_large=2_000_000, commit_parts=400,
             many_parts=100_500, many_parts_cap_s=1800, local_texts=96, cache_entries=1_000_000)
QUICK = Sizes(rate_windows=1, latency_rows=20_000, cpu_rows=20_000, real_rows=4_000, memory_small=4_000,
              memory_large=20_000, resume_small=20_000, resume_large=200_000, commit_parts=50,
              many_parts=2_000, many_parts_cap_s=120, local_texts=32, cache_entries=100_000,
              checkpoint_parts=20_000)


def fresh(work: Path, name: str) -> None:
    shutil.rmtree(work / "out" / name, ignore_errors=True)


def check(m: Measured, what: str) -> None:
    if m.rc != 0:
        raise SystemExit(f"{what}: exit {m.rc}\n{m.stderr[-2000:]}")


def table(rows: list[Row]) -> str:
    head = ("figure", "measured", "limit compared with", "ratio", "target", "met?")
    cells = [head] + [(r.figure, r.measured, r.limit, "" if r.ratio is None else f"{r.ratio:.3f}", r.target,
                       "" if r.met is None else ("yes" if r.met else "NO")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def at_floor(m: Measured) -> bool:
    """The peak RSS read is the bench's own (harness.Measured.floor_mb), not the process's."""
    return m.peak_rss_mb <= m.floor_mb * 1.05


def peak_text(m: Measured) -> str:
    return f"<= {m.floor_mb:,.0f} MB (bench floor)" if at_floor(m) else f"{m.peak_rss_mb:,.0f} MB"
