"""Vector cache lookups per second at 1M entries (issue #6).

Fills a cache with ENTRIES vectors in the pipeline's own way (VectorCache.put,
one transaction per request-sized batch), then times the lookups a run makes:
a unit's keys in one call, half of them hits. Prints lookups/s for hits,
misses and a mixed unit, each as a ratio of the rate the lookups must beat:
a run never waits on the cache while it is faster than the rows the fastest
provider can deliver (LIMIT_ROWS_PER_S, far above any rate limit seen).

    python bench/cache_lookups.py [--entries 1000000] [--dim 256] [--work /tmp/pipeline-bench]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.cache.vectors import VectorCache, text_keys  # noqa: E402

LIMIT_ROWS_PER_S = 100_000  # rows/s: 6M rows a minute, beyond the TPM of any provider tier
UNIT_ROWS = 10_000  # keys per lookup: the default output.rows_per_part
PUT_BATCH = 2048  # vectors per transaction: one full request's answer
MODEL = "text-embedding-3-small"


def fill(cache: VectorCache, entries: int, dim: int) -> float:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((PUT_BATCH, dim)).astype(np.float32)
    started = time.perf_counter()
    for start in range(0, entries, PUT_BATCH):
        texts = [f"stored text {i}" for i in range(start, min(start + PUT_BATCH, entries))]
        cache.put(text_keys(texts, MODEL, None), block[: len(texts)])
    return entries / (time.perf_counter() - started)


def lookups_per_s(cache: VectorCache, texts: list[str], dim: int, expect_hits: int) -> float:
    started = time.perf_counter()
    found = 0
    for start in range(0, len(texts), UNIT_ROWS):
        keys = text_keys(texts[start : start + UNIT_ROWS], MODEL, None)  # the run hashes too
        found += len(cache.get(keys, dim))
    elapsed = time.perf_counter() - started
    assert found == expect_hits, (found, expect_hits)
    return len(texts) / elapsed


def measure(work: Path, entries: int, dim: int, lookups: int) -> tuple[dict[str, float], float | None]:
    """Lookups/s for hits, misses and half of each at `entries`; and the fill rate (None when reused)."""
    folder = work / f"cache-{entries}-{dim}"
    if folder.exists() and (cache := VectorCache(folder)).count() == entries:
        put_rate = None  # reused from an earlier run
    else:
        shutil.rmtree(folder, ignore_errors=True)
        cache = VectorCache(folder)
        put_rate = fill(cache, entries, dim)
    rng = random.Random(1)
    hits = [f"stored text {i}" for i in rng.sample(range(entries), lookups)]
    misses = [f"new text {i}" for i in range(lookups)]
    mixed = hits[: lookups // 2] + misses[: lookups // 2]
    rng.shuffle(mixed)
    try:
        rates = {
            "hits": lookups_per_s(cache, hits, dim, len(hits)),
            "misses": lookups_per_s(cache, misses, dim, 0),
            "half hits": lookups_per_s(cache, mixed, dim, lookups // 2),
        }
    finally:
        cache.close()
    return rates, put_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256, help="floats per vector (1M x 256 is a 1 GB file)")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench"))
    args = parser.parse_args()
    rates, put_rate = measure(args.work, args.entries, args.dim, args.lookups)
    print(f"cache: {args.entries:,} entries of {args.dim} floats"
          + (f", filled at {put_rate:,.0f} vectors/s" if put_rate else " (reused)"))
    print(f"{'lookups':<12}{'per second':>14}{'limit':>12}{'ratio':>8}")
    for name, rate in rates.items():
        print(f"{name:<12}{rate:>14,.0f}{LIMIT_ROWS_PER_S:>12,}{rate / LIMIT_ROWS_PER_S:>8.2f}")


if __name__ == "__main__":
    main()
