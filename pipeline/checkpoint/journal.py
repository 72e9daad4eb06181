"""A unit's journal: the answers it has, kept from the moment they arrive
until its part commits, so a killed run pays again only for what was in flight.

One log per unit not yet committed (`_journal.d/unit-N.journal`), appended
once per request answered (and once per text refused): the keys, the exact
float32 bytes of their vectors, and the tokens paid. A rerun takes a unit's
journal as it takes cache hits, so its part comes out bit-identical. Each
piece ends with a CRC32C of every byte before it (header, keys, vectors): a
piece torn by a kill, with a flipped bit, or with blocks swapped or written
out of order does not check out and is skipped up to the next piece that
does; what it held is paid for again, never trusted.

Journals of the previous format (`EJ2`, whose word sum a reordered write
could pass) are not read: the answers of that unit in flight when the old
version stopped are requested again, once, and a warning says so.
"""
from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from crc32c import crc32c

from ..cache.vectors import KEY_BYTES
from ..storage.output import Output
from .layout import journal_name

log = logging.getLogger("pipeline")

MAGIC = b"EJ3\n"
OLD_MAGIC = b"EJ2\n"  # the previous format: discarded (see above)
KIND_VECTORS, KIND_REFUSED = 1, 2
# magic, kind, entries, floats per vector, tokens paid, payload bytes
HEADER = struct.Struct("<4sBIIQQ")
# CRC32C (Castagnoli, hardware-accelerated: about 0.5 us a 1,536-float row)
# of the header, the keys and the vectors, every byte of the piece.
TRAILER = struct.Struct("<I")


class Known(Protocol):
    """Answers already paid for, looked up by key: a unit's journal, or (batches) many."""

    refused: dict[bytes, str | None]

    def __contains__(self, key: bytes) -> bool: ...
    def vector(self, key: bytes) -> np.ndarray: ...
    def paid_earlier(self, key: bytes) -> bool:
        """Whether an earlier run paid for `key` (its rows count as from the journal), not this one."""
        ...
    def tokens_for(self, seq: int) -> int:
        """Tokens paid for unit `seq`'s own requests, to go into its record."""
        ...


@dataclass
class JournalContents:
    """What a journal holds: vectors by key (read on demand), refusals, tokens paid."""

    dim: int
    buffer: bytes | memoryview | mmap.mmap = b""
    offsets: dict[bytes, int] = field(default_factory=dict)  # key -> byte offset of its vector
    refused: dict[bytes, str | None] = field(default_factory=dict)
    tokens: int = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.offsets

    def vector(self, key: bytes) -> np.ndarray:
        return np.frombuffer(self.buffer, dtype="<f4", count=self.dim, offset=self.offsets[key])

    def __len__(self) -> int:
        return len(self.offsets)

    def paid_earlier(self, key: bytes) -> bool:
        return True  # a journal read at start holds what killed runs paid for

    def tokens_for(self, seq: int) -> int:
        return self.tokens  # a unit's own journal: all of it was paid for that unit


def vectors_piece(keys: Sequence[bytes], vectors: np.ndarray, tokens: int) -> list[bytes | memoryview]:
    """The buffers of one piece, in order (written with one writev: no copy of the vectors)."""
    floats = np.ascontiguousarray(vectors, dtype="<f4")
    dim = floats.shape[1] if floats.ndim == 2 else 0
    return _frame(KIND_VECTORS, len(keys), dim, tokens, b"".join(keys), memoryview(floats).cast("B"))


def refused_piece(key: bytes, code: str | None) -> list[bytes | memoryview]:
    return _frame(KIND_REFUSED, 1, 0, 0, key + (code or "").encode("utf-8"), b"")


def _frame(kind: int, entries: int, dim: int, tokens: int, head: bytes, floats: bytes | memoryview) -> list[bytes | memoryview]:
    header = HEADER.pack(MAGIC, kind, entries, dim, tokens, len(head) + len(floats))
    return [header, head, floats, TRAILER.pack(crc32c(floats, crc32c(head, crc32c(header))))]


def parse(data: bytes | memoryview | mmap.mmap, dim: int) -> JournalContents:
    """Every whole piece of `data`. A piece that does not check out (torn by
    a kill mid-write) is skipped up to the next piece that does: pieces a
    later run appended after it are still good."""
    out = JournalContents(dim=dim, buffer=data)
    view = memoryview(data)
    if bytes(view[:len(OLD_MAGIC)]) == OLD_MAGIC:
        log.warning("a journal of the previous format is not read: the answers it holds are requested again")
    pos = 0
    while pos + HEADER.size <= len(view):
        end = _checked_end(view, pos)
        if end is None:
            found = bytes(view[pos + 1:]).find(MAGIC) if pos + 1 < len(view) else -1
            if found < 0:
                break
            pos += 1 + found
            continue
        _, kind, entries, piece_dim, tokens, size = HEADER.unpack_from(view, pos)
        body = pos + HEADER.size
        if kind == KIND_VECTORS and piece_dim == dim and size == entries * (KEY_BYTES + 4 * dim):
            floats = body + entries * KEY_BYTES
            for i in range(entries):
                key = bytes(view[body + i * KEY_BYTES:body + (i + 1) * KEY_BYTES])
                out.offsets.setdefault(key, floats + i * 4 * dim)
            out.tokens += tokens
        elif kind == KIND_REFUSED and size >= KEY_BYTES:
            key = bytes(view[body:body + KEY_BYTES])
            out.refused[key] = bytes(view[body + KEY_BYTES:body + size]).decode("utf-8", "replace") or None
        pos = end
    return out


def _checked_end(view: memoryview, pos: int) -> int | None:
    """Where the piece at `pos` ends, if it is whole and checks out."""
    magic, _, _, _, _, size = HEADER.unpack_from(view, pos)
    body = pos + HEADER.size
    end = body + size
    if magic != MAGIC or end + TRAILER.size > len(view):
        return None
    (crc,) = TRAILER.unpack_from(view, end)
    if crc32c(view[pos:end]) != crc:
        return None
    return end + TRAILER.size


class Journal:
    """The journal of one unit in the output."""

    def __init__(self, output: Output, seq: int, dim: int) -> None:
        self._output = output
        self._rel = journal_name(seq)
        self._dim = dim

    def read(self) -> JournalContents:
        return parse(self._output.read_log(self._rel), self._dim)

    def answered(self, keys: Sequence[bytes], vectors: np.ndarray, tokens: int) -> None:
        self._output.append(self._rel, vectors_piece(keys, vectors, tokens))

    def refused(self, key: bytes, code: str | None) -> None:
        self._output.append(self._rel, refused_piece(key, code))

    def delete(self) -> None:
        self._output.delete_log(self._rel)
