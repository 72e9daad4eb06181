"""The plain baseline: what one writes by hand with the official `openai` SDK.

Reads the same Parquet text column, leaves out the blank rows (the API
refuses an empty input), sends the rest in batches of the same size with the
same concurrency (an asyncio semaphore) to the same server, keeps the vectors
the SDK hands back, and writes them to Parquet at the end (null for a blank
row): the same work as the pipeline, without its tokenizing (so no
truncation: the bench server takes inputs of any length), checkpoints or parts.

    python bench/baseline.py INPUT_DIR OUT.parquet --base-url URL --dim 1536 --batch 100 --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from openai import AsyncOpenAI


async def embed_all(texts: list[str | None], args: argparse.Namespace) -> list[list[float] | None]:
    client = AsyncOpenAI(base_url=args.base_url, api_key=os.environ.get("BENCH_API_KEY", "sk-bench"), max_retries=5)
    gate = asyncio.Semaphore(args.concurrency)
    out: list[list[float] | None] = [None] * len(texts)
    rows = [i for i, t in enumerate(texts) if t and t.strip()]

    async def one(start: int) -> None:
        batch = rows[start : start + args.batch]
        async with gate:
            resp = await client.embeddings.create(model="text-embedding-3-small", input=[texts[i] for i in batch],
                                                  dimensions=args.dim)
        for item in resp.data:
            out[batch[item.index]] = item.embedding

    await asyncio.gather(*(one(s) for s in range(0, len(rows), args.batch)))
    await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    texts: list[str | None] = []
    for path in sorted(args.inputs.glob("*.parquet")):
        texts += pq.read_table(path, columns=["body"]).column("body").to_pylist()
    vectors = asyncio.run(embed_all(texts, args))
    table = pa.table({"row_id": pa.array(range(len(texts)), pa.int64()),
                      "embedding": pa.array(vectors, pa.list_(pa.float32(), args.dim))})
    pq.write_table(table, args.output, compression="zstd")


if __name__ == "__main__":
    main()
