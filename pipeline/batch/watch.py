"""What a Batch API job waits for: its running batches, and when a look is worth it.

Read from the checkpoint alone (no API call), for `status --json` and for
whoever runs `run --no-wait` on a schedule (cron, or the Airflow trigger in
pipeline/airflow/, which polls these batches between runs). A batch is worth
checking at the time a waiting run would next poll it (files.poll_delay_s,
without its jitter): soon while it is young, less often as it ages; a batch
whose record already says it finished (or is half-submitted) is worth a run
at once.
"""
from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..checkpoint import layout
from ..checkpoint.batch_records import BatchRecord
from ..checkpoint.manifest import Checkpoint
from ..config.extras import scalar_text
from ..config.job import JobConfig, ProviderConfig
from ..config.schema import WHOLE_ENV_REF, Invalid
from ..providers.batch_api import RESULT_STATUSES
from ..storage import open_output
from ..storage.output import Output
from .files import poll_delay_s
from .state import read_records

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the records' created_at, UTC
FINISHED_STATUSES = (*RESULT_STATUSES, "failed")  # a run collects (or resubmits) these at once


def epoch_s(stamp: str) -> float | None:
    """A record's UTC stamp as epoch seconds; None when it is not one."""
    try:
        return float(calendar.timegm(time.strptime(stamp, TIME_FORMAT)))
    except (TypeError, ValueError):
        return None


def utc_stamp(epoch_s: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(epoch_s))


def next_check_s(record: BatchRecord, interval_s: float, now_s: float) -> float:
    """The wall-clock time (epoch seconds) a look at this open batch is worth it."""
    created = epoch_s(record.created_at)
    if record.state != "submitted" or record.status in FINISHED_STATUSES or created is None:
        return now_s  # half-submitted (a run settles it), finished, or of unknown age: worth a look now
    age_s = max(0.0, now_s - created)
    return now_s + poll_delay_s(age_s, interval_s, rand=lambda: 0.5)  # 0.5: no jitter


@dataclass(frozen=True)
class Waiting:
    """A writer's open batches and the provider that runs them (never its key)."""

    provider: str
    base_url: str
    api_key_env: str | None  # the name of the environment variable that holds the key
    poll_interval_s: float
    batch_ids: tuple[str, ...]  # open batches the provider knows by id
    created_s: tuple[float, ...]  # ... and when each was created (epoch seconds)
    unsettled: int  # open batches recorded without an id yet (a run settles them)
    next_check_s: float | None  # epoch seconds; None when nothing runs
    auth: str = "bearer"  # how the key is sent (providers' `auth`)
    # The provider's headers and query as the job file writes them: `${VAR}`s
    # unfilled, so whoever polls fills them from its own environment.
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)


def open_records(output: Output, epoch: str, shard: layout.Shard | None) -> list[BatchRecord]:
    """The open batches a run of this shard adopts (the unsharded run adopts every writer's)."""
    writer = None if shard is None else layout.writer_name(shard)
    return [r for r in read_records(output, epoch, writer) if r.open]


def waiting(job: JobConfig, job_file: str | Path, output: Output, epoch: str, shard: layout.Shard | None,
            now_s: float | None = None) -> Waiting | None:
    """What a `run --no-wait` of this shard left running; None for a job without a batch provider."""
    cfg = job.batch_provider
    if cfg is None:
        return None
    now = time.time() if now_s is None else now_s
    records = open_records(output, epoch, shard)
    checks = [next_check_s(r, cfg.poll_interval_s, now) for r in records]
    known = [r for r in records if r.batch_id and r.state == "submitted"]
    entry = provider_entry(job_file, cfg)
    return Waiting(cfg.name, str(cfg.base_url), key_variable(entry), cfg.poll_interval_s,
                   tuple(str(r.batch_id) for r in known), tuple(epoch_s(r.created_at) or now for r in known),
                   len(records) - len(known), min(checks, default=None), cfg.auth,
                   written_fields(entry, "headers"), written_fields(entry, "query"))


def waiting_for(job: JobConfig, job_file: str | Path, shard: layout.Shard | None) -> Waiting | None:
    """`waiting` read from the job's output (None without a batch provider or a manifest)."""
    output = open_output(job.output.path, job.output.storage)
    try:
        checkpoint = Checkpoint.read(output)
        return None if checkpoint is None else waiting(job, job_file, output, checkpoint.epoch, shard)
    finally:
        output.close()


def provider_entry(job_file: str | Path, cfg: ProviderConfig) -> dict[str, Any]:
    """The provider's entry as the job file writes it (`${VAR}`s unfilled); {} if unreadable."""
    try:
        doc = yaml.safe_load(Path(job_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    providers = doc.get("providers") if isinstance(doc, dict) else None
    for entry in providers if isinstance(providers, list) else []:
        if isinstance(entry, dict) and entry.get("name") == cfg.name:
            return entry
    return {}


def key_variable(entry: Mapping[str, Any]) -> str | None:
    """The name of the environment variable the provider's key is read from
    (`api_key: ${NAME}`, the only form a key may take in a job file)."""
    value = entry.get("api_key")
    if isinstance(value, str) and WHOLE_ENV_REF.fullmatch(value):
        return re.sub(r"^\$\{|\}$", "", value)
    return None


def written_fields(entry: Mapping[str, Any], key: str) -> dict[str, str]:
    """`headers:` or `query:` of the entry as written: names to text, `${VAR}`s unfilled."""
    value = entry.get(key)
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for name, item in value.items():
        try:
            out[str(name)] = scalar_text(item)
        except Invalid:  # not text (load_job refuses such a job before this is read)
            continue
    return out


def batch_status_fields(record: BatchRecord, interval_s: float | None, now_s: float) -> dict[str, Any]:
    """`status --json`'s additions to a batch's entry."""
    worth = next_check_s(record, interval_s, now_s) if record.open and interval_s else None
    return {"next_check_at": utc_stamp(worth) if worth is not None else None}
