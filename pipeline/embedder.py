"""A slice of a unit's rows -> their vectors, paying once for each text.

Between the texts and the sink: claim the pieces (in-run dedupe, the unit's
journal, the cache), pack and send the rest, narrow a refused request down to
the pieces it is about, take the answers other slices were waiting for, and
combine piece vectors into row vectors with each row's reason when it gets
none. Every answer goes to the unit's journal as it arrives.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from . import sink
from .config import JobConfig
from .dispatch import Dispatcher
from .errors import BadInputError
from .journal import Journal, Known
from .packing import pack
from .reuse import ORIGIN_CODE, Claim, Origin, Refused, Reuse, origin_counts
from .spend import Spend
from .texts import PreparedTexts, combine

ProgressCallback = Callable[[int, int], None]  # (rows finished, tokens paid)


@dataclass(frozen=True)
class Embedded:
    """A slice's rows: vector (null when none), why not, the provider's code."""

    vectors: pa.FixedSizeListArray
    reasons: list[str | None]
    codes: list[str | None]
    tokens: int  # paid for now: sent and answered
    origins: dict[Origin, int]  # rows with a vector, by where it came from


class Embedder:
    def __init__(self, job: JobConfig, dispatcher: Dispatcher, reuse: Reuse, dim: int,
                 on_progress: ProgressCallback, spend: Spend | None = None) -> None:
        self.job = job
        self.dispatcher = dispatcher
        self.reuse = reuse
        self.dim = dim
        self.on_progress = on_progress
        self.spend = spend or Spend(None, None, 0)  # budget_usd: held before each request is sent

    async def embed(self, prepared: PreparedTexts, journal: Journal, known: Known | None) -> Embedded:
        keys = self.reuse.keys(prepared.pieces)
        claim = await self.reuse.claim(keys, known)
        vectors = np.zeros((len(prepared.pieces), self.dim), dtype=np.float32)
        refused: dict[int, str | None] = dict(claim.refused)  # first piece of a key -> provider error code
        try:
            for piece, vector in claim.found.items():
                vectors[piece] = vector
            paid, reported = await self._send(prepared, claim, claim.send, vectors, refused, journal)
            orphaned = await self._await_others(claim, vectors, refused)
            if orphaned:  # the slice sending them stopped: send them here
                claim.origin[orphaned] = ORIGIN_CODE["provider"]
                more_paid, more_reported = await self._send(prepared, claim, orphaned, vectors, refused, journal)
                paid, reported = paid + more_paid, reported + more_reported
        finally:
            self.reuse.release(claim)
        await self._journal_reused(claim, vectors, refused, journal)
        self.on_progress(prepared.n_rows - reported, 0)  # rows not sent: reused, rejected, or cut short
        return self._rows(prepared, claim, vectors[claim.first], refused, paid)

    def _rows(self, prepared: PreparedTexts, claim: Claim, vectors: np.ndarray,
              refused: dict[int, str | None], paid: int) -> Embedded:
        """Row vectors from piece vectors, each row's reason when it gets none."""
        ok = ~np.isin(claim.first, list(refused))
        codes: list[str | None] = [None] * prepared.n_rows
        reasons: list[str | None] = list(prepared.reasons)
        for piece in np.flatnonzero(~ok):
            row = int(prepared.piece_row[piece])
            reasons[row] = "provider_rejected"
            codes[row] = refused[int(claim.first[piece])]
        row_vectors, has = combine(vectors, prepared)
        for row in range(prepared.n_rows):
            if reasons[row] is None and not has[row]:
                reasons[row] = "empty"  # every chunk of it was blank
        has &= np.array([r is None for r in reasons], dtype=bool)
        row_origin = np.full(prepared.n_rows, len(ORIGIN_CODE) - 1, dtype=np.int8)
        np.minimum.at(row_origin, prepared.piece_row, claim.origin)
        return Embedded(sink.vector_array(row_vectors, has, self.dim), reasons, codes, paid,
                        origin_counts(has, row_origin))

    async def _send(self, prepared: PreparedTexts, claim: Claim, order: list[int], vectors: np.ndarray,
                    refused: dict[int, str | None], journal: Journal) -> tuple[int, int]:
        """Send the pieces `order` in packed requests, narrowing a 400 down to
        the pieces it is about. Fills `vectors` and `refused`; returns the
        tokens paid for and the rows reported to the progress."""
        picked = np.asarray(order, dtype=np.int64)
        is_last_piece = np.r_[prepared.piece_row[1:] != prepared.piece_row[:-1], True]
        paid = reported = 0

        async def send(a: int, b: int) -> None:
            nonlocal paid, reported
            pieces = picked[a:b]
            tokens = int(prepared.piece_tokens[pieces].sum())
            try:
                with self.spend.holding(tokens) as billed:
                    result = await self.dispatcher.embed([prepared.pieces[i] for i in pieces], tokens)
                    billed.append(tokens)
            except BadInputError as err:
                if b - a == 1:
                    code = err.code or (str(err.status) if err.status else None)
                    key = claim.keys[pieces[0]]
                    refused[int(pieces[0])] = code
                    await asyncio.to_thread(journal.refused, key, code)
                    self.reuse.refused(key, code)
                else:  # isolate the offending pieces; the others still get embedded
                    mid = (a + b) // 2
                    await asyncio.gather(send(a, mid), send(mid, b))
                return
            keys = [claim.keys[i] for i in pieces]
            await asyncio.to_thread(journal.answered, keys, result.vectors, tokens)  # paid: kept before anything else
            vectors[pieces] = result.vectors
            paid += tokens
            rows_finished = int(np.count_nonzero(is_last_piece[pieces]))
            reported += rows_finished
            self.on_progress(rows_finished, tokens)
            await self.reuse.answered(keys, result.vectors)

        max_inputs, max_tokens = self.job.request_limits()
        slices = pack(prepared.piece_tokens[picked], prepared.piece_bytes[picked], max_inputs=max_inputs, max_tokens=max_tokens)
        await asyncio.gather(*(send(a, b) for a, b in slices))
        return paid, reported

    @staticmethod
    async def _await_others(claim: Claim, vectors: np.ndarray, refused: dict[int, str | None]) -> list[int]:
        """Take the answers of keys other slices were sending; returns the
        pieces whose sender stopped without an answer."""
        if claim.waits:
            await asyncio.wait(claim.waits.values())  # not gather: cancelling this slice must not cancel theirs
        orphaned = []
        for piece, future in claim.waits.items():
            answer = future.result()
            if isinstance(answer, Refused):
                refused[piece] = answer.code
            elif answer is None:
                orphaned.append(piece)
            else:
                vectors[piece] = answer
        return orphaned

    @staticmethod
    async def _journal_reused(claim: Claim, vectors: np.ndarray, refused: dict[int, str | None],
                              journal: Journal) -> None:
        """Vectors this slice took from other slices (in-run dedupe) go to its
        journal too: a kill before its part commits must not make them cost again."""
        reused = [i for i in [*claim.waits, *claim.found] if claim.origin[i] == ORIGIN_CODE["deduped"] and i not in refused]
        if reused:
            await asyncio.to_thread(journal.answered, [claim.keys[i] for i in reused], vectors[reused], 0)
