"""Never pay twice for a text: in-run dedupe, the unit's journal and the
vector cache, in front of the providers.

Every piece (a row's final text, after template, truncation or chunking) has
a key by (model, dimensions, text). A slice claims its pieces before sending:
a key found among recent vectors, in its unit's journal (answers an earlier,
killed run paid for) or in the cache costs nothing, a key another slice is
sending right now is awaited, and only the rest is sent. Claims are taken on
the event loop without awaiting, so two slices never both send a key.
`plan_keys` sorts keys the same way for the run and for `estimate`.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Container, Literal, Mapping, Sequence, Union, get_args

import numpy as np

from ..cache.vectors import Cache, text_keys
from ..checkpoint.journal import JournalContents, Known

log = logging.getLogger("pipeline")

DEDUPE_MEMORY_BYTES = 32 * 2**20  # recent vectors kept for in-run dedupe; a named cache covers the rest
MAX_DEDUPE_ENTRIES = 50_000  # binds below ~150 dims only, where the keys' own overhead would dominate
CACHED_CHUNK_KEYS = 4096  # keys looked up at once by `cached`: its vectors are dropped as it goes
ENTRY_OVERHEAD_BYTES = 300  # per remembered vector besides its floats: dict entry, key bytes, slot int (measured: bench memory)

# Where a piece's vector came from. A row takes the first origin in this
# order that any of its pieces has: a row is "from a provider" if any piece
# was paid for (now, or by the run whose journal holds it).
Origin = Literal["provider", "journal", "deduped", "cache"]
ORIGINS: tuple[Origin, ...] = get_args(Origin)
ORIGIN_CODE = {origin: np.int8(i) for i, origin in enumerate(ORIGINS)}


@dataclass(frozen=True)
class Refused:
    """The provider refused this text (a 400 narrowed down to it)."""

    code: str | None


# A claimed key's outcome: its vector, a refusal, or None when the slice that
# claimed it stopped without an answer (the waiter then sends it itself).
Answer = Union[np.ndarray, Refused, None]


@dataclass
class _InFlight:
    """A key some slice is sending: who, and (made only once another slice asks) its answer."""

    owner: Claim
    answer: asyncio.Future[Answer] | None = None


def memory_entries(dim: int) -> int:
    """How many recent vectors in-run dedupe remembers for vectors of `dim` floats."""
    return max(1, min(MAX_DEDUPE_ENTRIES, DEDUPE_MEMORY_BYTES // (dim * 4 + ENTRY_OVERHEAD_BYTES)))


def first_pieces(keys: Sequence[bytes]) -> tuple[dict[bytes, int], np.ndarray]:
    """Each distinct key's first piece, and for every piece the first piece with its key."""
    first_of: dict[bytes, int] = {}
    first = np.fromiter((first_of.setdefault(k, i) for i, k in enumerate(keys)), dtype=np.int64, count=len(keys))
    return first_of, first


class RecentKeys:
    """The most recent `capacity` keys, each in a slot of a ring: adding a key
    takes the next slot and forgets the key that held it; a key added again
    moves to the newest slot. The run keeps vectors by slot; `estimate` keeps
    only the keys, and so dedupes exactly as the run does."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slot_of: dict[bytes, int] = {}
        self._key_in: list[bytes | None] = [None] * capacity
        self._next_slot = 0

    def slot(self, key: bytes) -> int | None:
        return self._slot_of.get(key)

    def add(self, key: bytes) -> int:
        old = self._slot_of.pop(key, None)
        if old is not None:
            self._key_in[old] = None
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.capacity
        evicted = self._key_in[slot]
        if evicted is not None:
            del self._slot_of[evicted]
        self._key_in[slot] = key
        self._slot_of[key] = slot
        return slot


@dataclass(frozen=True)
class KeyPlan:
    """Pure: what a list of piece keys needs before any store is asked."""

    first_of: dict[bytes, int]  # distinct key -> its first piece
    first: np.ndarray  # per piece: the first piece with its key
    recent: list[int]  # first pieces whose key is among the recent vectors
    in_flight: list[int]  # ... whose key another slice is sending now
    unknown: list[int]  # ... to look up (journal, cache), else to send


def plan_keys(keys: Sequence[bytes], recent: RecentKeys, in_flight: Container[bytes] = ()) -> KeyPlan:
    first_of, first = first_pieces(keys)
    known, waiting, unknown = [], [], []
    for key, i in first_of.items():
        if recent.slot(key) is not None:
            known.append(i)
        elif key in in_flight:
            waiting.append(i)
        else:
            unknown.append(i)
    return KeyPlan(first_of, first, known, waiting, unknown)


def origin_counts(has_vector: np.ndarray, row_origin: np.ndarray) -> dict[Origin, int]:
    """Rows with a vector, by origin (codes as ORIGIN_CODE)."""
    codes = np.bincount(row_origin[has_vector].astype(np.int64), minlength=len(ORIGINS))
    return {origin: int(codes[i]) for i, origin in enumerate(ORIGINS)}


@dataclass
class Claim:
    """One slice's pieces, sorted into what it must send and what it need not."""

    keys: list[bytes]  # per piece
    first: np.ndarray  # per piece: the slice's first piece with the same key
    send: list[int] = field(default_factory=list)  # first pieces this slice sends
    found: dict[int, np.ndarray] = field(default_factory=dict)  # first piece -> vector known now
    refused: dict[int, str | None] = field(default_factory=dict)  # first piece -> code, refused in an earlier run
    waits: dict[int, asyncio.Future[Answer]] = field(default_factory=dict)  # first piece -> another slice's answer
    owned: list[int] = field(default_factory=list)  # first pieces this slice answers for (sends, or found)
    origin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # per piece: ORIGIN_CODE


class Reuse:
    def __init__(self, model: str, dimensions: int | None, dim: int, cache: Cache | None,
                 options: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.dimensions = dimensions
        self.options = options  # the providers' vector options (JobConfig.vector_options): part of every key
        self.dim = dim
        self.cache = cache
        # Recent vectors in one ring of slots (no object per vector: RSS stays
        # flat, where a dict of arrays fragmented the heap as it churned).
        self._recent = RecentKeys(memory_entries(dim))
        self._ring = np.empty((self._recent.capacity, dim), dtype=np.float32)  # pages are touched as slots fill
        self._pending: dict[bytes, _InFlight] = {}
        self._cache_failed = False

    def keys(self, pieces: Sequence[str]) -> list[bytes]:
        return text_keys(pieces, self.model, self.dimensions, self.options)

    async def claim(self, keys: list[bytes], journal: Known | None = None) -> Claim:
        plan = plan_keys(keys, self._recent, self._pending)
        claim = Claim(keys=keys, first=plan.first, origin=np.full(len(keys), ORIGIN_CODE["deduped"], dtype=np.int8))
        loop = asyncio.get_running_loop()
        # Copied out before any is remembered again: remembering takes a slot, maybe one of these.
        recent = [(i, self._ring[self._recent.slot(keys[i])].copy()) for i in plan.recent]  # type: ignore[index]
        for i, vector in recent:
            claim.found[i] = vector
            self._remember(keys[i], vector)  # a hit is recent again
        for i in plan.in_flight:
            pending = self._pending[keys[i]]
            if pending.answer is None:  # the first slice to wait: most keys never get a future
                pending.answer = loop.create_future()
            claim.waits[i] = pending.answer
        lookup, recovered = [], []
        for i in plan.unknown:
            key = keys[i]
            self._pending[key] = _InFlight(claim)
            claim.owned.append(i)
            if journal is not None and key in journal:
                claim.found[i] = vector = journal.vector(key).astype(np.float32)  # a copy: the log may be unmapped
                claim.origin[i] = ORIGIN_CODE["journal" if journal.paid_earlier(key) else "provider"]
                self._settle(key, vector)
                if journal.paid_earlier(key):  # this run's batch answers were cached as they were collected
                    recovered.append(i)
            elif journal is not None and key in journal.refused:
                claim.refused[i] = journal.refused[key]
                claim.origin[i] = ORIGIN_CODE["provider"]
                self.refused(key, journal.refused[key])
            else:
                lookup.append(i)
        if recovered:  # paid for by a run killed before it could cache them
            await self.store([keys[i] for i in recovered], np.stack([claim.found[i] for i in recovered]))
        hits = await self._cache_get([keys[i] for i in lookup]) if lookup else {}
        for i in lookup:
            vector = hits.get(keys[i])
            if vector is None:
                claim.send.append(i)
                claim.origin[i] = ORIGIN_CODE["provider"]
            else:
                claim.found[i] = vector
                claim.origin[i] = ORIGIN_CODE["cache"]
                self._settle(keys[i], vector)
        # A repeat of a key takes its first piece's vector: from the cache if
        # that came from the cache, else it is a dedupe.
        repeats = plan.first != np.arange(len(keys))
        claim.origin[repeats] = np.where(claim.origin[plan.first[repeats]] == ORIGIN_CODE["cache"],
                                         ORIGIN_CODE["cache"], ORIGIN_CODE["deduped"])
        return claim

    async def answered(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Vectors just paid for: remembered, handed to waiting slices, and cached."""
        for key, vector in zip(keys, vectors):
            self._settle(key, vector)
        await self.store(keys, vectors)

    async def store(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Vectors paid for go to the cache at once (a batch's as it is collected, a journal's as it is read)."""
        if self.cache is not None and not self._cache_failed:
            try:
                await asyncio.to_thread(self.cache.put, keys, vectors)
            except (sqlite3.Error, OSError) as err:  # the run goes on; only later runs lose
                self._cache_failed = True
                log.warning("cache: cannot write to %s (%s); going on without storing vectors", self.cache.folder, err)

    def refused(self, key: bytes, code: str | None) -> None:
        self._answer(key, Refused(code))

    def release(self, claim: Claim) -> None:
        """A slice is done or stopped: what it claimed and never answered is
        released, so a waiting slice sends it itself."""
        for i in claim.owned:
            pending = self._pending.get(claim.keys[i])
            if pending is not None and pending.owner is claim:
                self._answer(claim.keys[i], None)

    def _remember(self, key: bytes, vector: np.ndarray) -> None:
        self._ring[self._recent.add(key)] = vector

    def _settle(self, key: bytes, vector: np.ndarray) -> None:
        self._remember(key, vector)
        pending = self._pending.get(key)
        if pending is not None:  # a copy for waiters: a view would keep the whole answer it came in alive
            self._answer(key, vector.copy() if pending.answer is not None else None)

    def _answer(self, key: bytes, answer: Answer) -> None:
        """The slice sending `key` is done with it: hand waiters the outcome."""
        pending = self._pending.pop(key, None)
        if pending is not None and pending.answer is not None and not pending.answer.done():
            pending.answer.set_result(answer)

    def remember(self, contents: JournalContents) -> None:
        """Answers kept elsewhere until now (a collected batch's, as its journal goes)
        stay among the recent vectors; the last ring's worth of them is enough."""
        for key in list(contents.offsets)[-self._recent.capacity:]:
            if self._recent.slot(key) is None:
                self._remember(key, contents.vector(key))

    def remembered(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """Copies of the recent vectors (in-run dedupe) of those of `keys` the ring holds."""
        return {key: self._ring[slot].copy() for key in keys if (slot := self._recent.slot(key)) is not None}

    async def cached(self, keys: list[bytes]) -> set[bytes]:
        """Which of `keys` the cache holds a vector of this job's length for (a batch
        run decides what to submit by it; the vectors are taken when the unit is written)."""
        found: set[bytes] = set()
        for i in range(0, len(keys), CACHED_CHUNK_KEYS):
            found.update(await self._cache_get(keys[i:i + CACHED_CHUNK_KEYS]))
        return found

    async def _cache_get(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        if self.cache is None or self._cache_failed:
            return {}
        try:
            return await asyncio.to_thread(self.cache.get, keys, self.dim)
        except (sqlite3.Error, OSError) as err:
            self._cache_failed = True
            log.warning("cache: cannot read %s (%s); going on without it", self.cache.folder, err)
            return {}
