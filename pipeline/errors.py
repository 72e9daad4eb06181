"""The exception tree, and the exit statuses the CLI maps it to.

Which class a provider failure is, is decided in one place
(providers/classify.py); retry, routing and reporting read the class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # for the annotation only: errors import nothing of the pipeline
    from .core.limits import KeyReading

EXIT_OK = 0
EXIT_WORK_LEFT = 1  # a rerun continues
EXIT_BAD_JOB = 2  # only a fix of the job file or inputs helps
# `run --no-wait`: nothing wrong, Batch API batches still running; run again later. Neither success nor
# failure: 99 is what Airflow's BashOperator treats as "skipped" (its skip_on_exit_code default).
EXIT_BATCHES_RUNNING = 99

FailureKind = Literal["transient", "rate_limited", "unusable", "bad_input", "bad_response"]


class PipelineError(Exception):
    """Root of every error the CLI reports as one line."""

    exit_code = EXIT_WORK_LEFT


class ConfigError(PipelineError):
    """The job file, an input or the environment is wrong (exit 2)."""

    exit_code = EXIT_BAD_JOB


class JobChangedError(ConfigError):
    """The output holds progress of a job that made different vectors."""


class RowPolicyError(ConfigError):
    """A row broke the job's `fail` policy (empty or too long)."""


class OutputLockedError(PipelineError):
    """Another live run holds the output directory."""


class WorkLeftError(PipelineError):
    """The run stopped with work left; a rerun continues it (exit 1)."""


class ProviderError(PipelineError):
    """A failed request, classified. `kind` decides what happens next."""

    kind: FailureKind = "transient"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        self.limits: KeyReading | None = None  # what the failed answer said of the key's rate limits

    def __str__(self) -> str:
        where = f"{self.provider}: " if self.provider else ""
        status = f"HTTP {self.status} " if self.status is not None else ""
        code = f"[{self.code}] " if self.code else ""
        return f"{where}{status}{code}{self.message}"


class TransientError(ProviderError):
    """Timeouts, dropped connections, 5xx: back off and retry anywhere."""

    kind = "transient"


class RateLimitedError(ProviderError):
    """429 and relay wordings of it: slow this provider down."""

    kind = "rate_limited"


class ProviderUnusableError(ProviderError):
    """Bad key, no such model, quota spent: stop sending to this provider."""

    kind = "unusable"


class EndpointMissingError(ProviderUnusableError):
    """404 without an error code: the URL serves nothing (a Batch API gateway
    without a synchronous /embeddings, or a wrong base_url)."""


class BadInputError(ProviderError):
    """The provider rejected the request's content (400): isolate the rows."""

    kind = "bad_input"


class TooManyInputsError(BadInputError):
    """A 400 saying the request holds more inputs than the provider takes
    (Gemini: 100, Cohere: 96): not the rows' fault. The provider learns its
    cap (`max_inputs`, when the message states it) and sends fewer."""

    def __init__(self, message: str, *, max_inputs: int | None = None, **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.max_inputs = max_inputs


class BadResponseError(ProviderError):
    """An answer we cannot trust (unparseable, wrong count, wrong length, NaN)."""

    kind = "bad_response"
