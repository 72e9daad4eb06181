"""What every provider offers the dispatcher."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config.job import ProviderConfig
from ..core.limits import KeyReading
from ..errors import BadResponseError


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n_inputs, dim], C-contiguous
    usage_tokens: int | None  # what the provider says it billed, when it says
    limits: KeyReading | None = None  # what the answer said of the key's rate limits (x-ratelimit-*)
    provider: str | None = None  # the provider that answered (set by the dispatcher)


class Provider(Protocol):
    name: str
    config: ProviderConfig
    max_inputs: int | None  # the most inputs a request may hold, once the provider said so

    async def start(self) -> None: ...

    async def embed(self, texts: list[str]) -> EmbedResult: ...

    async def close(self) -> None: ...


def check_vectors(vectors: np.ndarray, n_inputs: int, dimensions: int | None, provider: str) -> None:
    """Refuse an answer before anything is written: one finite vector per input,
    one length for all, equal to `dimensions` when the job sets it."""
    if vectors.ndim != 2 or vectors.shape[0] != n_inputs:
        got = vectors.shape[0] if vectors.ndim >= 1 else 0
        raise BadResponseError(f"{got} vectors for {n_inputs} inputs", provider=provider)
    if vectors.shape[1] == 0:
        raise BadResponseError("empty vectors", provider=provider)
    if dimensions is not None and vectors.shape[1] != dimensions:
        raise BadResponseError(f"vectors of length {vectors.shape[1]}, expected {dimensions}", provider=provider)
    if not np.isfinite(vectors).all():
        raise BadResponseError("vector holds NaN or infinity", provider=provider)
