"""A budget of bytes held by work in flight, granted first come, first served.

Slices of units reserve what their vectors will take, in input order, before
they claim or send anything, and release it once written. Grants go strictly
in order, so the oldest slice always gets its bytes once older ones release
theirs: a slice waiting on another's answers never holds up the one it waits
for. One reservation larger than the whole budget is granted when nothing
else holds any.
"""
from __future__ import annotations

import asyncio
from collections import deque


class Reservation:
    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.nbytes = nbytes
        self._budget = budget
        self.granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released = False

    async def wait(self) -> None:
        await asyncio.shield(self.granted)

    def release(self) -> None:
        """Give the bytes back (or leave the queue, if not granted yet). Idempotent."""
        if self.released:
            return
        self.released = True
        self._budget._release(self)


class MemoryBudget:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError("capacity_bytes must be at least 1")
        self.capacity = capacity_bytes
        self.used = 0
        self._queue: deque[Reservation] = deque()

    def reserve(self, nbytes: int) -> Reservation:
        """Join the queue now (the order of calls is the order of grants); await `.wait()`."""
        reservation = Reservation(self, max(0, nbytes))
        self._queue.append(reservation)
        self._grant()
        return reservation

    def _release(self, reservation: Reservation) -> None:
        if reservation.granted.done():
            self.used -= reservation.nbytes
        else:
            self._queue.remove(reservation)
            reservation.granted.cancel()
        self._grant()

    def _grant(self) -> None:
        while self._queue and (self.used == 0 or self.used + self._queue[0].nbytes <= self.capacity):
            head = self._queue.popleft()
            self.used += head.nbytes
            head.granted.set_result(None)
