"""`status`: progress read from the output's manifest (shards, batches, rejects); no API call."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from ..batch.state import read_records
from ..batch.watch import batch_status_fields
from ..checkpoint import layout
from ..checkpoint.manifest import Checkpoint
from ..config.job import load_job
from ..engine.progress import rejects_text
from ..errors import ConfigError
from ..storage import open_output
from ..storage.fs import store_error

MAX_BATCHES_LISTED = 20  # status names this many open batches; --json lists every recorded one


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
