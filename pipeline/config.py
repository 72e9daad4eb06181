"""The job file: YAML -> frozen dataclasses that check themselves.

Every error names the key path (`providers[1].max_concurrency`) and what is
wrong, so a bad job fails at start, not at row three million.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

import yaml

from .errors import ConfigError

Format = Literal["auto", "parquet", "csv"]
TooLongPolicy = Literal["truncate", "chunk_mean", "skip", "fail"]
EmptyPolicy = Literal["skip", "fail"]
ProviderType = Literal["openai", "local"]

MAX_INPUTS_PER_REQUEST = 2048  # the OpenAI API's own limit
MAX_TOKENS_PER_INPUT = 8192  # the OpenAI API's own limit
DEFAULT_ROWS_PER_PART = 10_000  # one unit of work = one part file; also the resume granularity
ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # $$ writes a literal $
TEMPLATE_FIELD = re.compile(r"(?<!\{)\{([^{}!:]+)(?:![rsa])?(?::[^{}]*)?\}")  # {name}, {name:spec}; {{ is literal


@dataclass(frozen=True)
class StorageConfig:
    """How to reach an object store (`input.storage`, `output.storage`).
    Unset fields fall back to the AWS SDK's usual environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; default $AWS_ENDPOINT_URL
    region: str | None = None  # default $AWS_REGION, then $AWS_DEFAULT_REGION
    anonymous: bool = False  # public buckets: send no credentials
    access_key_id: str | None = field(default=None, repr=False)  # ${VAR} only; never printed
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("storage: give both access_key_id and secret_access_key, or neither")


STORAGE_SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")
FULL_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


@dataclass(frozen=True)
class InputConfig:
    paths: tuple[str, ...]  # absolute, as written (globs kept)
    text_column: str | None = None
    text_template: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    format: Format = "auto"
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        if (self.text_column is None) == (self.text_template is None):
            raise ConfigError("input: give exactly one of 'text_column' or 'text_template'")
        if self.text_template is not None and not self.template_columns:
            raise ConfigError("input.text_template: names no column; write columns as {name}")
        _check_choice("input.format", self.format, Format)

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
class OutputConfig:
    path: str
    vector_column: str = "embedding"
    rows_per_part: int = DEFAULT_ROWS_PER_PART
    id_column_name: str = "row_id"  # used when input.id_column is not set
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        _check_int("output.rows_per_part", self.rows_per_part, 1, 10_000_000)
        if not self.vector_column:
            raise ConfigError("output.vector_column: must not be empty")


@dataclass(frozen=True)
class EmbeddingConfig:
    model: str
    dimensions: int | None = None
    max_input_tokens: int = MAX_TOKENS_PER_INPUT
    too_long: TooLongPolicy = "truncate"
    empty: EmptyPolicy = "skip"

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("embedding.model: required")
        if self.dimensions is not None:
            _check_int("embedding.dimensions", self.dimensions, 1, 65_536)
        _check_int("embedding.max_input_tokens", self.max_input_tokens, 1, MAX_TOKENS_PER_INPUT)
        _check_choice("embedding.too_long", self.too_long, TooLongPolicy)
        _check_choice("embedding.empty", self.empty, EmptyPolicy)


@dataclass(frozen=True)
class BatchingConfig:
    max_inputs_per_request: int = MAX_INPUTS_PER_REQUEST
    max_tokens_per_request: int = 300_000

    def __post_init__(self) -> None:
        _check_int("batching.max_inputs_per_request", self.max_inputs_per_request, 1, MAX_INPUTS_PER_REQUEST)
        _check_int("batching.max_tokens_per_request", self.max_tokens_per_request, 1, 10**9)


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: ProviderType = "openai"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never printed
    model: str | None = None  # the provider's own id; defaults to embedding.model
    max_concurrency: int = 8
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    limits_per_shard: bool = False  # the key's RPM/TPM are each shard's own, not split among `--shard K/N` runs
    timeout_s: float = 60.0
    priority: int = 0
    max_inputs_per_request: int | None = None  # a provider may set lower limits than the job
    max_tokens_per_request: int | None = None
    device: str | None = None  # local only: "cpu", "cuda"; default: a GPU when present
    batch_size: int | None = None  # local only: rows per forward pass; default by device (providers/local.py)
    price_per_million_tokens: float | None = None  # USD, for `estimate`; default: OpenAI's list price

    def __post_init__(self) -> None:
        where = f"providers[{self.name}]"
        if not self.name:
            raise ConfigError("providers[]: every provider needs a 'name'")
        _check_choice(f"{where}.type", self.type, ProviderType)
        if self.type == "openai":
            if not self.base_url:
                raise ConfigError(f"{where}.base_url: required for an openai provider")
            if not re.match(r"^https?://[^/\s]+", self.base_url):
                raise ConfigError(f"{where}.base_url: {self.base_url!r} is not an http(s) URL")
        _check_int(f"{where}.max_concurrency", self.max_concurrency, 1, 1024)
        if self.price_per_million_tokens is not None:
            _check_number(f"{where}.price_per_million_tokens", self.price_per_million_tokens, 0, 10**6)
        for key in ("requests_per_minute", "tokens_per_minute", "max_inputs_per_request", "max_tokens_per_request"):
            value = getattr(self, key)
            if value is not None:
                _check_int(f"{where}.{key}", value, 1, 10**12)
        if not isinstance(self.limits_per_shard, bool):
            raise ConfigError(f"{where}.limits_per_shard: expected true or false, got {self.limits_per_shard!r}")
        _check_number(f"{where}.timeout_s", self.timeout_s, 0.001, 3600)
        _check_int(f"{where}.priority", self.priority, -10**6, 10**6)
        if self.batch_size is not None:
            _check_int(f"{where}.batch_size", self.batch_size, 1, 100_000)


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        _check_int("retry.max_attempts", self.max_attempts, 1, 1000)
        _check_number("retry.initial_backoff_s", self.initial_backoff_s, 0, 3600)
        _check_number("retry.max_backoff_s", self.max_backoff_s, 0, 86_400)


@dataclass(frozen=True)
class JobConfig:
    name: str
    job_path: Path
    input: InputConfig
    output: OutputConfig
    embedding: EmbeddingConfig
    providers: tuple[ProviderConfig, ...]
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    cache: str | None = None  # a local folder, or a URI (s3://bucket/prefix): segments.py
    cache_storage: StorageConfig = StorageConfig()  # `cache: {path: ..., storage: {...}}`
    env_missing: tuple[str, ...] = ()  # ${VAR}s that were unset (only when not required)

    def __post_init__(self) -> None:
        if not self.name or not re.match(r"^[\w.-]+$", self.name):
            raise ConfigError(f"name: {self.name!r} must be a non-empty word (letters, digits, . _ -)")
        if not self.providers:
            raise ConfigError("providers: at least one provider is required")
        names = [p.name for p in self.providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"providers: duplicate name {dupes[0]!r}")
        if self.embedding.max_input_tokens > self.batching.max_tokens_per_request:
            raise ConfigError("batching.max_tokens_per_request: must be at least embedding.max_input_tokens")
        vec = self.output.vector_column
        if vec in self.input.keep_columns or vec == self.input.id_column:
            raise ConfigError(f"output.vector_column: {vec!r} clashes with an input column kept in the output")

    @property
    def id_column_out(self) -> str:
        """The output's id column: the input's id column, else the row number's."""
        return self.input.id_column or self.output.id_column_name

    def request_limits(self) -> tuple[int, int]:
        """(inputs, tokens) per request: the job's budgets, lowered to the
        strictest provider's own, never below one input's worth of tokens."""
        max_inputs = min([self.batching.max_inputs_per_request]
                         + [p.max_inputs_per_request for p in self.providers if p.max_inputs_per_request])
        max_tokens = min([self.batching.max_tokens_per_request]
                         + [p.max_tokens_per_request for p in self.providers if p.max_tokens_per_request])
        return max_inputs, max(max_tokens, self.embedding.max_input_tokens)


SECTION_TYPES: dict[str, type] = {
    "input": InputConfig,
    "output": OutputConfig,
    "embedding": EmbeddingConfig,
    "batching": BatchingConfig,
    "retry": RetryConfig,
}
TOP_KEYS = ("name", "input", "output", "embedding", "batching", "providers", "retry", "cache")


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
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the job file must be a mapping of keys (name, input, output, ...)")
    _check_storage_secrets(raw)
    missing_env: list[tuple[str, str]] = []
    raw = _expand_env(raw, "", missing_env)
    if missing_env and require_env:
        var, key = missing_env[0]
        raise ConfigError(f"{path}: {key}: environment variable ${{{var}}} is not set")
    try:
        return _build_job(raw, job_path, tuple(var for var, _ in missing_env))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _build_job(raw: dict[str, Any], job_path: Path, env_missing: tuple[str, ...]) -> JobConfig:
    _reject_unknown(raw, TOP_KEYS, "")
    for key in ("name", "input", "output", "embedding", "providers"):
        if key not in raw or raw[key] is None:
            raise ConfigError(f"{key}: required")
    base = job_path.parent
    sections: dict[str, Any] = {}
    for key, cls in SECTION_TYPES.items():
        value = raw.get(key, {}) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping")
        sections[key] = value

    inp = dict(sections["input"])
    _reject_unknown(inp, ("path", "format", "text_column", "text_template", "id_column", "keep_columns", "storage"), "input")
    inp["storage"] = _storage(inp.get("storage"), "input.storage")
    paths = inp.pop("path", None)
    if paths is None:
        raise ConfigError("input.path: required")
    paths_list = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths_list, list) or not paths_list or not all(isinstance(p, str) and p for p in paths_list):
        raise ConfigError("input.path: must be a path, a glob or a list of them")
    keep = inp.pop("keep_columns", []) or []
    if isinstance(keep, str):
        keep = [keep]
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise ConfigError("input.keep_columns: must be a list of column names")
    input_cfg = _make(
        InputConfig,
        "input",
        dict(inp, paths=tuple(_resolve(base, p) for p in paths_list), keep_columns=tuple(dict.fromkeys(keep))),
    )

    out = dict(sections["output"])
    _reject_unknown(out, ("path", "vector_column", "rows_per_part", "id_column_name", "storage"), "output")
    out["storage"] = _storage(out.get("storage"), "output.storage")
    if not out.get("path") or not isinstance(out["path"], str):
        raise ConfigError("output.path: required")
    output_cfg = _make(OutputConfig, "output", dict(out, path=_resolve(base, out["path"])))

    emb = sections["embedding"]
    _reject_unknown(emb, [f.name for f in fields(EmbeddingConfig)], "embedding")
    embedding_cfg = _make(EmbeddingConfig, "embedding", emb)
    batching = sections["batching"]
    _reject_unknown(batching, [f.name for f in fields(BatchingConfig)], "batching")
    batching_cfg = _make(BatchingConfig, "batching", batching)
    retry = sections["retry"]
    _reject_unknown(retry, [f.name for f in fields(RetryConfig)], "retry")
    retry_cfg = _make(RetryConfig, "retry", retry)

    providers_raw = raw["providers"]
    if not isinstance(providers_raw, list) or not providers_raw:
        raise ConfigError("providers: must be a list of one or more providers")
    providers = []
    for i, prov in enumerate(providers_raw):
        where = f"providers[{i}]"
        if not isinstance(prov, dict):
            raise ConfigError(f"{where}: must be a mapping")
        _reject_unknown(prov, [f.name for f in fields(ProviderConfig)], where)
        prov = dict(prov)
        prov.setdefault("model", embedding_cfg.model)
        if prov.get("type", "openai") == "openai" and not prov.get("api_key"):
            raise ConfigError(f"{where}.api_key: required for an openai provider (write api_key: ${{ENV_VAR}})")
        try:
            providers.append(_make(ProviderConfig, where, prov))
        except ConfigError as err:
            raise ConfigError(str(err).replace(f"providers[{prov.get('name')}]", where)) from None

    cache, cache_storage = _cache(raw.get("cache"))
    return JobConfig(
        name=str(raw["name"]) if raw["name"] is not None else "",
        job_path=job_path,
        input=input_cfg,
        output=output_cfg,
        embedding=embedding_cfg,
        batching=batching_cfg,
        providers=tuple(providers),
        retry=retry_cfg,
        cache=_resolve(base, cache) if cache else None,
        cache_storage=cache_storage,
        env_missing=env_missing,
    )


def _cache(value: Any) -> tuple[str | None, StorageConfig]:
    """`cache: PATH_OR_URI`, or `cache: {path: URI, storage: {...}}` (as `output.storage`)."""
    if value is None or isinstance(value, str):
        return value or None, StorageConfig()
    if not isinstance(value, dict):
        raise ConfigError("cache: must be a path, a URI (s3://bucket/prefix) or a mapping with path and storage")
    _reject_unknown(value, ("path", "storage"), "cache")
    if not value.get("path") or not isinstance(value["path"], str):
        raise ConfigError("cache.path: required (a folder or a URI)")
    return value["path"], _storage(value.get("storage"), "cache.storage")


def _storage(value: Any, where: str) -> StorageConfig:
    if value is None:
        return StorageConfig()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping (endpoint_url, region, anonymous, ...)")
    _reject_unknown(value, [f.name for f in fields(StorageConfig)], where)
    if "anonymous" in value and not isinstance(value["anonymous"], bool):
        raise ConfigError(f"{where}.anonymous: expected true or false, got {value['anonymous']!r}")
    try:
        return _make(StorageConfig, where, value)
    except ConfigError as err:
        raise ConfigError(str(err).replace("storage:", f"{where}:")) from None


def _check_storage_secrets(raw: dict[str, Any]) -> None:
    """Storage secrets come from the environment, never the job file itself."""
    for section in ("input", "output", "cache"):
        storage = raw.get(section, {}).get("storage") if isinstance(raw.get(section), dict) else None
        if not isinstance(storage, dict):
            continue
        for key in STORAGE_SECRET_KEYS:
            value = storage.get(key)
            if value is not None and not (isinstance(value, str) and FULL_ENV_REF.fullmatch(value)):
                raise ConfigError(f"{section}.storage.{key}: write it as ${{ENV_VAR}}; secrets never go in the job file")


def _make(cls: type, where: str, values: Mapping[str, Any]) -> Any:
    """Build a dataclass, checking each value's type against its annotation."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{where}.{f.name}: required")
            continue
        value = values[f.name]
        kwargs[f.name] = _coerce(f"{where}.{f.name}", value, str(f.type))
    return cls(**kwargs)


def _coerce(where: str, value: Any, annotation: str) -> Any:
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    elif annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif annotation.startswith("str") or annotation in ("Format", "TooLongPolicy", "EmptyPolicy", "ProviderType"):
        if not isinstance(value, str):
            got = type(value).__name__ if where.endswith(".api_key") else repr(value)  # never echo a key
            raise ConfigError(f"{where}: expected text, got {got}")
    return value


def _reject_unknown(values: Mapping[str, Any], known: Any, where: str) -> None:
    known = list(known)
    for key in values:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{path}: unknown key{hint}")


def _check_int(where: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range ({low}..{high})")


def _check_number(where: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range ({low}..{high})")


def _check_choice(where: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _expand_env(value: Any, where: str, missing: list[tuple[str, str]]) -> Any:
    """Fill ${VAR} in every string; record unset ones as (VAR, key path)."""
    if isinstance(value, str):

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "$"
            if name not in os.environ:
                missing.append((name, where or "job"))
                return match.group(0)
            return os.environ[name]

        return ENV_REF.sub(fill, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]", missing) for i, v in enumerate(value)]
    return value


def _resolve(base: Path, path: str) -> str:
    """Paths are relative to the job file; URIs (s3://...) are kept as written."""
    if "://" in path:
        return path
    expanded = Path(os.path.expanduser(path))
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)
