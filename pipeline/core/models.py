"""What is known of the models users name: list price and vector length.

One table, read where a job does not say: money.py prices tokens with it,
`estimate` sizes the run's memory of recent texts with the vector length
(reuse.memory_entries), the local provider checks `embedding.dimensions`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.job import JobConfig


@dataclass(frozen=True)
class Model:
    price_per_m_tokens: float | None  # USD per million input tokens, as published; None: not sold by the token
    dimensions: int  # the vectors' length when the job sets no `dimensions`


# OpenAI's list prices: an assumption for relays, which a provider's
# price_per_million_tokens overrides.
KNOWN = {
    "text-embedding-3-small": Model(0.02, 1536),
    "text-embedding-3-large": Model(0.13, 3072),
    "text-embedding-ada-002": Model(0.10, 1536),
}
LOCAL_MODEL = Model(None, 384)  # the bundled all-MiniLM-L6-v2 (providers/local.py)
DEFAULT_DIMENSIONS = 1536  # an unknown model's, for sizing memory only


def list_price(model: str) -> float | None:
    known = KNOWN.get(model)
    return known.price_per_m_tokens if known is not None else None


def known_dimensions(job: JobConfig) -> int | None:
    """The vectors' length before any request, where the job or this table says it."""
    if job.embedding.dimensions:
        return job.embedding.dimensions
    if min(job.providers, key=lambda p: p.priority).type == "local":
        return LOCAL_MODEL.dimensions
    known = KNOWN.get(job.embedding.model)
    return known.dimensions if known is not None else None


def expected_dimensions(job: JobConfig) -> int:
    """The vectors' length a run will find, before it asks: the job's, else the model's, else a guess."""
    return known_dimensions(job) or DEFAULT_DIMENSIONS
