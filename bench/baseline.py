"""The rival: the loop a careful engineer writes by hand with the official `openai` SDK.

    python bench/baseline.py INPUT_DIR OUT --base-url URL --dim 1536 --batch 100 --concurrency 16 [--naive] [--limit N]

The fair loop (the default): reads the Parquet text column a record batch at
a time (`iter_batches`, never the whole table), sends each run of `--batch`
rows' non-blank texts (the API refuses an empty input) as one request with
`encoding_format="base64"` (so the SDK hands the strings back untouched: it
turns them into Python lists of floats only when it chose base64 itself),
at most `--concurrency` in flight (a semaphore taken before the task is made,
so neither texts nor answers pile up), decodes each answer's base64 with
`numpy.frombuffer` into a `[rows, dim]` float32 block (zeros for a blank
row), and writes that block into the raw float32 output at its rows' offset
(`os.pwrite`) as soon as it arrives: memory stays flat whatever the size of
the job. The output is `OUT` itself, `rows x dim` little-endian float32, in
input order, a blank row all zeros: the same vectors as the pipeline's, with
no tokenizing (no truncation: the bench server takes any length), no
checkpoint, no Parquet.

`--naive` is the loop one writes first: the SDK's defaults (it asks for
base64 and hands back Python lists of floats), every vector held to the end,
a Parquet table built from the lists.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from openai import AsyncOpenAI

MODEL = "text-embedding-3-small"
COLUMN = "body"


def batches(inputs: Path, size: int) -> Iterator[tuple[int, list[str | None]]]:
    """(first row, texts) of every run of `size` rows, the files in name order, read a batch at a time."""
    row = 0
    for path in sorted(inputs.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=size, columns=[COLUMN]):
            texts = batch.column(0).to_pylist()
            yield row, texts
            row += len(texts)


def client(args: argparse.Namespace) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=args.base_url, api_key=os.environ.get("BENCH_API_KEY", "sk-bench"), max_retries=5)


async def fair(args: argparse.Namespace) -> None:
    sdk = client(args)
    gate = asyncio.Semaphore(args.concurrency)
    row_bytes = 4 * args.dim
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    async def one(first: int, texts: list[str | None]) -> None:
        try:
            keep = [i for i, t in enumerate(texts) if t and t.strip()]
            block = np.zeros((len(texts), args.dim), dtype="<f4")
            if keep:
                resp = await sdk.embeddings.create(model=MODEL, input=[texts[i] for i in keep], dimensions=args.dim,
                                                   encoding_format="base64")
                for item in resp.data:
                    block[keep[item.index]] = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
            os.pwrite(fd, block, first * row_bytes)
        finally:
            gate.release()

    try:
        async with asyncio.TaskGroup() as tasks:
            for first, texts in batches(args.inputs, args.batch):
                if args.limit is not None and first + len(texts) > args.limit:
                    texts = texts[:max(0, args.limit - first)]
                    if not texts:
                        break
                await gate.acquire()
                tasks.create_task(one(first, texts))
    finally:
        os.close(fd)
        await sdk.close()


async def naive(args: argparse.Namespace) -> None:
    texts: list[str | None] = []
    for _, chunk in batches(args.inputs, 65_536):
        texts += chunk
    sdk = client(args)
    gate = asyncio.Semaphore(args.concurrency)
    out: list[list[float] | None] = [None] * len(texts)
    rows = [i for i, t in enumerate(texts) if t and t.strip()]

    async def one(start: int) -> None:
        batch = rows[start : start + args.batch]
        async with gate:
            resp = await sdk.embeddings.create(model=MODEL, input=[texts[i] for i in batch], dimensions=args.dim)
        for item in resp.data:
            out[batch[item.index]] = item.embedding

    await asyncio.gather(*(one(s) for s in range(0, len(rows), args.batch)))
    await sdk.close()
    table = pa.table({"row_id": pa.array(range(len(texts)), pa.int64()),
                      "embedding": pa.array(out, pa.list_(pa.float32(), args.dim))})
    pq.write_table(table, args.output, compression="zstd")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--naive", action="store_true", help="the SDK's defaults, every vector held to the end")
    parser.add_argument("--limit", type=int, help="the fair loop: only the first LIMIT rows (its start-up cost)")
    args = parser.parse_args()
    asyncio.run(naive(args) if args.naive else fair(args))


if __name__ == "__main__":
    main()
