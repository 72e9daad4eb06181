"""Plain data: which units are tied to which batches, kept both ways in one place.

A batch job keeps two such relations (batch/strategy.py): the batches a unit
waits on, and the kept batches whose answers a unit takes. Each side is
asked (the units of a batch that closed; the batches of a unit that
committed), so both directions are stored, and only this class changes them.
"""
from __future__ import annotations

from typing import Iterable


class Links:
    def __init__(self) -> None:
        self._batches_of: dict[int, set[str]] = {}
        self._units_of: dict[str, set[int]] = {}

    def add(self, seq: int, subs: Iterable[str]) -> None:
        for sub in subs:
            self._batches_of.setdefault(seq, set()).add(sub)
            self._units_of.setdefault(sub, set()).add(seq)

    def batches_of(self, seq: int) -> frozenset[str]:
        return frozenset(self._batches_of.get(seq, ()))

    def units_of(self, sub: str) -> frozenset[int]:
        return frozenset(self._units_of.get(sub, ()))

    def drop_unit(self, seq: int) -> set[str]:
        """Untie the unit from every batch; returns those batches."""
        subs = self._batches_of.pop(seq, set())
        for sub in subs:
            self._untie(self._units_of, sub, seq)
        return subs

    def drop_batch(self, sub: str) -> set[int]:
        """Untie the batch from every unit; returns those units."""
        seqs = self._units_of.pop(sub, set())
        for seq in seqs:
            self._untie(self._batches_of, seq, sub)
        return seqs

    def __bool__(self) -> bool:
        return bool(self._batches_of)

    @staticmethod
    def _untie(side: dict, key: object, other: object) -> None:
        linked = side.get(key)
        if linked is not None:
            linked.discard(other)
            if not linked:
                del side[key]
