"""How a run stops: signals, the grace period, and the first error.

SIGTERM or Ctrl-C stops new work and gives what is in flight `grace_s` to
finish; then what still waits on a provider is cancelled (a rerun redoes
it), while a unit already committing is left to finish (milliseconds). A
second signal ends the grace period at once. Whatever goes wrong first is
the error the run reports; later ones are consequences.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Coroutine, TypeVar

from ..errors import PipelineError, WorkLeftError

log = logging.getLogger("pipeline")
T = TypeVar("T")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopper:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.error: PipelineError | None = None
        self.stopping = False
        self.grace_over = False
        self._grace: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()  # cancelled when the grace period ends
        self._committing: set[asyncio.Task[Any]] = set()  # writing to disk: left to finish

    def fail(self, err: PipelineError) -> None:
        """Stop taking work; `err` is the run's error unless one came first."""
        self.error = self.error or err
        self.stopping = True

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)

    def track(self, task: asyncio.Task[Any]) -> None:
        """In-flight work: cancelled when the grace period ends, unless committing."""
        self._in_flight.add(task)
        task.add_done_callback(self._forget)

    def committing(self) -> None:
        """The current task now writes what it has: let it finish."""
        task = asyncio.current_task()
        if task is not None:
            self._committing.add(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._in_flight.discard(task)
        self._committing.discard(task)

    def start_grace(self) -> None:
        """From now, in-flight work has `grace_s` to finish."""
        if self._grace is None:
            self._grace = asyncio.get_running_loop().call_later(self.grace_s, self._end_grace)

    async def abandonable(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` as in-flight work: the end of the grace period cancels it."""
        task = asyncio.ensure_future(work)
        self.track(task)
        try:
            return await task
        except asyncio.CancelledError:
            if self.grace_over and task.cancelled():
                raise self.error or WorkLeftError("stopped; rerun to continue") from None
            raise

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._grace is not None:
            log.warning("second %s: stopping now", sig.name)
            self._grace.cancel()
            self._end_grace()
            return
        log.warning("%s: finishing in-flight work (up to %gs), then stopping", sig.name, self.grace_s)
        self.fail(WorkLeftError(f"interrupted by {sig.name}; rerun to continue"))
        self.start_grace()

    def _end_grace(self) -> None:
        self.grace_over = True
        waiting = [t for t in self._in_flight if not t.done() and t not in self._committing]
        if waiting:
            log.warning("stopping: abandoning %d part(s) still waiting on providers; a rerun redoes them", len(waiting))
        for task in waiting:
            task.cancel()
