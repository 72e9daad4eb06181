"""Money: what a job's tokens cost, and its spend against `budget_usd`.

Prices: where the job does not say, the list price of the model
(models.py). `estimate`, the closing summary and the budget check all price
tokens here, so the bill before a run, the stop at `budget_usd` and the bill
after it agree.

Spend is what the checkpoint records as paid (every run's committed parts),
plus what this run has paid since, plus what it holds in flight: requests
sent and not yet answered, batches submitted and not yet collected. Work is
held before it is sent, on the event loop, so concurrent requests never
overshoot together; work that would take the spend past the budget is never
sent: the run stops with `BudgetExceededError` (exit 1, checkpointed).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..config.job import JobConfig
from ..errors import ConfigError, WorkLeftError
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



class BudgetExceededError(WorkLeftError):
    """Sending more would pass the job's budget_usd."""


class Spend:
    def __init__(self, budget_usd: float | None, price: float | None, spent_tokens: int) -> None:
        if budget_usd is not None and price is None:
            raise ConfigError("budget_usd: this job's price is unknown: set the provider's price_per_million_tokens")
        self.budget_usd = budget_usd
        self.price = price or 0.0
        self.spent = spent_tokens  # paid: recorded by earlier runs, and by this one since
        self.held = 0  # in flight: sent or submitted, not answered yet

    def usd(self, tokens: int) -> float:
        return cost_usd(tokens, self.price) or 0.0

    def hold(self, tokens: int) -> None:
        """Take `tokens` in flight, or raise BudgetExceededError if they would pass the budget."""
        after = self.usd(self.spent + self.held + tokens)
        if self.budget_usd is not None and after > self.budget_usd:
            raise BudgetExceededError(
                f"budget_usd: sending {tokens:,} more tokens would take this job's spend to ${after:,.4f}, "
                f"past its budget of ${self.budget_usd:,.4f} (spent ${self.usd(self.spent):,.4f}, "
                f"${self.usd(self.held):,.4f} in flight); raise budget_usd and rerun to continue"
            )
        self.held += tokens

    def in_flight(self, tokens: int) -> None:
        """Work an earlier run submitted, still running: counted, never refused."""
        self.held += tokens

    def settle(self, held: int, paid: int) -> None:
        """`held` tokens came back: `paid` of them were answered (and billed)."""
        self.held -= held
        self.spent += paid

    @contextmanager
    def holding(self, tokens: int) -> Iterator[list[int]]:
        """Hold `tokens` for one request; append the tokens paid to the yielded
        list when it is answered (nothing appended: nothing paid)."""
        self.hold(tokens)
        paid: list[int] = []
        try:
            yield paid
        finally:
            self.settle(tokens, sum(paid))
