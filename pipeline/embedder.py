"""A unit's texts -> its rows' vectors, paying once for each text.

Between the texts and the sink: claim the pieces (in-run dedupe, the cache),
pack and send the rest, narrow a refused request down to the pieces it is
about, take the answers other units were waiting for, and combine piece
vectors into row vectors with each row's reason when it gets none.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import sink
from .config import JobConfig
from .dispatch import Dispatcher
from .errors import BadInputError
from .packing import pack
from .progress import Progress
from .reuse import FROM_CACHE, FROM_DEDUPE, FROM_PROVIDER, Claim, Refused, Reuse
from .texts import PreparedTexts, combine, count_tokens, request_tokens


@dataclass(frozen=True)
class Embedded:
    result: pa.Table  # per row: vector (null when none), reason, provider error code
    tokens: int  # paid for: sent and answered
    sources: dict[str, int]  # rows embedded without a request: "deduped", "from_cache"


class Embedder:
    def __init__(self, job: JobConfig, dispatcher: Dispatcher, reuse: Reuse, progress: Progress, dim: int) -> None:
        self.job = job
        self.dispatcher = dispatcher
        self.reuse = reuse
        self.progress = progress
        self.dim = dim

    async def embed(self, prepared: PreparedTexts) -> Embedded:
        claim = await self.reuse.claim(prepared.pieces)
        vectors = np.zeros((len(prepared.pieces), self.dim), dtype=np.float32)
        refused: dict[int, str | None] = {}  # first piece of a key -> provider error code
        try:
            for piece, vector in claim.found.items():
                vectors[piece] = vector
            paid, reported = await self._send(prepared, claim, claim.send, vectors, refused)
            orphaned = await self._await_others(claim, vectors, refused)
            if orphaned:  # the unit sending them stopped: send them here
                claim.source[orphaned] = FROM_PROVIDER
                more_paid, more_reported = await self._send(prepared, claim, orphaned, vectors, refused)
                paid, reported = paid + more_paid, reported + more_reported
        finally:
            self.reuse.release(claim)
        self.progress.advance(prepared.n_rows - reported, 0)  # rows not sent: reused, rejected, or cut short
        result, sources = self._rows(prepared, claim, vectors[claim.first], refused)
        return Embedded(result=result, tokens=paid, sources=sources)

    def _rows(self, prepared: PreparedTexts, claim: Claim, vectors: np.ndarray,
              refused: dict[int, str | None]) -> tuple[pa.Table, dict[str, int]]:
        """Row vectors from piece vectors, each row's reason when it gets
        none, and how many rows came without a request."""

        ok = ~np.isin(claim.first, list(refused))
        codes: list[str | None] = [None] * prepared.n_rows
        reasons = list(prepared.reasons)
        for piece in np.flatnonzero(~ok):
            row = int(prepared.piece_row[piece])
            reasons[row] = "provider_rejected"
            codes[row] = refused[int(claim.first[piece])]
        row_vectors, has = combine(vectors, prepared)
        for row in range(prepared.n_rows):
            if reasons[row] is None and not has[row]:
                reasons[row] = "empty"  # every chunk of it was blank
        has &= np.array([r is None for r in reasons], dtype=bool)
        # A row came from a provider if any piece of it did; else from dedupe; else from the cache.
        row_source = np.full(prepared.n_rows, FROM_CACHE, dtype=np.int8)
        np.minimum.at(row_source, prepared.piece_row, claim.source)
        sources = {"deduped": int(np.count_nonzero(has & (row_source == FROM_DEDUPE))),
                   "from_cache": int(np.count_nonzero(has & (row_source == FROM_CACHE)))}
        result = pa.table(
            {
                "vector": sink.vector_array(row_vectors, has, self.dim),
                sink.REASON_COLUMN: pa.array(reasons, pa.string()),
                sink.CODE_COLUMN: pa.array(codes, pa.string()),
            }
        )
        return result, sources

    async def _send(self, prepared: PreparedTexts, claim: Claim, order: list[int], vectors: np.ndarray,
                    refused: dict[int, str | None]) -> tuple[int, int]:
        """Send the pieces `order` in packed requests, narrowing a 400 down to
        the pieces it is about. Fills `vectors` and `refused`; returns the
        tokens paid for and the rows reported to the progress."""
        picked = np.asarray(order, dtype=np.int64)
        is_last_piece = np.r_[prepared.piece_row[1:] != prepared.piece_row[:-1], True]
        paid = reported = 0
        max_inputs, max_tokens = self.job.request_limits()
        # Byte bounds where they pack as exact counts would, exact counts elsewhere (texts.py).
        counts, exact = prepared.piece_tokens[picked], prepared.exact[picked]
        if not exact.all() and int(counts.sum()) > max_tokens:
            counts, exact = await asyncio.to_thread(request_tokens, prepared, picked, max_inputs=max_inputs,
                                                    max_tokens=max_tokens)

        async def send(a: int, b: int) -> None:
            nonlocal paid, reported
            pieces = picked[a:b]
            tokens = int(counts[a:b].sum())
            texts = [prepared.pieces[i] for i in pieces]
            try:
                result = await self.dispatcher.embed(texts, tokens)
            except BadInputError as err:
                if b - a == 1:
                    code = err.code or (str(err.status) if err.status else None)
                    refused[int(pieces[0])] = code
                    self.reuse.refused(claim.keys[pieces[0]], code)
                else:  # isolate the offending pieces; the others still get embedded
                    mid = (a + b) // 2
                    await asyncio.gather(send(a, mid), send(mid, b))
                return
            vectors[pieces] = result.vectors
            # What the provider says it billed; else our count, exact.
            if result.usage_tokens is not None:
                billed = result.usage_tokens
            elif exact[a:b].all():
                billed = tokens
            else:
                billed = int((await asyncio.to_thread(count_tokens, texts)).sum())
            paid += billed
            rows_finished = int(np.count_nonzero(is_last_piece[pieces]))
            reported += rows_finished
            self.progress.advance(rows_finished, billed)
            await self.reuse.answered([claim.keys[i] for i in pieces], result.vectors)

        slices = pack(counts, prepared.piece_bytes[picked], max_inputs=max_inputs, max_tokens=max_tokens)
        await asyncio.gather(*(send(a, b) for a, b in slices))
        return paid, reported

    @staticmethod
    async def _await_others(claim: Claim, vectors: np.ndarray, refused: dict[int, str | None]) -> list[int]:
        """Take the answers of keys other units were sending; returns the
        pieces whose sender stopped without an answer."""
        if claim.waits:
            await asyncio.wait(claim.waits.values())  # not gather: cancelling this unit must not cancel theirs
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
