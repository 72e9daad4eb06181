"""`estimate` (or `plan`): rows, distinct texts, cache hits, tokens, requests, cost and the
output's size per column and dtype, read from the inputs; no API call."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np

from ..batch.files import MAX_REQUESTS_PER_BATCH
from ..cache import open_cache
from ..cache.vectors import text_keys
from ..config.job import JobConfig, load_job
from ..core.models import expected_dimensions, known_dimensions, list_price
from ..core.money import BATCH_WINDOW_H, batch_price, cost_usd, job_price
from ..core.packing import pack
from ..core.quantize import DTYPES, bytes_per_row, check_vector_columns, output_sizes
from ..engine.progress import rejects_text
from ..engine.reuse import RecentKeys, memory_entries, plan_keys
from ..inputs.sources import check_columns, find_inputs, iter_units
from ..inputs.texts import prepare, row_texts


def estimate_job(job_file: str) -> dict[str, Any]:
    """What `run` would send and pay, reading the inputs as `run` does and
    deduping as it does (the same keys, the same memory of recent texts, the
    job's cache), without any API call."""
    job = load_job(job_file, require_env=False)
    files = find_inputs(job.input)
    check_columns(files, job.input)
    rows = pieces = tokens = requests = cache_hits = 0
    distinct = 0  # texts the run looks up or sends: not repeats of a text it has in memory
    rejected: Counter[str] = Counter()
    policy = job.embedding
    if policy.empty == "fail" or policy.too_long == "fail":  # count, don't stop, when estimating
        policy = replace(policy, empty="skip" if policy.empty == "fail" else policy.empty,
                         too_long="skip" if policy.too_long == "fail" else policy.too_long)
    dim = expected_dimensions(job)
    model_dim = known_dimensions(job)
    if model_dim is not None:
        check_vector_columns(job, model_dim)
    max_inputs, max_tokens = job.request_limits(dim)
    recent = RecentKeys(memory_entries(dim))  # the run's in-run dedupe memory, keys only
    cache = open_cache(job.cache, job.cache_storage, readonly=True)
    try:
        for unit in iter_units(files, job.input, job.output.rows_per_part, lambda _: True):
            prepared = prepare(row_texts(unit.table, job.input), policy, list(range(unit.table.num_rows)))
            rows += prepared.n_rows
            pieces += len(prepared.pieces)
            rejected.update(r for r in prepared.reasons if r)
            keys = text_keys(prepared.pieces, job.embedding.model, job.embedding.dimensions, job.vector_options)
            plan = plan_keys(keys, recent)  # as the run plans them
            for key in plan.first_of:  # seen or not, a key is the most recent now
                recent.add(key)
            new = [keys[i] for i in plan.unknown]
            hits = cache.contains(new) if cache is not None else set()
            distinct += len(new)
            cache_hits += len(hits)
            send = np.asarray([i for i in plan.unknown if keys[i] not in hits], dtype=np.int64)
            tokens += int(prepared.piece_tokens[send].sum())
            requests += len(pack(prepared.piece_tokens[send], prepared.piece_bytes[send],
                                 max_inputs=max_inputs, max_tokens=max_tokens))
    finally:
        if cache is not None:
            cache.close()
    price, price_source = job_price(job)
    rpm = sum(p.requests_per_minute or 0 for p in job.providers) or None
    tpm = sum(p.tokens_per_minute or 0 for p in job.providers) or None
    minutes = max(requests / rpm if rpm else 0.0, tokens / tpm if tpm else 0.0)
    return {
        "job": job.name,
        "rows": rows,
        "rows_rejected_by_policy": dict(rejected),
        "inputs": pieces,
        "distinct_texts": distinct,
        "cache_hits": cache_hits,
        "inputs_to_send": distinct - cache_hits,
        "tokens": tokens,
        "requests": requests,
        "cost_usd": cost_usd(tokens, price),
        "price_per_million_tokens_usd": price,
        "price_source": price_source,
        "minutes_at_rate_limits": round(minutes, 2) if (rpm or tpm) else None,
        "budget_usd": job.budget_usd,
        "dimensions": dim,
        "dimensions_known": model_dim is not None,
        "output_vectors": output_sizes(job, dim, rows - sum(rejected.values())),
        **_batch_estimate(job, distinct - cache_hits, tokens, requests),
    }


def _batch_estimate(job: JobConfig, inputs: int, tokens: int, requests: int) -> dict[str, Any]:
    """The other way to pay: a batch job's synchronous price, or a synchronous job's batch price;
    for a batch job, how many batches and the 24-hour window."""
    batch = job.batch_provider
    if batch is None:
        price, source = batch_price(job)
        return {"batch_price_per_million_tokens_usd": price, "batch_cost_usd": cost_usd(tokens, price),
                "batch_price_source": source}
    listed = list_price(job.embedding.model)
    limit = batch.enqueued_tokens_limit
    return {
        "sync_price_per_million_tokens_usd": listed,
        "sync_cost_usd": cost_usd(tokens, listed),
        "batches": max(math.ceil(inputs / batch.max_inputs_per_batch), math.ceil(requests / MAX_REQUESTS_PER_BATCH)),
        "batch_window_hours": BATCH_WINDOW_H,
        "queue_rounds": math.ceil(tokens / limit) if limit else None,
    }


def estimate_lines(r: dict[str, Any]) -> list[str]:
    rejected = rejects_text(r["rows_rejected_by_policy"])
    cost = (f"${r['cost_usd']:,.4f} at ${r['price_per_million_tokens_usd']}/M tokens ({r['price_source']})"
            if r["cost_usd"] is not None else "unknown (no price for this model: set the provider's price_per_million_tokens)")
    lines = [
        f"job {r['job']}: {r['rows']:,} rows, rejected by policy: {rejected}",
        f"{r['inputs']:,} texts, {r['distinct_texts']:,} distinct, {r['cache_hits']:,} in the cache: "
        f"{r['inputs_to_send']:,} to send",
        f"{r['tokens']:,} tokens to send in {r['requests']:,} requests",
        f"cost: {cost}",
    ]
    lines += _size_lines(r)
    if r["minutes_at_rate_limits"] is not None:
        lines.append(f"time at the providers' rate limits: at least {r['minutes_at_rate_limits']:,.1f} min")
    if r.get("budget_usd") is not None and r["cost_usd"] is not None:
        fits = "within it" if r["cost_usd"] <= r["budget_usd"] else "a run stops before passing it"
        lines.append(f"budget_usd: ${r['budget_usd']:,.4f} for what is left ({fits}; spend recorded by earlier runs counts too)")
    if r.get("batch_cost_usd") is not None:
        lines.append(f"through OpenAI's Batch API instead: ${r['batch_cost_usd']:,.4f} at "
                     f"${r['batch_price_per_million_tokens_usd']}/M tokens, results within {BATCH_WINDOW_H} hours")
    if "batches" in r:
        if r["sync_cost_usd"] is not None:
            lines.append(f"synchronously it would cost ${r['sync_cost_usd']:,.4f} "
                         f"at ${r['sync_price_per_million_tokens_usd']}/M tokens (OpenAI's list price)")
        rounds = (f"; enqueued_tokens_limit lets them in over at least {r['queue_rounds']:,} rounds, "
                  f"each up to {r['batch_window_hours']} h" if r["queue_rounds"] and r["queue_rounds"] > 1 else "")
        lines.append(f"batches: about {r['batches']:,}; each batch's results come within {r['batch_window_hours']} "
                     f"hours of its submission (the Batch API's window){rounds}")
    return lines


def _size_lines(r: dict[str, Any]) -> list[str]:
    """The output's vectors by column, and what the first column would take in each dtype."""
    columns = r.get("output_vectors") or []
    if not columns:
        return []
    guess = "" if r.get("dimensions_known") else f" (assuming {r['dimensions']:,} dims: the model's length is not known)"
    lines = [f"output vectors{guess}, before compression: " + "; ".join(
        f"{c['column']} {c['dtype']} x {c['dimensions']:,}: {_size(c['bytes_per_row'])}/row, {_size(c['bytes'])}"
        for c in columns)]
    first = columns[0]
    rows = first["bytes"] / first["bytes_per_row"] if first["bytes_per_row"] else 0
    dims = first["dimensions"]
    other = {dtype: bytes_per_row(dtype, dims) * rows for dtype in DTYPES}
    lines.append(f"{first['column']} in each output.vector_dtype: " + ", ".join(f"{d} {_size(b)}" for d, b in other.items()))
    return lines


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"
