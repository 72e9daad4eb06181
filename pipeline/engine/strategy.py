"""The seam between the unit loop (runner.py) and how a unit's vectors are got.

The engine walks the units a writer owns, in input order, and hands each to
its strategy with the rows to take (the `--limit` cut applied). A strategy
gets the vectors of the unit's texts and has the unit written and committed
through `Engine.unit_work` (units.py: the part writer, journal and
checkpoint, one code for both):

- `requests.py`: synchronous requests through the dispatcher, units in a
  bounded window, as they come.
- `pipeline/batch/strategy.py`: the Files + Batches API; a unit waits on the
  batches its texts went into and is finished once they are collected.
"""
from __future__ import annotations

from typing import Any, Protocol

from ..inputs.sources import Unit


class Strategy(Protocol):
    async def open(self) -> None:
        """Start what the strategy talks to, check the vector space
        (`Engine.settle_space`), and take over what earlier runs left."""

    def wants(self, seq: int) -> bool:
        """Whether the walk should read an owned, uncommitted unit at all (a
        unit that cannot move before a batch finishes is not read again)."""

    async def take(self, unit: Unit, end: int) -> None:
        """Get the unit's first `end` rows embedded and committed, now or later."""

    async def after_last(self) -> None:
        """Every owned unit was taken (not called when the run stops early)."""

    async def drain(self) -> None:
        """Until the work taken is done, or, once the run is stopping, abandoned."""

    async def close(self) -> None:
        """Release what `open` started; called once, whatever happened."""

    def waiting(self) -> bool:
        """Work was left waiting on something outside the run (batches still
        running, `--no-wait`): the run returns with EXIT_BATCHES_RUNNING."""

    def report(self) -> dict[str, dict[str, Any]]:
        """Each provider's line of the closing summary (ProviderStats.to_json's schema)."""
