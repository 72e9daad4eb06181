"""A unit of work, from its input rows to its committed part.

The unit is cut into slices (a row group each, about SLICE_BYTES of
vectors); every slice reserves its bytes in the run's budget when the unit is
taken (so slices are granted oldest first), claims and sends its pieces
(embedder.py), and is written as soon as the slices before it are. Then the
part is published and recorded (manifest.Checkpoint.commit), and the unit's
journal goes.
"""
from __future__ import annotations

import asyncio
from collections import Counter

import pyarrow as pa

from ..checkpoint import parts
from ..checkpoint.columns import VectorColumns
from ..checkpoint.journal import Journal, Known
from ..checkpoint.manifest import Checkpoint
from ..checkpoint.records import REJECT_REASONS, UnitRecord
from ..config.job import JobConfig
from ..inputs.sources import Unit
from ..inputs.texts import PreparedTexts, needs_exact_tokens, prepare, row_texts, tokenizing
from ..storage.output import Output
from .embedder import Embedded, Embedder
from .inflight import MemoryBudget, Reservation
from .progress import RunCounters
from .stopper import Stopper

SLICE_BYTES = 16 * 2**20  # a slice (a row group of its part) holds about this much of vectors


def slice_rows(dim: int, max_inputs: int, rows_per_part: int) -> int:
    """Rows a slice takes: about SLICE_BYTES of vectors (two full-size answers,
    config.MAX_ANSWER_BYTES each), never fewer than a request, never more than a part."""
    return max(1, min(rows_per_part, max(max_inputs, SLICE_BYTES // (4 * dim))))


class UnitWork:
    def __init__(self, job: JobConfig, output: Output, checkpoint: Checkpoint, embedder: Embedder,
                 stop: Stopper, counters: RunCounters) -> None:
        self.job = job
        self.output = output
        self.checkpoint = checkpoint
        self.embedder = embedder
        self.dim = embedder.dim
        self.stop = stop
        self.counters = counters  # this run's share of each unit it commits
        self._rows_per_slice = slice_rows(self.dim, job.request_limits(self.dim)[0], job.output.rows_per_part)
        self._exact = needs_exact_tokens(job)  # else a byte bound stands for most texts' tokens (texts.py)
        self.columns = VectorColumns(job, output, checkpoint.epoch, self.dim)  # every part's vector columns

    def reserve(self, end: int, budget: MemoryBudget) -> tuple[list[tuple[int, int]], list[Reservation]]:
        """A unit's first `end` rows as slices, each with its place in the budget's queue."""
        step = self._rows_per_slice
        slices = [(a, min(a + step, end)) for a in range(0, end, step)]
        return slices, [budget.reserve((b - a) * self.dim * 4) for a, b in slices]

    async def run(self, unit: Unit, slices: list[tuple[int, int]], reservations: list[Reservation],
                  known: Known | None = None) -> None:
        """Embed, write and commit the unit's rows up to the last slice's end.
        `known`: answers already paid for (default: the unit's own journal)."""
        end = slices[-1][1]
        earlier = self.checkpoint.partial(unit.seq)
        if earlier is not None and earlier.rows >= end:
            return  # a --limit run already took these rows
        journal = Journal(self.output, unit.seq, self.dim)
        if known is None:
            known = await asyncio.to_thread(journal.read)
            # paid by a killed run (a --limit run's record has counted its share): budget_usd counts it
            self.embedder.spend.settle(0, max(0, known.tokens_for(unit.seq) - (earlier.tokens if earlier else 0)))
        table = unit.table.slice(0, end)
        ids = parts.id_array(table, self.job, unit.row_offset)
        writer = parts.PartWriter(self.output, self.job, unit.seq, self.checkpoint.part_digits, self.dim,
                                  self.columns)
        tasks: list[asyncio.Future[Embedded] | None] = [
            asyncio.ensure_future(self._slice(table.slice(a, b - a), ids[a:b], held, journal, known))
            for (a, b), held in zip(slices, reservations)]
        try:
            totals = UnitTotals(tokens=known.tokens_for(unit.seq))
            for i, ((a, b), held) in enumerate(zip(slices, reservations)):
                task, tasks[i] = tasks[i], None  # a done task keeps its result: let the slice go once written
                assert task is not None
                embedded = await task
                del task
                await asyncio.to_thread(writer.write, table.slice(a, b - a), unit.row_offset + a, embedded.vectors,
                                        embedded.reasons, embedded.codes)
                totals.add(embedded)
                del embedded
                held.release()
            self.stop.committing()  # the end of the grace period lets a commit finish
            staged = await asyncio.to_thread(writer.finish)
            record = totals.record(unit.seq, end, complete=end == unit.table.num_rows)
            await asyncio.to_thread(self.checkpoint.commit, record, staged, writer.stale)
        except BaseException:
            live = [t for t in tasks if t is not None]
            for t in live:
                t.cancel()
            await asyncio.gather(*live, return_exceptions=True)
            writer.discard()
            raise
        if record.state == "committed":
            await asyncio.to_thread(journal.delete)
        self._count(record, earlier, totals)

    async def _slice(self, table: pa.Table, ids: pa.Array, held: Reservation, journal: Journal,
                     known: Known) -> Embedded:
        await held.wait()
        # Texts become Python strings only now, a slice at a time.
        prepared = await tokenizing(self._prepare, table, ids)
        return await self.embedder.embed(prepared, journal, known)

    def _prepare(self, table: pa.Table, ids: pa.Array) -> PreparedTexts:
        return prepare(row_texts(table, self.job.input), self.job.embedding, ids.to_pylist(), exact=self._exact)

    def _count(self, record: UnitRecord, earlier: UnitRecord | None, totals: UnitTotals) -> None:
        """This run's share of a unit: all of it, less what a --limit run recorded of it."""
        before = earlier or UnitRecord(record.seq, "partial", 0, 0, 0)
        c = self.counters
        c.rows_done += record.rows - before.rows
        c.rows_embedded += record.embedded - before.embedded
        c.rows_rejected.update({r: n - before.rejected.get(r, 0) for r, n in record.rejected.items()
                                if n > before.rejected.get(r, 0)})
        c.tokens += totals.paid
        c.tokens_reported += totals.reported
        paid_before = before.embedded - before.deduped - before.from_cache  # rows the journal gave back again
        c.rows_from.update(deduped=record.deduped - before.deduped, from_cache=record.from_cache - before.from_cache,
                           journal=max(0, totals.journal - paid_before))


class UnitTotals:
    """A unit's counters as its slices come in."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens  # paid for this unit: by earlier runs (its journal) and this one
        self.paid = 0  # by this run
        self.reported = 0  # of them, as the providers' usage said
        self.embedded = 0
        self.rejected: Counter[str] = Counter()
        self.origins: Counter[str] = Counter()

    @property
    def journal(self) -> int:
        return self.origins["journal"]

    def add(self, embedded: Embedded) -> None:
        self.tokens += embedded.tokens
        self.paid += embedded.tokens
        self.reported += embedded.tokens_reported
        self.embedded += sum(r is None for r in embedded.reasons)
        self.rejected.update(r for r in embedded.reasons if r is not None)
        self.origins.update(embedded.origins)

    def record(self, seq: int, rows: int, *, complete: bool) -> UnitRecord:
        return UnitRecord(
            seq, "committed" if complete else "partial", rows, self.embedded, self.tokens,
            deduped=self.origins["deduped"], from_cache=self.origins["cache"],
            **{f"rejected_{r}": self.rejected[r] for r in REJECT_REASONS},
        )
