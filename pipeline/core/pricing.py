"""What a job's tokens cost, where the job does not say (list prices: models.py).

`estimate`, the closing summary and the budget check (spend.py) all price
tokens here, so the bill before a run, the stop at `budget_usd` and the bill
after it agree.
"""
from __future__ import annotations

from ..config.job import JobConfig
from .models import list_price

BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price (OpenAI's terms): the one place it is applied
BATCH_WINDOW_H = 24  # a batch's completion window: its results come within it, or it expires


def job_price(job: JobConfig) -> tuple[float | None, str | None]:
    """USD per million tokens for this job, and where that figure comes from:
    the provider the traffic goes to first, else the list price (halved for
    a batch provider)."""
    first = min(job.providers, key=lambda p: p.priority)
    if first.price_per_million_tokens is not None:
        return first.price_per_million_tokens, f"providers[{first.name}].price_per_million_tokens"
    if first.type == "local":
        return 0.0, "a local model: no per-token price"
    if first.type == "openai_batch":
        return batch_price(job)
    listed = list_price(job.embedding.model)
    return (listed, "assumed: OpenAI's list price") if listed is not None else (None, None)


def batch_price(job: JobConfig) -> tuple[float | None, str | None]:
    """What the job's tokens cost through OpenAI's Batch API: the batch
    provider's own price, else half the list price (None when unknown)."""
    batch = job.batch_provider
    if batch is not None and batch.price_per_million_tokens is not None:
        return batch.price_per_million_tokens, f"providers[{batch.name}].price_per_million_tokens"
    listed = list_price(job.embedding.model)
    if listed is None:
        return None, None
    return listed * BATCH_DISCOUNT, "assumed: half OpenAI's list price (Batch API)"


def cost_usd(tokens: int, price: float | None) -> float | None:
    return None if price is None else round(tokens / 1e6 * price, 8)
