"""What the checkpoint keeps of batches, and the answers they brought.

Each writer (layout.writer_name) owns its batches' files: a record
(`_manifest.d/batches/W.S.json`, rewritten atomically as the batch moves on),
its requests (`W.S.requests`, immutable, deleted once collected) and, once
collected, a journal of its answers (`_journal.d/batch.W.S.journal`,
checkpoint/journal.py's format). A journal goes when every unit it serves is
committed, then its record.

`Answers` indexes the kept journals by key, and `UnitKnown` shows a unit
the answers it may take (its own journal's, then the batches'), with the
tokens paid for its own lines: the `Known` that engine/units.py finishes a unit from,
exactly as it takes a journal after a kill.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Container, Iterable

import numpy as np

from ..checkpoint import layout
from ..checkpoint.batch_records import BatchRecord, BatchRequest, parse_requests, requests_bytes
from ..checkpoint.journal import JournalContents, parse, refused_piece, vectors_piece
from ..storage.output import Output

log = logging.getLogger("pipeline")


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def read_records(output: Output, epoch: str, writer: str | None = None) -> list[BatchRecord]:
    """The batch records of one writer (None: every writer's) of this job; another job's are skipped."""
    records = []
    for rel in output.list(layout.BATCHES_DIR, layout.batch_records_pattern(writer)):
        try:
            obj = json.loads(output.read_bytes(rel))
            if obj.get("epoch") != epoch:
                continue
            records.append(BatchRecord.from_json(obj))
        except FileNotFoundError:
            continue  # its units committed meanwhile (another writer's)
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("batch record %s is unreadable; ignored", output.display(rel))
    return sorted(records, key=lambda r: (r.created_at, r.sub))


def write_record(output: Output, record: BatchRecord, epoch: str) -> None:
    output.write(layout.batch_record_name(record.writer, record.sub), _dump({**record.to_json(), "epoch": epoch}))


def write_requests(output: Output, record: BatchRecord, requests: list[BatchRequest]) -> None:
    output.write(layout.batch_requests_name(record.writer, record.sub), requests_bytes(requests))


def read_requests(output: Output, record: BatchRecord) -> list[BatchRequest]:
    """What an open batch covers; FileNotFoundError or ValueError if its file is gone or not one."""
    return parse_requests(output.read_bytes(layout.batch_requests_name(record.writer, record.sub)))


def delete_requests(output: Output, record: BatchRecord) -> None:
    output.delete(layout.batch_requests_name(record.writer, record.sub))


def delete_batch(output: Output, record: BatchRecord) -> None:
    """Its journal, then its requests, then its record: a kill halfway leaves a record without files, never the reverse."""
    output.delete_log(layout.batch_journal_name(record.writer, record.sub))
    delete_requests(output, record)
    output.delete(layout.batch_record_name(record.writer, record.sub))


def orphan_files(output: Output, writer: str | None, records: Iterable[BatchRecord]) -> list[str]:
    """A writer's batch files that no record explains (a kill between writes):
    requests of batches no longer open, journals without a record."""
    records = list(records)
    known = {(r.writer, r.sub) for r in records}
    still_open = {(r.writer, r.sub) for r in records if r.open}
    found = []
    for rel in output.list(layout.BATCHES_DIR, f"{writer or '*'}.*.requests"):
        w, _, sub = rel.rsplit("/", 1)[-1].removesuffix(".requests").partition(".")
        if (w, sub) not in still_open:
            found.append(rel)
    for rel in output.list_logs(layout.JOURNAL_DIR):
        name = rel.rsplit("/", 1)[-1]
        if not name.startswith("batch.") or not name.endswith(".journal"):
            continue
        w, _, sub = name.removeprefix("batch.").removesuffix(".journal").partition(".")
        if (writer is None or w == writer) and (w, sub) not in known:
            found.append(rel)
    return found


class BatchJournal:
    """A collected batch's answers, in the output until the units it serves commit."""

    def __init__(self, output: Output, record: BatchRecord) -> None:
        self._output = output
        self._rel = layout.batch_journal_name(record.writer, record.sub)

    def reset(self) -> None:
        """A collection cut short by a kill starts again from nothing."""
        self._output.delete_log(self._rel)

    def answered(self, keys: list[bytes], vectors: np.ndarray, tokens: int) -> None:
        self._output.append(self._rel, vectors_piece(keys, vectors, tokens))

    def refused(self, key: bytes, code: str | None) -> None:
        self._output.append(self._rel, refused_piece(key, code))

    def read(self, dim: int) -> JournalContents:
        return parse(self._output.read_log(self._rel), dim)


class Answers:
    """Vectors and refusals of the kept batch journals, by key."""

    def __init__(self) -> None:
        self._journals: dict[str, JournalContents] = {}
        self._where: dict[bytes, JournalContents] = {}
        self._owner: dict[int, str] = {}  # id(journal) -> its batch
        self.refused: dict[bytes, str | None] = {}

    def add(self, sub: str, contents: JournalContents) -> None:
        self._journals[sub] = contents
        self._owner[id(contents)] = sub
        for key in contents.offsets:
            self._where[key] = contents
        self.refused.update(contents.refused)

    def drop(self, sub: str) -> JournalContents | None:
        """Forget a batch's answers; its journal's contents, if it had one."""
        contents = self._journals.pop(sub, None)
        if contents is None:
            return None
        del self._owner[id(contents)]
        for key in contents.offsets:
            if self._where.get(key) is contents:
                del self._where[key]
        for key in contents.refused:
            self.refused.pop(key, None)
        return contents

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def vector(self, key: bytes) -> np.ndarray:
        return self._where[key].vector(key)

    def batch_of(self, key: bytes) -> str | None:
        """The batch whose journal answers `key`."""
        contents = self._where.get(key)
        return self._owner.get(id(contents)) if contents is not None else None


class UnitKnown:
    """A unit's answers already paid for: its own journal's (answers a
    synchronous run journaled before the job moved to batches), then the
    collected batches'; and the tokens paid for its own lines."""

    def __init__(self, own: JournalContents, answers: Answers, tokens: int, earlier: Container[str]) -> None:
        self._own = own
        self._answers = answers
        self._tokens = tokens
        self._earlier = earlier  # batches collected by earlier runs
        self.refused = {**answers.refused, **own.refused} if own.refused else answers.refused

    def __contains__(self, key: bytes) -> bool:
        return key in self._own or key in self._answers

    def vector(self, key: bytes) -> np.ndarray:
        return self._own.vector(key) if key in self._own else self._answers.vector(key)

    def paid_earlier(self, key: bytes) -> bool:
        return key in self._own or self._answers.batch_of(key) in self._earlier

    def tokens_for(self, seq: int) -> int:
        return self._tokens
