"""The checkpoint's batch records (a job with an `openai_batch` provider,
batch/strategy.py).

A *batch record* is one small JSON file per batch, rewritten atomically as
the batch moves on, beside an immutable binary *requests* file: what each
request line covers (its unit, attempt, tokens and the keys of its texts).
Both are written before anything waits on the batch, so no submitted text is
ever submitted again.
"""
from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from ..cache.vectors import KEY_BYTES
from .records import RECORD_VERSION, fields_of

# submitting: recorded before upload and create (a kill there is resolved by
# listing the provider's files and batches at the next start); submitted: the
# provider has it, it is polled; collected: its answers are in its journal;
# failed: it never ran (refused at validation): its units are sent again.
BatchState = Literal["submitting", "submitted", "collected", "failed"]
OPEN_BATCH_STATES: tuple[BatchState, ...] = ("submitting", "submitted")
REQUESTS_MAGIC = b"EBR1\n"
REQUEST_HEAD = struct.Struct("<QIIQ")  # unit, attempt, pieces, tokens; then the pieces' keys


@dataclass(frozen=True)
class BatchRecord:
    sub: str  # our submission id: names the record, its requests, its journal, and goes into the metadata
    writer: str  # layout.writer_name: the shard (or unsharded run) that polls and collects it
    provider: str
    state: BatchState
    created_at: str
    requests: int
    inputs: int
    tokens: int  # submitted, counted as the run counts them
    units: tuple[int, ...]  # units with requests in it
    examined_through: int  # the last unit the run had examined when it built this batch
    probe: bool = False  # holds the one-vector-space probe texts (no synchronous endpoint)
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's last word
    request_counts: tuple[int, int, int] = (0, 0, 0)  # total, completed, failed, as the provider counts them
    answered: tuple[tuple[int, int], ...] = ()  # (unit, tokens paid) of its answered lines, once collected
    failed: tuple[tuple[int, int], ...] = ()  # (unit, attempt) of its lines that failed
    isolate: tuple[int, ...] = ()  # units with a refused line of several texts: sent again one text a line
    error: str | None = None  # why it failed or what its failed lines said
    files: tuple[str, ...] = ()  # the provider's files of a closed batch, until they are deleted

    def __post_init__(self) -> None:
        if self.state not in get_args(BatchState):
            raise ValueError(f"batch state {self.state!r}")

    @property
    def open(self) -> bool:
        return self.state in OPEN_BATCH_STATES

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any) -> BatchRecord:
        values = fields_of(cls, obj, "batch record")
        for name in ("units", "isolate", "request_counts", "files"):
            values[name] = tuple(values.get(name, ()))
        for name in ("answered", "failed"):
            values[name] = tuple((int(a), int(b)) for a, b in values.get(name, ()))
        return cls(**values)


@dataclass(frozen=True)
class BatchRequest:
    """One request line of a batch: texts of one unit, by key."""

    unit: int
    attempt: int  # 1 for the first time its texts are sent
    tokens: int
    keys: bytes  # KEY_BYTES per text, in the line's order

    @property
    def pieces(self) -> int:
        return len(self.keys) // KEY_BYTES


def requests_bytes(requests: list[BatchRequest]) -> bytes:
    out = [REQUESTS_MAGIC]
    for r in requests:
        out += [REQUEST_HEAD.pack(r.unit, r.attempt, r.pieces, r.tokens), r.keys]
    return b"".join(out)


def parse_requests(data: bytes) -> list[BatchRequest]:
    """The requests file back; ValueError when it is not one (written atomically, so never torn)."""
    if not data.startswith(REQUESTS_MAGIC):
        raise ValueError("not a batch requests file")
    pos, out = len(REQUESTS_MAGIC), []
    while pos < len(data):
        if pos + REQUEST_HEAD.size > len(data):
            raise ValueError("batch requests file cut short")
        unit, attempt, pieces, tokens = REQUEST_HEAD.unpack_from(data, pos)
        pos += REQUEST_HEAD.size
        keys = data[pos:pos + pieces * KEY_BYTES]
        if len(keys) != pieces * KEY_BYTES:
            raise ValueError("batch requests file cut short")
        out.append(BatchRequest(unit, attempt, tokens, keys))
        pos += len(keys)
    return out
