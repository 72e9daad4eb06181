"""The client's CPU split by stage, from a py-spy profile of the whole process.

py-spy samples every thread (tokenizing and writing run in worker threads,
which cProfile would miss). Each sample goes to the stage of the innermost
frame that names one: a pipeline module, else the library doing the work.
"""
from __future__ import annotations

import linecache
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGES = ("read", "tokenize", "pack", "request + decode", "write", "startup", "other")
# (substring of a frame, stage). The pipeline's own frames decide first, from
# the innermost outwards (json under Manifest.read is writing, under
# OpenAIProvider._post decoding); a stack with none goes by its libraries.
PIPELINE_RULES = (
    ("<frozen importlib", "startup"),  # imports, wherever they happen
    ("pipeline/sources.py", "read"),
    ("pipeline/texts.py", "tokenize"),
    ("pipeline/packing.py", "pack"),
    ("pipeline/providers/", "request + decode"),
    ("pipeline/dispatch.py", "request + decode"),
    ("pipeline/limits.py", "request + decode"),
    ("pipeline/sink.py", "write"),
    ("pipeline/manifest.py", "write"),
    ("_commit (pipeline/runner.py", "write"),
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
    if frames and (frames[-1].startswith(IDLE) or "fsync" in _source_line(frames[-1])):
        return None
    for rules in (PIPELINE_RULES, LIBRARY_RULES):
        for frame in reversed(frames):
            for needle, stage in rules:
                if needle in frame:
                    return stage
    return "other"


def split(raw_profile: Path) -> dict[str, float]:
    """Share of the busy samples per stage (0..1), from py-spy's `--format raw`."""
    counts: Counter[str] = Counter()
    for line in raw_profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        stage = stage_of(stack.split(";"))
        if stage is not None:
            counts[stage] += int(n)
    busy = sum(counts.values()) or 1
    return {s: counts[s] / busy for s in STAGES}


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
