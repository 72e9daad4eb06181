"""Issue 20's checkpoint figure: the checkpoint alone, to a million parts.

Records are committed one after another through `Checkpoint.commit` (no
part files, no embedding) into a local output on tmpfs (`/dev/shm` when
there is one: the figure is the checkpoint's own work, not the disk's
fsync), with compaction, segments and merges as a run does them. For every
commit: the bytes it wrote (its record, and the segments, merged segments
and snapshot of a compaction it triggered) and its time (wall and the
thread's CPU). Compared: the first 1% of commits against the last 1%, and
the worst 1% window of the run against the first (told, not judged: a
window that holds a merge into the top tier reads higher, the more so the
fewer commits a 1% window holds). Target: last against first within 1.25x.
Besides: how many segments and how long a reader takes at the end, and
the size a snapshot of the whole ledger (how format 2 compacted) would be.

    python bench/checkpoint_alone.py                  # 1,000,000 parts, about 3 minutes on a quiet core
    python bench/checkpoint_alone.py --parts 100000   # smaller
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import Row, table  # noqa: E402

from pipeline.checkpoint import layout  # noqa: E402
from pipeline.checkpoint.manifest import Checkpoint  # noqa: E402
from pipeline.checkpoint.records import UnitRecord, snapshot_json  # noqa: E402
from pipeline.storage import LocalOutput  # noqa: E402

LIMIT = 1.25  # last 1% (and the worst 1%) over the first 1%
ROWS_PER_PART = 5


class CountingOutput(LocalOutput):
    """A local output that counts the bytes written into it."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.written = 0

    def write(self, rel: str, data: bytes) -> None:
        self.written += len(data)
        super().write(rel, data)


def measure(folder: Path, parts: int) -> dict[str, np.ndarray | float | int]:
    output = CountingOutput(str(folder))
    output.prepare(layout.FOLDERS)
    fingerprint = {"inputs": [{"path": "/data/in.parquet", "size": 1 << 30, "mtime": 0}], "model": "m"}
    checkpoint = Checkpoint.open(output, SimpleNamespace(name="alone"), fingerprint, restart=False,  # type: ignore[arg-type]
                                 shard=None, max_units=parts)
    written = np.zeros(parts, dtype=np.int64)
    wall = np.zeros(parts, dtype=np.int64)
    cpu = np.zeros(parts, dtype=np.int64)
    rng = np.random.default_rng(20)
    tokens = rng.integers(20, 2_000, size=parts)
    for seq in range(parts):
        record = UnitRecord(seq, "committed", ROWS_PER_PART, ROWS_PER_PART, int(tokens[seq]))
        before, w0, c0 = output.written, time.perf_counter_ns(), time.thread_time_ns()
        checkpoint.commit(record, [])
        cpu[seq] = time.thread_time_ns() - c0
        wall[seq] = time.perf_counter_ns() - w0
        written[seq] = output.written - before
    checkpoint.compact()
    t = time.perf_counter()
    read = Checkpoint.read(LocalOutput(str(folder)))
    read_s = time.perf_counter() - t
    assert read is not None and read.ledger.committed == parts
    whole = len(json.dumps(snapshot_json(read.meta, read.ledger, lambda _: True), separators=(",", ":")))
    return {"written": written, "wall": wall, "cpu": cpu, "read_s": read_s, "segments": len(read._segments),
            "whole_bytes": whole}


def windows(values: np.ndarray, window: int) -> tuple[float, float, float]:
    """Mean over the first `window`, the last, and the worst window of the run (sliding)."""
    sums = np.convolve(values.astype(np.float64), np.ones(window), mode="valid")
    return sums[0] / window, sums[-1] / window, sums.max() / window


def rows(parts: int, m: dict[str, np.ndarray | float | int]) -> list[Row]:
    window = max(1, parts // 100)
    out: list[Row] = []
    for name, key, scale, unit in (("bytes written", "written", 1, "B"), ("time (wall)", "wall", 1e-3, "us"),
                                   ("time (thread CPU)", "cpu", 1e-3, "us")):
        first, last, worst = windows(m[key], window)  # type: ignore[arg-type]
        out.append(Row(f"checkpoint alone: {name} per commit, last / first 1%",
                       f"{last * scale:,.1f} / {first * scale:,.1f} {unit}", f"windows of {window:,} commits",
                       last / first, f"<= {LIMIT}", last / first <= LIMIT))
        out.append(Row(f"checkpoint alone: {name} per commit, worst / first 1%",
                       f"{worst * scale:,.1f} / {first * scale:,.1f} {unit}", "the worst window of the run",
                       worst / first, "", None))  # a top-tier merge in one window: told, not judged
    per_commit_whole = float(m["whole_bytes"]) / 1000  # type: ignore[arg-type]
    out.append(Row(f"checkpoint alone: a reader at {parts:,} parts", f"{m['read_s']:.2f} s, {m['segments']} segments",
                   "", None, "", None))
    out.append(Row("checkpoint alone: the whole ledger rewritten per 1,000 commits (format 2)",
                   f"{per_commit_whole:,.0f} B a commit at the end", "for comparison", None, "", None))
    return out


def checkpoint_alone(work: Path, parts: int) -> list[Row]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    folder = Path(tempfile.mkdtemp(prefix="checkpoint-alone-", dir=base))
    try:
        return rows(parts, measure(folder, parts))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench"))
    args = parser.parse_args()
    started = time.time()
    result = checkpoint_alone(args.work, args.parts)
    print(table(result))
    print(f"\n{args.parts:,} parts, {time.time() - started:.0f} s wall, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    if any(r.met is False for r in result):
        sys.exit(1)


if __name__ == "__main__":
    main()
