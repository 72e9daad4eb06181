"""The synchronous strategy: a unit's texts go out as requests through the
dispatcher (routing, limits, retries), units in a bounded window.

Units are taken as they come, at most MAX_UNITS_IN_FLIGHT and
INPUT_WINDOW_BYTES of input at once; their slices reserve the bytes their
vectors take in the engine's budget, in input order, so the oldest slice
always gets its bytes first (units.py). Once the job's last slice has its
bytes, the largest requests left may go first (the last round).
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from ..core import probe
from ..errors import ProviderError, WorkLeftError
from ..inputs.sources import Unit
from ..inputs.texts import utf8_len
from ..providers import Provider, build_provider
from .dispatch import Dispatcher
from .inflight import MemoryBudget, Reservation
from .runner import Engine
from .units import UnitWork

log = logging.getLogger("pipeline")

MAX_UNITS_IN_FLIGHT = 16  # units open at once (each holds its input rows and an open part file)
INPUT_WINDOW_BYTES = 128 * 2**20  # ... and at most this much input among them (one unit always fits)


class RequestStrategy:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.job = engine.job
        self.providers: list[Provider] = [build_provider(cfg, self.job) for cfg in self.job.providers]
        shards = engine.opts.shard[1] if engine.opts.shard else 1
        self.dispatcher = Dispatcher(self.providers, self.job.retry, shards=shards)
        self.units: UnitWork | None = None
        self.window: asyncio.Semaphore | None = None
        self.inputs = MemoryBudget(INPUT_WINDOW_BYTES)
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_slice: Reservation | None = None
        self.last_round: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await asyncio.gather(*(p.start() for p in self.providers))
        dim = await self.engine.stop.abandonable(self._vector_space())
        self.dispatcher.dimensions = dim
        self.units = self.engine.unit_work(dim, self.dispatcher)
        self.window = asyncio.Semaphore(self._window(dim))

    async def _vector_space(self) -> int:
        """Probe every provider; keep those whose vectors agree with this
        output's (recorded by the run that started it, else the first
        provider's by priority). Returns the vectors' length."""
        routes = sorted(self.dispatcher.routes, key=lambda r: r.priority)
        texts = list(probe.PROBE_TEXTS)
        tokens = sum(utf8_len(t) for t in texts)  # a bound: no tokenizer loaded for it
        answers = await asyncio.gather(*(self.dispatcher.embed_on(r, texts, tokens) for r in routes),
                                       return_exceptions=True)
        answered = []
        for route, answer in zip(routes, answers):
            if isinstance(answer, ProviderError):
                self.dispatcher.mark_unusable(route, f"start-up probe failed: {answer.message or answer.kind}")
            elif isinstance(answer, BaseException):
                raise answer
            else:
                answered.append((route, answer.vectors))
        verdicts = await self.engine.settle_space([vectors for _, vectors in answered])
        for (route, _), why in zip(answered, verdicts):
            if why is not None:
                self.dispatcher.mark_unusable(route, why)
        agreeing = [vectors for (_, vectors), why in zip(answered, verdicts) if why is None]
        if not agreeing:
            raise WorkLeftError(self.dispatcher.no_provider_message())
        return int(agreeing[0].shape[1])

    def _window(self, dim: int) -> int:
        slots = sum(p.max_concurrency for p in self.job.providers)
        rows_in_flight = slots * self.job.request_limits(dim)[0]  # requests as sent, answers kept small
        return max(2, min(MAX_UNITS_IN_FLIGHT, math.ceil(rows_in_flight / self.job.output.rows_per_part) + 1))

    def wants(self, seq: int) -> bool:
        return True

    async def take(self, unit: Unit, end: int) -> None:
        assert self.window is not None and self.units is not None
        await self.window.acquire()
        held = self.inputs.reserve(unit.table.nbytes)
        try:
            await held.wait()
        except BaseException:
            held.release()
            self.window.release()
            raise
        if self.engine.stop.stopping:  # while it waited for room, the run stopped: nothing new starts
            held.release()
            self.window.release()
            return
        slices, reservations = self.units.reserve(end, self.engine.vectors)  # now, in input order
        self.last_slice = reservations[-1] if reservations else self.last_slice
        task = asyncio.create_task(self._unit(unit, slices, reservations))
        self.tasks.add(task)
        self.engine.stop.track(task)
        window = self.window
        task.add_done_callback(lambda t, held=held: (self.tasks.discard(t), held.release(), window.release()))

    async def after_last(self) -> None:
        if self.last_slice is not None:
            self.last_round = asyncio.create_task(self._largest_first_after(self.last_slice))

    async def _largest_first_after(self, last_slice: Reservation) -> None:
        """Once the job's last slice has its bytes (granted in order), every
        request left is made or being made: the largest may go first."""
        await last_slice.wait()
        self.dispatcher.last_requests_made()

    async def _unit(self, unit: Unit, slices: list[tuple[int, int]], reservations: list[Reservation]) -> None:
        assert self.units is not None
        try:
            await self.units.run(unit, slices, reservations)
        except (Exception, asyncio.CancelledError) as err:
            self.engine.stop.fail(self.engine.failure(err, f"in part {unit.seq}"))
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            for reservation in reservations:
                reservation.release()

    async def drain(self) -> None:
        try:
            if self.tasks:
                if self.engine.stop.stopping:
                    self.engine.stop.start_grace()
                await asyncio.wait(self.tasks)
        finally:
            if self.last_round is not None:
                self.last_round.cancel()  # its slice may never get its bytes (a failed unit lets them go unused)

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.providers), return_exceptions=True)

    def waiting(self) -> bool:
        return False  # requests are answered or failed within the run

    def report(self) -> dict[str, dict[str, Any]]:
        return self.dispatcher.provider_report()
