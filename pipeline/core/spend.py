"""The job's spend against `budget_usd`.

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

from ..errors import ConfigError, WorkLeftError
from .pricing import cost_usd


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
