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

from ..checkpoint import parts
from ..checkpoint.journal import Journal, Known
from ..config.job import JobConfig
from ..core.money import Spend
from ..core.packing import pack
from ..errors import BadInputError, WorkLeftError
from ..inputs.texts import PreparedTexts, combine, count_tokens, request_tokens, tokenizing
from .dispatch import Dispatcher
from .reuse import ORIGIN_CODE, Claim, Origin, Refused, Reuse, origin_counts

ProgressCallback = Callable[[int, int], None]  # (rows finished, tokens paid)


@dataclass(frozen=True)
class Embedded:
    """A slice's rows: vector (null when none), why not, the provider's code."""

    vectors: pa.FixedSizeListArray
    reasons: list[str | None]
    codes: list[str | None]
    tokens: int  # paid for now: sent and answered
    # Of `tokens`, those the providers' usage reported; the rest counted with
    # cl100k (some relays report characters there: the summary says which is which).
    tokens_reported: int
    origins: dict[Origin, int]  # rows with a vector, by where it came from


class Embedder:
    def __init__(self, job: JobConfig, dispatcher: Dispatcher | None, reuse: Reuse, dim: int,
                 on_progress: ProgressCallback, spend: Spend | None = None) -> None:
        self.job = job
        self.dispatcher = dispatcher  # None: every text comes known (a batch job's answers), none is sent
        self.reuse = reuse
        self.dim = dim
        self.on_progress = on_progress
        self.spend = spend or Spend(None, None, 0)  # budget_usd: held before each request is sent

    async def embed(self, prepared: PreparedTexts, journal: Journal, known: Known | None) -> Embedded:
        keys = self.reuse.keys(prepared.pieces)
        claim = await self.reuse.claim(keys, known)
        # Where each piece's vector goes. A slice whose rows are one piece each
        # (or none) keeps them at their rows: no combining, no copy of the slice.
        rows = prepared.piece_row
        by_row = len(rows) == 0 or bool(np.all(rows[1:] != rows[:-1]))
        slots = rows if by_row else np.arange(len(keys))
        vectors = np.zeros((prepared.n_rows if by_row else len(keys), self.dim), dtype=np.float32)
        refused: dict[int, str | None] = dict(claim.refused)  # first piece of a key -> provider error code
        try:
            for piece, vector in claim.found.items():
                vectors[slots[piece]] = vector
            paid, from_usage, reported = await self._send(prepared, claim, claim.send, vectors, slots, refused, journal)
            orphaned = await self._await_others(claim, vectors, slots, refused)
            if orphaned:  # the slice sending them stopped: send them here
                claim.origin[orphaned] = ORIGIN_CODE["provider"]
                more = await self._send(prepared, claim, orphaned, vectors, slots, refused, journal)
                paid, from_usage, reported = paid + more[0], from_usage + more[1], reported + more[2]
        finally:
            self.reuse.release(claim)
        repeats = np.flatnonzero(claim.first != np.arange(len(keys)))
        vectors[slots[repeats]] = vectors[slots[claim.first[repeats]]]  # a repeat takes its first piece's vector
        await self._journal_reused(claim, vectors, slots, refused, journal)
        self.on_progress(prepared.n_rows - reported, 0)  # rows not sent: reused, rejected, or cut short
        return self._rows(prepared, claim, vectors, by_row, refused, paid, from_usage)

    def _rows(self, prepared: PreparedTexts, claim: Claim, vectors: np.ndarray, by_row: bool,
              refused: dict[int, str | None], paid: int, from_usage: int) -> Embedded:
        """Row vectors from piece vectors, each row's reason when it gets none."""
        ok = ~np.isin(claim.first, list(refused))
        codes: list[str | None] = [None] * prepared.n_rows
        reasons: list[str | None] = list(prepared.reasons)
        for piece in np.flatnonzero(~ok):
            row = int(prepared.piece_row[piece])
            reasons[row] = "provider_rejected"
            codes[row] = refused[int(claim.first[piece])]
        if by_row:
            row_vectors, has = vectors, np.zeros(prepared.n_rows, dtype=bool)
            has[prepared.piece_row] = True
        else:
            row_vectors, has = combine(vectors, prepared)
        for row in range(prepared.n_rows):
            if reasons[row] is None and not has[row]:
                reasons[row] = "empty"  # every chunk of it was blank
        has &= np.array([r is None for r in reasons], dtype=bool)
        row_origin = np.full(prepared.n_rows, len(ORIGIN_CODE) - 1, dtype=np.int8)
        np.minimum.at(row_origin, prepared.piece_row, claim.origin)
        return Embedded(parts.vector_array(row_vectors, has, self.dim), reasons, codes, paid, from_usage,
                        origin_counts(has, row_origin))

    async def _send(self, prepared: PreparedTexts, claim: Claim, order: list[int], vectors: np.ndarray,
                    slots: np.ndarray, refused: dict[int, str | None], journal: Journal) -> tuple[int, int, int]:
        """Send the pieces `order` in packed requests, narrowing a 400 down to
        the pieces it is about. Fills `vectors` and `refused`; returns the
        tokens paid for, those of them the provider reported, and the rows
        reported to the progress."""
        picked = np.asarray(order, dtype=np.int64)
        max_inputs, max_tokens = self.job.request_limits(self.dim)
        if self.dispatcher is not None:  # a provider's cap found on the way (too many inputs)
            max_inputs = self.dispatcher.input_cap(max_inputs)
        # Byte bounds where they pack as exact counts would, exact counts elsewhere (texts.py).
        counts, exact = prepared.piece_tokens[picked], prepared.exact[picked]
        if not exact.all() and int(counts.sum()) > max_tokens:
            counts, exact = await tokenizing(request_tokens, prepared, picked, max_inputs=max_inputs,
                                             max_tokens=max_tokens)
        rows = prepared.piece_row
        last_piece = np.r_[rows[1:] != rows[:-1], True]  # a row is finished with its last piece
        sending = _Sending(self, prepared, claim, picked, counts, exact, last_piece, vectors, slots, refused, journal)
        requests = pack(counts, prepared.piece_bytes[picked], max_inputs=max_inputs, max_tokens=max_tokens)
        await asyncio.gather(*(sending.request(a, b) for a, b in requests))
        return sending.paid, sending.from_usage, sending.reported

    @staticmethod
    async def _await_others(claim: Claim, vectors: np.ndarray, slots: np.ndarray,
                            refused: dict[int, str | None]) -> list[int]:
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
                vectors[slots[piece]] = answer
        return orphaned

    @staticmethod
    async def _journal_reused(claim: Claim, vectors: np.ndarray, slots: np.ndarray, refused: dict[int, str | None],
                              journal: Journal) -> None:
        """Vectors this slice took from other slices (in-run dedupe) go to its
        journal too: a kill before its part commits must not make them cost again."""
        reused = [i for i in [*claim.waits, *claim.found] if claim.origin[i] == ORIGIN_CODE["deduped"] and i not in refused]
        if reused:
            await asyncio.to_thread(journal.answered, [claim.keys[i] for i in reused], vectors[slots[reused]], 0)


@dataclass
class _Sending:
    """One `_send`: its pieces, where their answers go, and what they cost.
    (A class, not a closure calling itself: that would be a reference cycle
    holding the slice's vectors until the garbage collector next runs.)"""

    embedder: Embedder
    prepared: PreparedTexts
    claim: Claim
    picked: np.ndarray  # the pieces to send, in order
    counts: np.ndarray  # their tokens (exact, or a bound where `exact` is False)
    exact: np.ndarray
    last_piece: np.ndarray  # per piece of the slice: the last of its row
    vectors: np.ndarray
    slots: np.ndarray
    refused: dict[int, str | None]
    journal: Journal
    paid: int = 0
    from_usage: int = 0
    reported: int = 0

    async def request(self, a: int, b: int) -> None:
        """Send picked[a:b] as one request; a refused one is split until the refused pieces stand alone."""
        pieces = self.picked[a:b]
        tokens = int(self.counts[a:b].sum())
        texts = [self.prepared.pieces[i] for i in pieces]
        try:
            dispatcher = self.embedder.dispatcher
            if dispatcher is None:
                raise WorkLeftError(f"internal error: {len(texts)} text(s) of a part had no collected answer; "
                                    f"rerun to continue")
            with self.embedder.spend.holding(tokens) as paid:  # budget_usd: held before it is sent
                result = await dispatcher.embed(texts, tokens)
                # What the provider says it billed; else our count, exact.
                if result.usage_tokens is not None:
                    billed = result.usage_tokens
                    self.from_usage += billed
                elif self.exact[a:b].all():
                    billed = tokens
                else:
                    billed = int((await tokenizing(count_tokens, texts)).sum())
                paid.append(billed)
                dispatcher.billed(result.provider, billed)
        except BadInputError as err:
            if b - a == 1:
                code = err.code or (str(err.status) if err.status else None)
                key = self.claim.keys[pieces[0]]
                self.refused[int(pieces[0])] = code
                await asyncio.to_thread(self.journal.refused, key, code)
                self.embedder.reuse.refused(key, code)
            else:  # isolate the offending pieces; the others still get embedded
                mid = (a + b) // 2
                await asyncio.gather(self.request(a, mid), self.request(mid, b))
            return
        keys = [self.claim.keys[i] for i in pieces]
        await asyncio.to_thread(self.journal.answered, keys, result.vectors, billed)  # paid: kept before anything else
        self.vectors[self.slots[pieces]] = result.vectors
        self.paid += billed
        rows_finished = int(np.count_nonzero(self.last_piece[pieces]))
        self.reported += rows_finished
        self.embedder.on_progress(rows_finished, billed)
        await self.embedder.reuse.answered(keys, result.vectors)
