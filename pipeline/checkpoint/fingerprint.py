"""What makes a job's vectors what they are: its fingerprint, the epoch its
records carry, and a readable account of a change."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..config.job import JobConfig
from ..core.quantize import columns_fingerprint
from ..inputs.sources import InputFile

# What makes the vectors (or the output layout) what they are: changing any
# of these on an output with progress is refused unless --restart.
VECTOR_KEYS = (
    "inputs", "text", "model", "dimensions", "too_long", "max_input_tokens", "empty", "id_column",
    "keep_columns", "vector_column", "rows_per_part", "vector_options", "columns",
)


EPOCH_KEYS_V2 = VECTOR_KEYS[: VECTOR_KEYS.index("vector_options")]  # always in an epoch, present or not


def job_fingerprint(job: JobConfig, files: list[InputFile]) -> dict[str, Any]:
    return {
        "inputs": [f.fingerprint() for f in files],
        "text": {"column": job.input.text_column} if job.input.text_column else {"template": job.input.text_template},
        "model": job.embedding.model,
        "dimensions": job.embedding.dimensions,
        "too_long": job.embedding.too_long,
        "max_input_tokens": job.embedding.max_input_tokens,
        "empty": job.embedding.empty,
        "id_column": job.id_column_out,
        "keep_columns": list(job.input.keep_columns),
        "vector_column": job.output.vector_column,
        "rows_per_part": job.output.rows_per_part,
        # extra_body, text_prefix, normalize: only when set, so an output begun before they existed is the same job
        **({"vector_options": job.vector_options} if job.vector_options else {}),
        # vector_dtype, vectors: only when not the default float32 column alone, likewise
        **({"columns": columns} if (columns := columns_fingerprint(job)) is not None else {}),
    }


def epoch_of(fingerprint: dict[str, Any]) -> str:
    """Records carry it: a record left by another job (a --restart cut short) is never read as ours."""
    # Keys added since (vector_options) count only where a job sets them: an older output keeps its epoch.
    canonical = json.dumps({k: fingerprint.get(k) for k in VECTOR_KEYS if k in fingerprint or k in EPOCH_KEYS_V2},
                           sort_keys=True, default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A readable account of the first difference, or None if the same."""
    for key in VECTOR_KEYS:
        if old.get(key) == new.get(key):
            continue
        if key == "inputs":
            before = {f["path"]: f for f in old.get("inputs", [])}
            after = {f["path"]: f for f in new.get("inputs", [])}
            for path in after:
                if path not in before:
                    return f"input {path} was added"
            for path in before:
                if path not in after:
                    return f"input {path} is gone"
            for path, f in after.items():
                if f != before[path]:
                    return f"input {path} changed (size or modification time)"
            return "the order of the inputs changed"
        if key == "columns":
            return ("the vector columns changed (output.vector_dtype or output.vectors); with a cache, "
                    "--restart writes the parts again from it without paying for the texts again")
        return f"{key} changed from {old.get(key)!r} to {new.get(key)!r}"
    return None
