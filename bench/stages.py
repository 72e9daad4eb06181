"""The client's CPU split by stage, from a py-spy profile of the whole process.

py-spy samples every thread (tokenizing and writing run in worker threads,
which cProfile would miss). Each sample goes to the stage of the innermost
frame that names one: a pipeline module, else the library doing the work.

    python bench/stages.py PROFILE.txt --rows N --cpu-s S [--top 30]   # stages and top functions in us/row
"""
from __future__ import annotations

import argparse
import linecache
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGES = ("read", "tokenize", "pack", "dedupe", "request + decode", "combine", "write", "checkpoint", "startup",
          "other")
# (substring of a frame, stage). The pipeline's own frames decide first, from
# the innermost outwards (json under Manifest.read is checkpointing, under
# OpenAIProvider._post decoding); a stack with none goes by its libraries.
PIPELINE_RULES = (
    ("<frozen importlib", "startup"),  # imports, wherever they happen
    ("pipeline/cli/process.py", "startup"),  # the process settings (allocators, probes)
    ("pipeline/inputs/sources.py", "read"),
    ("combine (pipeline/inputs/texts.py", "combine"),
    ("pipeline/inputs/texts.py", "tokenize"),
    ("pipeline/core/packing.py", "pack"),
    ("pipeline/engine/reuse.py", "dedupe"),  # the in-run dedupe ring and the cache lookups
    ("pipeline/cache/", "dedupe"),
    ("pipeline/providers/", "request + decode"),
    ("pipeline/engine/dispatch.py", "request + decode"),
    ("pipeline/core/limits.py", "request + decode"),
    ("pipeline/engine/embedder.py", "combine"),  # piece vectors into a unit's rows
    ("pipeline/checkpoint/parts.py", "write"),  # Parquet parts
    ("pipeline/checkpoint/", "checkpoint"),  # manifest, records, journal
    ("pipeline/storage/", "checkpoint"),
    ("_commit (pipeline/engine/runner.py", "checkpoint"),
)
LIBRARY_RULES = (
    ("tiktoken/", "tokenize"),
    ("aiohttp/", "request + decode"),
    ("yarl/", "request + decode"),
    ("multidict/", "request + decode"),
    ("json/", "request + decode"),
    ("pyarrow/parquet", "write"),
)
IDLE = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "Condition.wait", "wait (threading.py")


def stage_of(frames: list[str]) -> str | None:
    """The stage of one sampled stack (outermost first); None for a thread
    that waits: idle, or in fsync (the disk's time, not the CPU's)."""
    if is_idle(frames):
        return None
    for rules in (PIPELINE_RULES, LIBRARY_RULES):
        for frame in reversed(frames):
            for needle, stage in rules:
                if needle in frame:
                    return stage
    return "other"


def is_idle(frames: list[str]) -> bool:
    return bool(frames) and (frames[-1].startswith(IDLE) or "fsync" in _source_line(frames[-1]))


def samples(raw_profile: Path) -> list[tuple[list[str], int]]:
    """py-spy's `--format raw`: each distinct stack (outermost first) and its sample count."""
    out = []
    for line in raw_profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append((stack.split(";"), int(n)))
    return out


def split(raw_profile: Path) -> dict[str, float]:
    """Share of the busy samples per stage (0..1), from py-spy's `--format raw`."""
    counts: Counter[str] = Counter()
    for frames, n in samples(raw_profile):
        stage = stage_of(frames)
        if stage is not None:
            counts[stage] += n
    busy = sum(counts.values()) or 1
    return {s: counts[s] / busy for s in STAGES}


def top_functions(raw_profile: Path) -> tuple[Counter[str], Counter[str], int]:
    """Busy samples by the innermost pipeline function (inclusive of what it
    calls outside the pipeline) and by the leaf function (self time); and the
    busy total."""
    by_pipeline: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    busy = 0
    for frames, n in samples(raw_profile):
        if is_idle(frames):
            continue
        busy += n
        by_leaf[_function(frames[-1])] += n
        inner = next((f for f in reversed(frames) if "pipeline/" in f), None)
        by_pipeline[_function(inner) if inner else "(no pipeline frame) " + _function(frames[-1])] += n
    return by_pipeline, by_leaf, busy


def _function(frame: str) -> str:
    """`func (path:line)` -> `func (path)`, the path from the package or library on."""
    match = re.match(r"(.*) \((.+?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    for marker in ("pipeline/", "site-packages/", "python3.11/"):
        if marker in path:
            path = path[path.index(marker) + (0 if marker == "pipeline/" else len(marker)):]
            break
    return f"{name} ({path})"


@lru_cache(maxsize=4096)
def _source_line(frame: str) -> str:
    """The source line a frame `func (path:line)` stands on ('' when unknown)."""
    match = re.search(r"\((.+):(\d+)\)$", frame)
    if not match:
        return ""
    path = Path(match.group(1))
    if not path.is_absolute():
        path = REPO / path
    try:
        return linecache.getline(str(path), int(match.group(2)))
    except (OSError, ValueError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--cpu-s", type=float, required=True, help="the profiled process's CPU time (user + system)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    us_row = args.cpu_s / args.rows * 1e6
    print(f"client CPU {us_row:.1f} us/row")
    for stage, share in split(args.profile).items():
        print(f"  {stage:18s} {share * us_row:7.1f} us/row  {share:6.1%}")
    by_pipeline, by_leaf, busy = top_functions(args.profile)
    for title, counts in (("innermost pipeline function", by_pipeline), ("leaf function (self)", by_leaf)):
        print(f"\nby {title}:")
        for name, n in counts.most_common(args.top):
            print(f"  {n / busy * us_row:7.1f} us/row  {n / busy:6.1%}  {name}")


if __name__ == "__main__":
    main()
