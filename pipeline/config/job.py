"""The job file: YAML -> frozen dataclasses that check themselves.

Every error names the key path (`providers[1].max_concurrency`) and what is
wrong, so a bad job fails at start, not at row three million. A key is a
dataclass field: its type hint and `setting(...)` (range, secret, path) are
all the generic reader and checks in schema.py need; `__post_init__` adds the
rules that tie fields together.

Over 400 lines: every key of the job file is here, in one place, as users read them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .extras import (
    RESERVED_BODY_KEYS,
    TRANSPORT_BODY_KEYS,
    Fields,
    as_fields,
    header_problem,
    read_body,
    read_text_fields,
)
from .schema import Invalid, Reader, check_fields, rules, setting, spec_of

Format = Literal["auto", "parquet", "csv"]
TooLongPolicy = Literal["truncate", "chunk_mean", "skip", "fail"]
EmptyPolicy = Literal["skip", "fail"]
ProviderType = Literal["openai", "local", "openai_batch"]
AuthScheme = Literal["bearer", "api-key", "none"]  # Authorization: Bearer KEY | api-key: KEY (Azure) | no key
AUTH_HEADERS: dict[str, str] = {"bearer": "authorization", "api-key": "api-key"}  # the header each scheme sets
VectorDtype = Literal["float32", "float16", "int8", "binary"]  # how a vector column is stored (core/quantize.py)

MAX_INPUTS_PER_REQUEST = 2048  # the OpenAI API's own limit
MAX_TOKENS_PER_INPUT = 8192  # the OpenAI API's own limit
# An answer is read and decoded whole: beyond this much of vectors a request is
# made smaller, so requests in flight fit the run's memory at any dimensions
# (tokens are what is paid, so smaller requests cost nothing more). 2 MiB keeps
# a request of real prose near 300,000 bytes, mostly within the token budget by
# its byte bound alone: larger ones cost ~40% more CPU in exact counts.
MAX_ANSWER_BYTES = 2 * 2**20
MAX_INPUTS_PER_BATCH = 50_000  # OpenAI's cap on embedding inputs across all requests of one batch
DEFAULT_ROWS_PER_PART = 10_000  # one unit of work = one part file; also the resume granularity
TEMPLATE_FIELD = re.compile(r"(?<!\{)\{([^{}!:]+)(?:![rsa])?(?::[^{}]*)?\}")  # {name}, {name:spec}; {{ is literal


@dataclass(frozen=True)
class StorageConfig:
    """How to reach an object store (`input.storage`, `output.storage`).
    Unset fields fall back to the AWS SDK's usual environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; default $AWS_ENDPOINT_URL
    region: str | None = None  # default $AWS_REGION, then $AWS_DEFAULT_REGION
    anonymous: bool = False  # public buckets: send no credentials
    access_key_id: str | None = setting(None, env_only=True)  # ${VAR} only; never printed
    secret_access_key: str | None = setting(None, env_only=True)
    session_token: str | None = setting(None, env_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise Invalid("", "give both access_key_id and secret_access_key, or neither")


STORAGE_SECRET_KEYS = tuple(f.name for f in fields(StorageConfig) if spec_of(f).env_only)


@dataclass(frozen=True)
class InputConfig:
    # `path:` in the file; made absolute, globs kept
    paths: tuple[str, ...] = field(metadata=rules(key="path", path=True, expect="a path, a glob or a list of them"))
    text_column: str | None = None
    text_template: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = setting((), expect="a list of column names")
    format: Format = "auto"
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.text_column is None) == (self.text_template is None):
            raise Invalid("", "give exactly one of 'text_column' or 'text_template'")
        if self.text_template is not None and not self.template_columns:
            raise Invalid("text_template", "names no column; write columns as {name}")

    @property
    def template_columns(self) -> tuple[str, ...]:
        if self.text_template is None:
            return ()
        return tuple(dict.fromkeys(TEMPLATE_FIELD.findall(self.text_template)))

    @property
    def text_columns(self) -> tuple[str, ...]:
        return (self.text_column,) if self.text_column else self.template_columns

    @property
    def read_columns(self) -> tuple[str, ...]:
        """Every column a unit needs, each once."""
        cols = [*self.text_columns, *([self.id_column] if self.id_column else []), *self.keep_columns]
        return tuple(dict.fromkeys(cols))


@dataclass(frozen=True)
class VectorColumnConfig:
    """One of `output.vectors`: a further column written from the same answer."""

    column: str
    dtype: VectorDtype = "float32"
    # a Matryoshka prefix: the first N components, renormalised to unit length before any cast
    dimensions: int | None = setting(None, low=1, high=65_536)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.column:
            raise Invalid("column", "required (the output column's name)")


@dataclass(frozen=True)
class OutputConfig:
    path: str = field(metadata=rules(path=True))
    vector_column: str = "embedding"
    vector_dtype: VectorDtype = "float32"
    vectors: tuple[VectorColumnConfig, ...] = setting((), expect="a list of {column, dtype, dimensions} mappings")
    rows_per_part: int = setting(DEFAULT_ROWS_PER_PART, low=1, high=10_000_000)
    id_column_name: str = "row_id"  # used when input.id_column is not set
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.path:
            raise Invalid("path", "required")
        if not self.vector_column:
            raise Invalid("vector_column", "must not be empty")
        seen = {self.vector_column}
        for i, column in enumerate(self.vectors):
            if column.column in seen:
                raise Invalid(f"vectors[{i}].column", f"{column.column!r} is used twice: every vector column needs its own name")
            seen.add(column.column)

    @property
    def columns(self) -> tuple[VectorColumnConfig, ...]:
        """Every vector column, `vector_column` first (full length, `vector_dtype`)."""
        return (VectorColumnConfig(self.vector_column, self.vector_dtype), *self.vectors)


@dataclass(frozen=True)
class EmbeddingConfig:
    model: str
    dimensions: int | None = setting(None, low=1, high=65_536)
    max_input_tokens: int = setting(MAX_TOKENS_PER_INPUT, low=1, high=MAX_TOKENS_PER_INPUT)
    too_long: TooLongPolicy = "truncate"
    empty: EmptyPolicy = "skip"

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise Invalid("model", "required")


@dataclass(frozen=True)
class BatchingConfig:
    max_inputs_per_request: int = setting(MAX_INPUTS_PER_REQUEST, low=1, high=MAX_INPUTS_PER_REQUEST)
    max_tokens_per_request: int = setting(300_000, low=1, high=10**9)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: ProviderType = "openai"
    base_url: str | None = None
    api_key: str | None = setting(None, secret=True)  # never printed
    model: str | None = None  # the provider's own id; load_job defaults it to embedding.model
    max_concurrency: int = setting(8, low=1, high=1024)
    requests_per_minute: int | None = setting(None, low=1, high=10**12)
    tokens_per_minute: int | None = setting(None, low=1, high=10**12)
    rate_window_s: float = setting(60.0, low=1, high=86_400)  # what the RPM/TPM figures (and the key's headers) count over
    limits_per_shard: bool = False  # the key's RPM/TPM are each shard's own, not split among `--shard K/N` runs
    timeout_s: float = setting(60.0, low=0.001, high=3600)
    priority: int = setting(0, low=-10**6, high=10**6)
    # a provider may set lower limits than the job
    max_inputs_per_request: int | None = setting(None, low=1, high=10**12)
    max_tokens_per_request: int | None = setting(None, low=1, high=10**12)
    device: str | None = None  # local only: "cpu", "cuda"; default: a GPU when present
    # local only: rows per forward pass; default by device (providers/local.py)
    batch_size: int | None = setting(None, low=1, high=100_000)
    # USD, for `estimate`; default: OpenAI's list price (half of it through the Batch API)
    price_per_million_tokens: float | None = setting(None, low=0, high=10**6)
    # openai_batch only (batch/strategy.py): inputs across one batch, how often a running one is checked,
    # the org's queue limit for the model, and whether to leave the files on the provider
    max_inputs_per_batch: int = setting(MAX_INPUTS_PER_BATCH, low=1, high=MAX_INPUTS_PER_BATCH)
    poll_interval_s: float = setting(60.0, low=0.01, high=86_400)
    enqueued_tokens_limit: int | None = setting(None, low=1, high=10**15)
    keep_files: bool = False
    # How the key travels, what else every request carries (providers/openai.py, batch_api.py).
    auth: AuthScheme = "bearer"
    headers: Fields = setting(Fields(), secret=True, custom=read_text_fields("headers"))  # values never printed
    query: Fields = setting(Fields(), secret=True, custom=read_text_fields("query"))  # added to every URL
    extra_body: Fields = setting(Fields(), custom=read_body)  # merged into every request body, batch lines too
    # local only: prepended to every text (E5's "passage: "), and unit length (the model's own output when false)
    text_prefix: str = ""
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("headers", "query", "extra_body"):  # a config built by hand may give plain dicts
            object.__setattr__(self, name, as_fields(getattr(self, name)))
        check_fields(self)
        if not self.name:
            raise Invalid("", "every provider needs a 'name'")
        if self.type in ("openai", "openai_batch"):
            if not self.api_key and self.auth != "none":
                raise Invalid("api_key", f"required for an {self.type} provider (write api_key: ${{ENV_VAR}})")
            if not self.base_url:
                raise Invalid("base_url", f"required for an {self.type} provider")
            if not re.match(r"^https?://[^/\s]+", self.base_url):
                raise Invalid("base_url", f"{self.base_url!r} is not an http(s) URL")
            if "?" in self.base_url or "#" in self.base_url:
                raise Invalid("base_url", "ends at the path; put URL parameters under 'query:' (e.g. api-version)")
            self._check_extras()
        else:
            for key in ("headers", "query", "extra_body"):
                if getattr(self, key):
                    raise Invalid(key, "a local provider sends no request")
        if self.type != "local":
            if self.text_prefix:
                raise Invalid("text_prefix", "only a local provider takes it (a remote one gets the texts as they are)")
            if not self.normalize:
                raise Invalid("normalize", "only a local provider takes it")

    def _check_extras(self) -> None:
        own = AUTH_HEADERS.get(self.auth)
        for name, value in self.headers.items():
            problem = header_problem(name, str(value))
            if problem:
                raise Invalid(f"headers.{name}", problem)
            if own is not None and name.lower() == own:
                raise Invalid(f"headers.{name}", f"auth: {self.auth} sets it from api_key; "
                                                 "write auth: none to send your own")
        reserved = sorted(RESERVED_BODY_KEYS & set(self.extra_body))
        if reserved:
            raise Invalid(f"extra_body.{reserved[0]}", "is the job's own (embedding.model, embedding.dimensions, "
                                                       "the texts); extra_body adds other fields")
        encoding = self.extra_body.get("encoding_format", "base64")
        if encoding not in ("base64", "float"):
            raise Invalid("extra_body.encoding_format", f"{encoding!r} is not one of base64, float")

    @property
    def vector_options(self) -> dict[str, Any]:
        """What in this provider changes the vectors beyond the model and the
        dimensions: part of the cache key and of the output's fingerprint."""
        out: dict[str, Any] = {}
        body = {k: v for k, v in self.extra_body.items() if k not in TRANSPORT_BODY_KEYS}
        if body:
            out["extra_body"] = body
        if self.text_prefix:
            out["text_prefix"] = self.text_prefix
        if not self.normalize:
            out["normalize"] = False
        return out


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = setting(6, low=1, high=1000)
    initial_backoff_s: float = setting(0.5, low=0, high=3600)
    max_backoff_s: float = setting(60.0, low=0, high=86_400)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CacheConfig:
    """`cache:` written as a mapping; JobConfig keeps it as `cache` and `cache_storage`."""

    path: str = field(metadata=rules(path=True, expect="a folder or a URI"))
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.path:
            raise Invalid("path", "required (a folder or a URI)")


def _read_cache(value: Any, reader: Reader) -> dict[str, Any]:
    """`cache: PATH_OR_URI`, or `cache: {path: URI, storage: {...}}` (as `output.storage`)."""
    if value is None or isinstance(value, str):
        path = reader.text(value, path=True) if value else None
        return {"cache": path or None}
    if not isinstance(value, dict):
        raise Invalid("", "must be a path, a URI (s3://bucket/prefix) or a mapping with path and storage")
    ref = reader.build(CacheConfig, value)
    return {"cache": ref.path, "cache_storage": ref.storage}


@dataclass(frozen=True)
class JobConfig:
    name: str
    job_path: Path = field(metadata=rules(in_file=False))
    input: InputConfig
    output: OutputConfig
    embedding: EmbeddingConfig
    providers: tuple[ProviderConfig, ...] = field(metadata=rules(expect="a list of one or more providers"))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    cache: str | None = setting(None, custom=_read_cache)  # a local folder, or a URI (s3://bucket/prefix): cache/segments.py
    cache_storage: StorageConfig = setting(StorageConfig(), in_file=False)  # `cache: {path: ..., storage: {...}}`
    env_missing: tuple[str, ...] = setting((), in_file=False)  # ${VAR}s that were unset (only when not required)
    budget_usd: float | None = setting(None, low=0, high=10**9)  # stop before the job's spend would pass it

    def __post_init__(self) -> None:
        check_fields(self)
        if not re.match(r"^[\w.-]+$", self.name):
            raise Invalid("name", f"{self.name!r} must be a non-empty word (letters, digits, . _ -)")
        names = [p.name for p in self.providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise Invalid("providers", f"duplicate name {dupes[0]!r}")
        if self.embedding.max_input_tokens > self.batching.max_tokens_per_request:
            raise Invalid("batching.max_tokens_per_request", "must be at least embedding.max_input_tokens")
        for i, column in enumerate(self.output.columns):
            vec = column.column
            if vec in self.input.keep_columns or vec == self.id_column_out:
                key = "output.vector_column" if i == 0 else f"output.vectors[{i - 1}].column"
                raise Invalid(key, f"{vec!r} clashes with an input column kept in the output")
        dims = self.embedding.dimensions
        for i, column in enumerate(self.output.vectors):
            if dims is not None and column.dimensions is not None and column.dimensions > dims:
                raise Invalid(f"output.vectors[{i}].dimensions", f"{column.dimensions} is more than embedding.dimensions ({dims})")
            if column.dtype == "binary" and column.dimensions is not None and column.dimensions != dims:
                raise Invalid(f"output.vectors[{i}].dimensions",
                              "a binary column is the sign of every component of the model's vector: drop `dimensions` "
                              "(its first N bits are the first N/8 bytes)")
        first = self.providers[0].vector_options
        for i, p in enumerate(self.providers[1:], start=1):
            if p.vector_options != first:
                raise Invalid(f"providers[{i}]", f"its extra_body, text_prefix or normalize differ from "
                                                 f"{self.providers[0].name}'s: the providers of a job make one "
                                                 f"vector space")
        batch = self.batch_provider
        if batch is not None and len(self.providers) > 1:
            raise Invalid("providers", f"an openai_batch provider ({batch.name}) runs alone: make it the job's only provider")
        if batch is not None and batch.enqueued_tokens_limit is not None \
                and batch.enqueued_tokens_limit < self.embedding.max_input_tokens:
            raise Invalid("providers[0].enqueued_tokens_limit", "must be at least embedding.max_input_tokens (one text)")

    @property
    def vector_options(self) -> dict[str, Any]:
        """What the providers change in the vectors beyond model and dimensions (the same for all)."""
        return self.providers[0].vector_options if self.providers else {}

    @property
    def batch_provider(self) -> ProviderConfig | None:
        """The provider that goes through the Files + Batches API, if this job has one (batch/strategy.py)."""
        return next((p for p in self.providers if p.type == "openai_batch"), None)

    @property
    def id_column_out(self) -> str:
        """The output's id column: the input's id column, else the row number's."""
        return self.input.id_column or self.output.id_column_name

    def request_limits(self, dim: int | None = None) -> tuple[int, int]:
        """(inputs, tokens) per request: the job's budgets, lowered to the
        strictest provider's own, never below one input's worth of tokens.
        With the vectors' length `dim`, an answer is also kept to about
        MAX_ANSWER_BYTES of vectors (341 inputs at 1,536 dimensions, 170 at 3,072)."""
        max_inputs = min([self.batching.max_inputs_per_request]
                         + [p.max_inputs_per_request for p in self.providers if p.max_inputs_per_request]
                         + ([max(1, MAX_ANSWER_BYTES // (4 * dim))] if dim else []))
        max_tokens = min([self.batching.max_tokens_per_request]
                         + [p.max_tokens_per_request for p in self.providers if p.max_tokens_per_request])
        return max_inputs, max(max_tokens, self.embedding.max_input_tokens)


def load_job(path: str | os.PathLike[str], *, require_env: bool = True) -> JobConfig:
    """Read and check a job file. Unset ${VAR}s are an error unless
    `require_env` is False (for `status`, which never calls a provider)."""
    job_path = Path(path).resolve()
    try:
        text = job_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read job file ({err})") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError):  # a number past Python's digit limit; nesting past the stack
        raise ConfigError(f"{path}: not valid YAML: a value too long or nested too deep to read") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the job file must be a mapping of keys (name, input, output, ...)")
    reader = Reader(job_path.parent, require_env)
    try:
        values = reader.values(JobConfig, raw)
        model = values["embedding"].model  # a provider's model defaults to the job's
        values["providers"] = tuple(_local_model_path(p if p.model else replace(p, model=model), job_path.parent)
                                    for p in values["providers"])
        return JobConfig(**values, job_path=job_path, env_missing=tuple(reader.missing))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _local_model_path(p: ProviderConfig, base: Path) -> ProviderConfig:
    """A local provider's `model:` written as a path is relative to the job
    file; anything else (the bundled model's name, a Hugging Face id) stays."""
    if p.type != "local" or not p.model:
        return p
    written = os.path.expanduser(p.model)
    local = written.startswith((".", "/", "~")) or os.path.isabs(written) or (base / written).is_dir()
    return replace(p, model=os.path.normpath(base / written)) if local else p
