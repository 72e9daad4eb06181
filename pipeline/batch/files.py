"""A batch's files, and the pure policies around them.

- `BatchFile`: one batch's JSONL input as it fills, in a local temp file:
  request lines `{"custom_id", "method": "POST", "url": "/v1/embeddings",
  "body": {"model", "input": [...], "encoding_format": "base64",
  "dimensions"?, ...extra_body}}`, within the documented limits, and what each line covers.
- `results`: the lines of an output or error file, joined to the requests by
  custom_id (they come in any order).
- `KeySet`: the keys pending in an open batch, 16 bytes each in a sorted array.
- `poll_delay_s`: when to look at a running batch again.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..cache.vectors import KEY_BYTES
from ..checkpoint.batch_records import BatchRequest

MAX_REQUESTS_PER_BATCH = 50_000  # the API's cap on lines in one input file
MAX_FILE_BYTES = 190 * 10**6  # under the API's 200 MB a file, whichever megabyte it counts
PROBE_ID = "probe"  # custom_id of the one-vector-space probe line (no synchronous endpoint to probe)
# Polling: the first looks come sooner than the interval (small batches finish
# in minutes), then the interval, then less often as a batch grows old (most
# take hours): at most MAX_POLL_FACTOR x the interval. Jitter spreads shards' polls.
FIRST_POLL_FACTOR = 0.25
BACKOFF_AFTER_INTERVALS = 10  # a batch older than this many intervals is polled less often, in proportion
MAX_POLL_FACTOR = 10.0
POLL_JITTER = 0.2


def custom_id(index: int, unit: int) -> str:
    """A request line's id: its place in the batch, and its unit for people reading the files."""
    return f"r{index}-u{unit}"


@dataclass(frozen=True)
class BatchLimits:
    inputs: int  # embedding inputs across the batch (max_inputs_per_batch)
    requests: int = MAX_REQUESTS_PER_BATCH
    nbytes: int = MAX_FILE_BYTES


class BatchFile:
    """One batch's input file as it fills (texts of one unit per line)."""

    def __init__(self, sub: str, path: Path, model: str, dimensions: int | None, limits: BatchLimits,
                 extra_body: Mapping[str, Any] | None = None) -> None:
        self.sub = sub
        self.path = path
        self.limits = limits
        # The provider's extra_body (input_type, ...) rides on every line, as on a synchronous request.
        self._body: dict[str, Any] = {"model": model, "encoding_format": "base64", **(extra_body or {})}
        if dimensions is not None:
            self._body["dimensions"] = dimensions
        self.requests: list[BatchRequest] = []
        self.keys: set[bytes] = set()
        self.units: set[int] = set()
        self.inputs = 0
        self.tokens = 0
        self.nbytes = 0
        self.probe = False
        self._fh = open(path, "wb")

    def __len__(self) -> int:
        return len(self.requests) + self.probe

    def _line(self, cid: str, texts: list[str]) -> bytes:
        line = {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {**self._body, "input": texts}}
        return (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")

    def fits(self, texts: list[str]) -> bool:
        """Whether a line of these texts fits too (an empty file takes any one line)."""
        if not len(self):
            return True
        return (self.inputs + len(texts) <= self.limits.inputs and len(self) + 1 <= self.limits.requests
                and self.nbytes + len(self._line("r0-u0", texts)) + 16 <= self.limits.nbytes)

    def add(self, request: BatchRequest, texts: list[str]) -> None:
        line = self._line(custom_id(len(self.requests), request.unit), texts)
        self._fh.write(line)
        self.nbytes += len(line)
        self.requests.append(request)
        self.keys.update(request.keys[i:i + KEY_BYTES] for i in range(0, len(request.keys), KEY_BYTES))
        self.units.add(request.unit)
        self.inputs += len(texts)
        self.tokens += request.tokens

    def add_probe(self, texts: list[str]) -> None:
        line = self._line(PROBE_ID, texts)
        self._fh.write(line)
        self.nbytes += len(line)
        self.inputs += len(texts)
        self.probe = True

    def close(self) -> Path:
        self._fh.close()
        return self.path

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def request_index(requests: list[BatchRequest]) -> dict[str, int]:
    return {custom_id(i, r.unit): i for i, r in enumerate(requests)}


@dataclass(frozen=True)
class ResultLine:
    """One line of an output or error file."""

    custom_id: str
    status: int | None  # response.status_code
    body: Any  # response.body: the embeddings answer, or an error body
    error: Any  # the line's own error object (e.g. code batch_expired), when it never ran

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and isinstance(self.body, dict) and not self.body.get("error")

    def error_body(self) -> Any:
        """What classify reads: the response's error body, or the line's error object."""
        if self.error:
            return {"error": self.error}
        return self.body


def results(path: Path) -> Iterator[ResultLine]:
    """The lines of a downloaded output or error file; a line that is not a
    result (torn, not JSON) is skipped: its request counts as unanswered."""
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                continue
            response = obj.get("response")
            response = response if isinstance(response, dict) else {}
            status = response.get("status_code")
            yield ResultLine(obj["custom_id"], status if isinstance(status, int) else None,
                             response.get("body"), obj.get("error"))


class KeySet:
    """The keys of an open batch's texts, for membership tests a unit at a time."""

    def __init__(self, keys: bytes) -> None:
        self._sorted = np.unique(np.frombuffer(keys, dtype=f"S{KEY_BYTES}"))

    def __len__(self) -> int:
        return len(self._sorted)

    def contains(self, probe: np.ndarray) -> np.ndarray:
        """A mask over `probe` (an array of S16 keys): which are in the set."""
        if not len(self._sorted) or not len(probe):
            return np.zeros(len(probe), dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, probe), len(self._sorted) - 1)
        return self._sorted[at] == probe


def keys_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=f"S{KEY_BYTES}") if keys else np.zeros(0, dtype=f"S{KEY_BYTES}")


def poll_delay_s(age_s: float, interval_s: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds until a batch `age_s` old is polled again: a quarter interval
    while it is young, the interval, then in proportion to its age up to
    MAX_POLL_FACTOR intervals; +-20% jitter."""
    if not (interval_s > 0 and math.isfinite(interval_s)):
        raise ValueError("interval_s must be positive and finite")
    age = max(0.0, age_s) if math.isfinite(age_s) else 0.0
    factor = FIRST_POLL_FACTOR if age < interval_s else min(MAX_POLL_FACTOR, max(1.0, age / (BACKOFF_AFTER_INTERVALS * interval_s)))
    return interval_s * factor * (1 + POLL_JITTER * (2 * rand() - 1))
