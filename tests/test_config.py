"""The job file: what a user writes, what load_job makes of it, and the one-line
errors that name the key path when it is wrong."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config.job import STORAGE_SECRET_KEYS, load_job
from pipeline.errors import ConfigError

KEY_VAR = "CFG_TEST_RELAY_KEY"
SECRET = "sk-cfgtest-9f8e7d6c5b4a-SECRET"
DELETE = object()  # marks a key to remove in `job_with`

MINIMAL: dict[str, Any] = {
    "name": "product-docs",
    "input": {"path": "data/docs.parquet", "text_column": "body"},
    "output": {"path": "out/product-docs"},
    "embedding": {"model": "text-embedding-3-small"},
    "providers": [{"name": "relay-a", "base_url": "https://relay-a.example/v1", "api_key": "${" + KEY_VAR + "}"}],
}
TWO_PROVIDERS: dict[str, Any] = {
    **MINIMAL,
    "providers": [
        MINIMAL["providers"][0],
        {"name": "relay-b", "base_url": "https://relay-b.example/v1", "api_key": "${" + KEY_VAR + "}"},
    ],
}


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with DELETE, remove) a key given as 'providers[1].api_key'."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = doc
    for part in parts[:-1]:
        node = node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


def job_with(base: dict[str, Any] = MINIMAL, **changes: Any) -> dict[str, Any]:
    """A copy of `base` with changes keyed by path ('__' stands for '.')."""
    doc = copy.deepcopy(base)
    for key, value in changes.items():
        set_path(doc, key.replace("__", "."), value)
    return doc


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def relay_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)


def load_error(tmp_path: Path, doc: dict[str, Any] | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, doc))
    message = str(info.value)
    assert "\n" not in message, "errors are one readable line"
    return message


# ---------------------------------------------------------------------------
# A valid job and its defaults


def test_minimal_job_loads_with_the_contract_defaults(tmp_path):
    job = load_job(write(tmp_path, MINIMAL))

    assert job.name == "product-docs"
    assert job.input.text_column == "body"
    assert job.input.text_template is None
    assert job.input.format == "auto"
    assert job.input.id_column is None
    assert job.input.keep_columns == ()
    assert job.output.vector_column == "embedding"
    assert job.embedding.model == "text-embedding-3-small"
    assert job.embedding.dimensions is None
    assert job.embedding.max_input_tokens == 8192
    assert job.embedding.too_long == "truncate"
    assert job.embedding.empty == "skip"
    assert job.batching.max_inputs_per_request == 2048
    assert (job.retry.max_attempts, job.retry.initial_backoff_s, job.retry.max_backoff_s) == (6, 0.5, 60.0)
    assert job.cache is None
    assert job.env_missing == ()
    (provider,) = job.providers
    assert provider.name == "relay-a"
    assert provider.type == "openai"
    assert provider.model == "text-embedding-3-small"  # defaults to embedding.model
    assert provider.api_key == SECRET
    assert provider.max_concurrency == 8
    assert provider.timeout_s == 60.0
    assert provider.priority == 0


def test_full_contract_example_job_loads_with_every_value_kept(tmp_path):
    doc = job_with(
        input={
            "path": ["a/*.parquet", "b.csv"],
            "format": "parquet",
            "text_template": "{title}\n\n{body}",
            "id_column": "doc_id",
            "keep_columns": ["doc_id", "title"],
        },
        output={"path": "out/x", "vector_column": "vec"},
        embedding={"model": "m", "dimensions": 512, "max_input_tokens": 1000, "too_long": "chunk_mean", "empty": "fail"},
        batching={"max_inputs_per_request": 100, "max_tokens_per_request": 5000},
        retry={"max_attempts": 3, "initial_backoff_s": 1, "max_backoff_s": 10},
        cache=".cache/vectors",
        providers=[
            {
                "name": "relay-a",
                "base_url": "https://relay-a.example/v1",
                "api_key": "${" + KEY_VAR + "}",
                "model": "relay-own-id",
                "max_concurrency": 3,
                "requests_per_minute": 3000,
                "tokens_per_minute": 1_000_000,
                "timeout_s": 12.5,
                "priority": 1,
            },
            {"name": "local", "type": "local"},
        ],
    )
    job = load_job(write(tmp_path, doc))
    assert job.input.text_template == "{title}\n\n{body}"
    assert job.input.template_columns == ("title", "body")
    assert job.input.keep_columns == ("doc_id", "title")
    assert job.output.vector_column == "vec"
    assert (job.embedding.dimensions, job.embedding.max_input_tokens) == (512, 1000)
    assert (job.embedding.too_long, job.embedding.empty) == ("chunk_mean", "fail")
    assert (job.batching.max_inputs_per_request, job.batching.max_tokens_per_request) == (100, 5000)
    assert (job.retry.max_attempts, job.retry.initial_backoff_s, job.retry.max_backoff_s) == (3, 1.0, 10.0)
    relay, local = job.providers
    assert relay.model == "relay-own-id"
    assert (relay.max_concurrency, relay.requests_per_minute, relay.tokens_per_minute) == (3, 3000, 1_000_000)
    assert (relay.timeout_s, relay.priority) == (12.5, 1)
    assert local.type == "local"
    assert local.model == "m"
    assert local.api_key is None


def test_paths_are_relative_to_the_job_files_folder_not_the_working_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    doc = job_with(
        input__path=["../data/*.parquet", "more/extra.csv"],
        output__path="../out/docs",
        cache=".cache/vectors",
    )
    job = load_job(write(tmp_path, doc, "jobs/job.yaml"))
    root = tmp_path.resolve()
    assert job.input.paths == (str(root / "data" / "*.parquet"), str(root / "jobs" / "more" / "extra.csv"))
    assert job.output.path == str(root / "out" / "docs")
    assert job.cache == str(root / "jobs" / ".cache" / "vectors")
    assert job.job_path == root / "jobs" / "job.yaml"


def test_absolute_paths_and_uris_are_kept_as_written(tmp_path):
    absolute = str(tmp_path.resolve() / "abs" / "docs.parquet")
    job = load_job(write(tmp_path, job_with(input__path=[absolute, "s3://bucket/docs/*.parquet"]), "jobs/job.yaml"))
    assert job.input.paths == (absolute, "s3://bucket/docs/*.parquet")


# ---------------------------------------------------------------------------
# ${VAR}


def test_env_vars_fill_any_string_value(tmp_path, monkeypatch):
    monkeypatch.setenv("CFG_TEST_HOST", "relay.internal:8443")
    monkeypatch.setenv("CFG_TEST_MODEL", "bge-m3")
    doc = job_with(providers__0__base_url="https://${CFG_TEST_HOST}/v1", embedding__model="${CFG_TEST_MODEL}")
    job = load_job(write(tmp_path, doc))
    assert job.providers[0].base_url == "https://relay.internal:8443/v1"
    assert job.providers[0].api_key == SECRET
    assert job.embedding.model == "bge-m3"
    assert job.providers[0].model == "bge-m3"


def test_an_unset_env_var_is_an_error_naming_the_var_and_the_key_path(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VAR)
    message = load_error(tmp_path, TWO_PROVIDERS)
    assert KEY_VAR in message
    assert "providers[0].api_key" in message
    assert "not set" in message


def test_require_env_false_keeps_a_job_with_unset_vars_loadable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VAR)
    job = load_job(write(tmp_path, TWO_PROVIDERS), require_env=False)
    assert KEY_VAR in job.env_missing
    assert [p.name for p in job.providers] == ["relay-a", "relay-b"]


def test_an_env_var_set_to_the_empty_string_counts_as_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CFG_TEST_SUFFIX", "")
    job = load_job(write(tmp_path, job_with(name="docs${CFG_TEST_SUFFIX}")))
    assert job.name == "docs"


# ---------------------------------------------------------------------------
# Unknown keys

UNKNOWN_KEY_TABLE = [
    # id, changes, key path in the message, suggestion
    ("top level", {"provider": []}, "provider", "providers"),
    ("top level retries", {"retries": {"max_attempts": 3}}, "retries", "retry"),
    ("input", {"input__text_colum": "body"}, "input.text_colum", "text_column"),
    ("output", {"output__vector_col": "v"}, "output.vector_col", "vector_column"),
    ("embedding", {"embedding__dimension": 512}, "embedding.dimension", "dimensions"),
    ("batching", {"batching": {"max_input_per_request": 10}}, "batching.max_input_per_request", "max_inputs_per_request"),
    ("retry", {"retry": {"max_attempt": 3}}, "retry.max_attempt", "max_attempts"),
    ("second provider", {"providers__1__api_kye": "x"}, "providers[1].api_kye", "api_key"),
    ("second provider concurrency", {"providers__1__max_concurency": 2}, "providers[1].max_concurency", "max_concurrency"),
    ("storage", {"output__storage": {"endpoint": "http://127.0.0.1:9000"}}, "output.storage.endpoint", "endpoint_url"),
    ("cache mapping", {"cache": {"path": "s3://b/c", "stor": {}}}, "cache.stor", "storage"),
    ("cache storage", {"cache": {"path": "s3://b/c", "storage": {"regoin": "x"}}}, "cache.storage.regoin", "region"),
]


@pytest.mark.parametrize(
    "changes, key_path, suggestion",
    [row[1:] for row in UNKNOWN_KEY_TABLE],
    ids=[row[0] for row in UNKNOWN_KEY_TABLE],
)
def test_an_unknown_key_is_named_with_the_closest_known_key(tmp_path, changes, key_path, suggestion):
    message = load_error(tmp_path, job_with(TWO_PROVIDERS, **changes))
    assert f"{key_path}:" in message
    assert f"did you mean '{suggestion}'" in message


def test_an_unknown_key_with_no_close_match_lists_the_known_keys(tmp_path):
    message = load_error(tmp_path, job_with(input__zzzzzz=1))
    assert "input.zzzzzz" in message
    assert "text_column" in message and "text_template" in message


# ---------------------------------------------------------------------------
# Wrong types and out-of-range values

BAD_VALUE_TABLE = [
    # id, changes, key path the message must name
    ("concurrency as a word", {"providers__0__max_concurrency": "eight"}, "providers[0].max_concurrency"),
    ("concurrency as a float", {"providers__0__max_concurrency": 2.5}, "providers[0].max_concurrency"),
    ("concurrency as a bool", {"providers__0__max_concurrency": True}, "providers[0].max_concurrency"),
    ("concurrency 0", {"providers__0__max_concurrency": 0}, "providers[0].max_concurrency"),
    ("concurrency negative", {"providers__0__max_concurrency": -1}, "providers[0].max_concurrency"),
    ("second provider concurrency 0", {"providers__1__max_concurrency": 0}, "providers[1].max_concurrency"),
    ("timeout as text", {"providers__0__timeout_s": "60s"}, "providers[0].timeout_s"),
    ("timeout 0", {"providers__0__timeout_s": 0}, "providers[0].timeout_s"),
    ("timeout nan", {"providers__0__timeout_s": float("nan")}, "providers[0].timeout_s"),
    ("timeout inf", {"providers__0__timeout_s": float("inf")}, "providers[0].timeout_s"),
    ("rpm 0", {"providers__0__requests_per_minute": 0}, "providers[0].requests_per_minute"),
    ("tpm negative", {"providers__1__tokens_per_minute": -100}, "providers[1].tokens_per_minute"),
    ("priority huge", {"providers__0__priority": 10**12}, "providers[0].priority"),
    ("unknown provider type", {"providers__0__type": "azure"}, "providers[0].type"),
    ("base_url not http", {"providers__0__base_url": "relay-a.example/v1"}, "providers[0].base_url"),
    ("api_key as a number", {"providers__0__api_key": 12345}, "providers[0].api_key"),
    ("dimensions 0", {"embedding__dimensions": 0}, "embedding.dimensions"),
    ("dimensions as text", {"embedding__dimensions": "512"}, "embedding.dimensions"),
    ("max_input_tokens 0", {"embedding__max_input_tokens": 0}, "embedding.max_input_tokens"),
    ("max_input_tokens over the API limit", {"embedding__max_input_tokens": 8193}, "embedding.max_input_tokens"),
    ("too_long unknown", {"embedding__too_long": "average"}, "embedding.too_long"),
    ("empty unknown", {"embedding__empty": "zero"}, "embedding.empty"),
    ("2048 + 1 inputs a request", {"batching": {"max_inputs_per_request": 2049}}, "batching.max_inputs_per_request"),
    ("0 inputs a request", {"batching": {"max_inputs_per_request": 0}}, "batching.max_inputs_per_request"),
    (
        "token budget below one input",
        {"batching": {"max_tokens_per_request": 1000}},
        "batching.max_tokens_per_request",
    ),
    ("max_attempts 0", {"retry": {"max_attempts": 0}}, "retry.max_attempts"),
    ("max_attempts as text", {"retry": {"max_attempts": "six"}}, "retry.max_attempts"),
    ("initial backoff negative", {"retry": {"initial_backoff_s": -1}}, "retry.initial_backoff_s"),
    ("max backoff inf", {"retry": {"max_backoff_s": float("inf")}}, "retry.max_backoff_s"),
    ("max backoff nan", {"retry": {"max_backoff_s": float("nan")}}, "retry.max_backoff_s"),
    ("rows_per_part 0", {"output__rows_per_part": 0}, "output.rows_per_part"),
    ("empty vector column", {"output__vector_column": ""}, "output.vector_column"),
    ("vector column clashes with a kept column", {"input__keep_columns": ["embedding"]}, "output.vector_column"),
    ("input format unknown", {"input__format": "json"}, "input.format"),
    ("text column as a number", {"input__text_column": 5}, "input.text_column"),
    ("keep_columns not names", {"input__keep_columns": [1, 2]}, "input.keep_columns"),
    ("input path empty list", {"input__path": []}, "input.path"),
    ("input path empty string", {"input__path": ""}, "input.path"),
    ("name with spaces", {"name": "my docs"}, "name"),
    ("name empty", {"name": ""}, "name"),
    ("providers empty", {"providers": []}, "providers"),
    ("providers not a list", {"providers": {"name": "a"}}, "providers"),
    ("section not a mapping", {"embedding": "text-embedding-3-small"}, "embedding"),
    ("cache not a path", {"cache": 5}, "cache"),
    ("timeout a 400-digit number", {"providers__0__timeout_s": 10**400}, "providers[0].timeout_s"),
    ("timeout -inf", {"providers__1__timeout_s": -math.inf}, "providers[1].timeout_s"),
    ("price nan", {"providers__1__price_per_million_tokens": math.nan}, "providers[1].price_per_million_tokens"),
    ("price negative", {"providers__0__price_per_million_tokens": -0.01}, "providers[0].price_per_million_tokens"),
    ("priority as a bool", {"providers__1__priority": False}, "providers[1].priority"),
    ("batch_size 0", {"providers__1__batch_size": 0}, "providers[1].batch_size"),
    ("rows_per_part huge", {"output__rows_per_part": 10**30}, "output.rows_per_part"),
    ("rows_per_part as a float", {"output__rows_per_part": 1.0}, "output.rows_per_part"),
    ("tokens a request as a float", {"batching": {"max_tokens_per_request": 9000.5}}, "batching.max_tokens_per_request"),
    ("dimensions negative", {"embedding__dimensions": -512}, "embedding.dimensions"),
    ("format empty", {"input__format": ""}, "input.format"),
    ("format null", {"input__format": None}, "input.format"),
    ("name as a list", {"name": ["docs"]}, "name"),
    ("name null", {"name": None}, "name"),
    ("input as a list", {"input": ["data.parquet"]}, "input"),
    ("input as text", {"input": "data.parquet"}, "input"),
    ("batching as a number", {"batching": 0}, "batching"),
    ("providers as text", {"providers": "relay-a"}, "providers"),
    ("a provider as text", {"providers__1": "relay-b"}, "providers[1]"),
    ("a provider null", {"providers__1": None}, "providers[1]"),
    ("second provider name null", {"providers__1__name": None}, "providers[1].name"),
    ("second provider type null", {"providers__1__type": None}, "providers[1].type"),
    ("storage as a list", {"output__storage": ["http://127.0.0.1:9000"]}, "output.storage"),
    ("storage anonymous as text", {"input__storage": {"anonymous": "yes"}}, "input.storage.anonymous"),
    ("cache storage region as a number", {"cache": {"path": "s3://b/c", "storage": {"region": 5}}}, "cache.storage.region"),
    ("cache mapping without path", {"cache": {"storage": {}}}, "cache.path"),
    ("cache path empty", {"cache": {"path": ""}}, "cache.path"),
    ("keep_columns with an empty name", {"input__keep_columns": ["title", ""]}, "input.keep_columns"),
    ("keep_columns a mapping", {"input__keep_columns": {"title": 1}}, "input.keep_columns"),
    ("input path a list in a list", {"input__path": [["a.parquet"]]}, "input.path"),
    ("input path null", {"input__path": None}, "input.path"),
    ("output path a number", {"output__path": 5}, "output.path"),
    ("output path empty", {"output__path": ""}, "output.path"),
]


@pytest.mark.parametrize(
    "changes, key_path", [row[1:] for row in BAD_VALUE_TABLE], ids=[row[0] for row in BAD_VALUE_TABLE]
)
def test_a_wrong_value_is_an_error_naming_its_key_path(tmp_path, changes, key_path):
    message = load_error(tmp_path, job_with(TWO_PROVIDERS, **changes))
    assert re.search(rf"(^|[\s:]){re.escape(key_path)}:", message), message


EXACT_MESSAGE_TABLE = [
    # id, changes, the message after the job file's path
    ("range, second provider", {"providers__1__max_concurrency": 0}, "providers[1].max_concurrency: 0 is out of range (1..1024)"),
    ("float range", {"retry": {"max_backoff_s": math.inf}}, "retry.max_backoff_s: inf is out of range (0..86400)"),
    ("whole number", {"embedding__dimensions": "512"}, "embedding.dimensions: expected a whole number, got '512'"),
    ("number", {"providers__0__timeout_s": "60s"}, "providers[0].timeout_s: expected a number, got '60s'"),
    ("choice", {"embedding__too_long": "average"},
     "embedding.too_long: 'average' is not one of truncate, chunk_mean, skip, fail"),
    ("key not echoed", {"providers__0__api_key": 12345}, "providers[0].api_key: expected text, got int"),
    ("providers not a list", {"providers": {"name": "a"}}, "providers: must be a list of one or more providers"),
    ("providers empty", {"providers": []}, "providers: must be a list of one or more providers"),
    ("input path empty", {"input__path": []}, "input.path: must be a path, a glob or a list of them"),
    ("keep_columns", {"input__keep_columns": [1, 2]}, "input.keep_columns: must be a list of column names"),
    ("section", {"embedding": "text-embedding-3-small"},
     "embedding: must be a mapping (model, dimensions, max_input_tokens, ...)"),
    ("storage", {"output__storage": "s3"}, "output.storage: must be a mapping (endpoint_url, region, anonymous, ...)"),
    ("anonymous", {"input__storage": {"anonymous": "yes"}}, "input.storage.anonymous: expected true or false, got 'yes'"),
    ("storage pair", {"output__storage": {"access_key_id": "${" + KEY_VAR + "}"}},
     "output.storage: give both access_key_id and secret_access_key, or neither"),
    ("cache", {"cache": 5}, "cache: must be a path, a URI (s3://bucket/prefix) or a mapping with path and storage"),
    ("cache path", {"cache": {"path": ""}}, "cache.path: required (a folder or a URI)"),
    ("cache path missing", {"cache": {"storage": {}}}, "cache.path: required (a folder or a URI)"),
    ("provider name", {"providers__0__name": ""}, "providers[0]: every provider needs a 'name'"),
    ("api key", {"providers__1__api_key": DELETE},
     "providers[1].api_key: required for an openai provider (write api_key: ${ENV_VAR})"),
    ("base url missing", {"providers__0__base_url": DELETE}, "providers[0].base_url: required for an openai provider"),
    ("base url", {"providers__0__base_url": "relay-a.example/v1"},
     "providers[0].base_url: 'relay-a.example/v1' is not an http(s) URL"),
    ("token budget", {"batching": {"max_tokens_per_request": 1000}},
     "batching.max_tokens_per_request: must be at least embedding.max_input_tokens"),
    ("text neither", {"input__text_column": DELETE}, "input: give exactly one of 'text_column' or 'text_template'"),
    ("template", {"input__text_column": DELETE, "input__text_template": "none"},
     "input.text_template: names no column; write columns as {name}"),
    ("name", {"name": "my docs"}, "name: 'my docs' must be a non-empty word (letters, digits, . _ -)"),
    ("name missing", {"name": DELETE}, "name: required"),
    ("duplicate", {"providers__1__name": "relay-a"}, "providers: duplicate name 'relay-a'"),
    ("vector clash", {"input__id_column": "embedding"},
     "output.vector_column: 'embedding' clashes with an input column kept in the output"),
    ("output path", {"output__path": DELETE}, "output.path: required"),
    ("model", {"embedding__model": ""}, "embedding.model: required"),
    ("null", {"retry": {"max_attempts": None}}, "retry.max_attempts: must not be empty"),
    ("unknown, far", {"retry": {"zzz": 1}}, "retry.zzz: unknown key; known keys: max_attempts, initial_backoff_s, max_backoff_s"),
    ("unset variable", {"providers__1__api_key": "${CFG_TEST_UNSET}"},
     "providers[1].api_key: environment variable ${CFG_TEST_UNSET} is not set"),
    ("unset variable in a list", {"input__path": ["a.parquet", "${CFG_TEST_UNSET}/b.parquet"]},
     "input.path[1]: environment variable ${CFG_TEST_UNSET} is not set"),
]


@pytest.mark.parametrize(
    "changes, expected", [row[1:] for row in EXACT_MESSAGE_TABLE], ids=[row[0] for row in EXACT_MESSAGE_TABLE]
)
def test_the_error_a_user_reads_is_the_job_file_then_the_key_path_then_the_problem(tmp_path, monkeypatch, changes, expected):
    monkeypatch.delenv("CFG_TEST_UNSET", raising=False)
    message = load_error(tmp_path, job_with(TWO_PROVIDERS, **changes))
    assert message == f"{tmp_path / 'job.yaml'}: {expected}"


def test_a_wrong_type_says_what_was_expected_and_what_was_found(tmp_path):
    message = load_error(tmp_path, job_with(providers__0__max_concurrency="eight"))
    assert "whole number" in message
    assert "'eight'" in message


def test_an_out_of_range_value_shows_the_allowed_range(tmp_path):
    message = load_error(tmp_path, job_with(embedding__max_input_tokens=8193))
    assert "8193" in message and "8192" in message


@pytest.mark.parametrize(
    "text_keys",
    [
        pytest.param({"text_column": "body", "text_template": "{title}: {body}"}, id="both"),
        pytest.param({}, id="neither"),
    ],
)
def test_exactly_one_of_text_column_and_text_template_is_required(tmp_path, text_keys):
    message = load_error(tmp_path, job_with(input={"path": "data.parquet", **text_keys}))
    assert "text_column" in message and "text_template" in message


def test_a_template_naming_no_column_is_refused(tmp_path):
    message = load_error(tmp_path, job_with(input={"path": "data.parquet", "text_template": "no fields here"}))
    assert "input.text_template" in message


def test_duplicate_provider_names_are_refused(tmp_path):
    message = load_error(tmp_path, job_with(TWO_PROVIDERS, providers__1__name="relay-a"))
    assert "duplicate" in message
    assert "'relay-a'" in message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("name: docs\ninput: {path: [unclosed\n", id="unclosed flow sequence"),
        pytest.param("name: docs\n  input: x\n bad: 1\n", id="bad indentation"),
        pytest.param("name: 'unterminated\n", id="unterminated quote"),
        pytest.param("\tname: docs\n", id="tab indentation"),
    ],
)
def test_invalid_yaml_is_reported_as_not_valid_yaml(tmp_path, text):
    message = load_error(tmp_path, text)
    assert "not valid YAML" in message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty file"),
        pytest.param("- name: docs\n", id="a list"),
        pytest.param("just a string\n", id="a scalar"),
    ],
)
def test_a_job_file_that_is_not_a_mapping_is_refused(tmp_path, text):
    message = load_error(tmp_path, text)
    assert "mapping" in message


def test_a_missing_job_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")


MISSING_TABLE = [
    # id, key to delete, key path the message names
    ("name", "name", "name"),
    ("input", "input", "input"),
    ("output", "output", "output"),
    ("embedding", "embedding", "embedding"),
    ("providers", "providers", "providers"),
    ("input.path", "input.path", "input.path"),
    ("output.path", "output.path", "output.path"),
    ("embedding.model", "embedding.model", "embedding.model"),
    ("providers[0].name", "providers[0].name", "providers[0].name"),
    ("providers[1].api_key", "providers[1].api_key", "providers[1].api_key"),
    ("providers[0].base_url", "providers[0].base_url", "providers[0].base_url"),
]


@pytest.mark.parametrize("deleted, key_path", [row[1:] for row in MISSING_TABLE], ids=[row[0] for row in MISSING_TABLE])
def test_a_missing_required_key_is_an_error_naming_it(tmp_path, deleted, key_path):
    doc = copy.deepcopy(TWO_PROVIDERS)
    set_path(doc, deleted, DELETE)
    message = load_error(tmp_path, doc)
    assert re.search(rf"(^|[\s:]){re.escape(key_path)}:", message), message


def test_embedding_without_model_but_with_other_keys_is_an_error_naming_embedding_model(tmp_path):
    message = load_error(tmp_path, job_with(embedding={"dimensions": 512}))
    assert "embedding.model" in message


def test_a_local_provider_needs_neither_base_url_nor_api_key(tmp_path):
    job = load_job(write(tmp_path, job_with(providers=[{"name": "local", "type": "local"}])))
    assert job.providers[0].type == "local"
    assert job.providers[0].base_url is None


# ---------------------------------------------------------------------------
# Secrets


def test_the_api_key_never_appears_in_the_jobs_repr_or_str(tmp_path):
    job = load_job(write(tmp_path, TWO_PROVIDERS))
    assert job.providers[0].api_key == SECRET  # it was loaded ...
    assert SECRET not in repr(job)  # ... and is never printed
    assert SECRET not in str(job)
    assert SECRET not in repr(job.providers)


def test_an_error_in_a_provider_entry_does_not_echo_its_api_key(tmp_path, monkeypatch):
    # An all-digit key (ctyun's examples use such AppKeys) reaches YAML as a number.
    monkeypatch.setenv(KEY_VAR, "884123456789")
    message = load_error(tmp_path, job_with(providers__0__api_key=884123456789))
    assert "providers[0].api_key" in message
    assert "884123456789" not in message


def test_a_loaded_job_cannot_be_changed_afterwards(tmp_path):
    job = load_job(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.embedding.model = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.providers[0].api_key = "leaked"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Escapes, template specs, empty keys


def test_a_double_dollar_writes_a_literal_dollar_and_is_not_an_env_var(tmp_path):
    job = load_job(write(tmp_path, job_with(input__text_column=DELETE, input__text_template="costs $${price}: {body}")))
    assert job.input.text_template == "costs ${price}: {body}"
    assert job.input.template_columns == ("price", "body")


def test_template_fields_with_format_specs_name_their_columns(tmp_path):
    job = load_job(write(tmp_path, job_with(input__text_column=DELETE, input__text_template="{price:.2f} {title!r} {{x}} {body}")))
    assert job.input.template_columns == ("price", "title", "body")


@pytest.mark.parametrize("key", ["", None])
def test_an_empty_api_key_is_refused_at_load(tmp_path, key):
    message = load_error(tmp_path, job_with(providers__0__api_key=key))
    assert "providers[0].api_key" in message


@pytest.mark.parametrize("place", ["input.storage", "output.storage", "cache.storage"])
@pytest.mark.parametrize("key", STORAGE_SECRET_KEYS)
def test_a_storage_secret_written_in_the_file_is_refused_without_echoing_it(tmp_path, place, key):
    written = "AKIA-WRITTEN-IN-THE-FILE-7f3e"
    doc = job_with(cache={"path": "s3://bucket/cache"}) if place == "cache.storage" else job_with()
    set_path(doc, place, {key: written})
    message = load_error(tmp_path, doc)
    assert message == f"{tmp_path / 'job.yaml'}: {place}.{key}: write it as ${{ENV_VAR}}; secrets never go in the job file"
    assert written not in message


def test_storage_secrets_given_as_env_vars_are_loaded_and_never_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("CFG_TEST_AWS_SECRET", "aws-secret-value-51c2")
    storage = {"endpoint_url": "http://127.0.0.1:9000", "access_key_id": "${" + KEY_VAR + "}",
               "secret_access_key": "${CFG_TEST_AWS_SECRET}"}
    doc = job_with(input__storage=storage, output__storage=storage, cache={"path": "s3://bucket/cache", "storage": storage})
    job = load_job(write(tmp_path, doc))
    for loaded in (job.input.storage, job.output.storage, job.cache_storage):
        assert (loaded.access_key_id, loaded.secret_access_key) == (SECRET, "aws-secret-value-51c2")
        assert loaded.endpoint_url == "http://127.0.0.1:9000"
    assert job.cache == "s3://bucket/cache"
    assert "aws-secret-value-51c2" not in repr(job) and SECRET not in repr(job)


def test_an_unset_var_in_a_storage_secret_is_listed_when_env_is_not_required(tmp_path, monkeypatch):
    monkeypatch.delenv("CFG_TEST_UNSET", raising=False)
    storage = {"access_key_id": "${CFG_TEST_UNSET}", "secret_access_key": "${CFG_TEST_UNSET}"}
    job = load_job(write(tmp_path, job_with(output__storage=storage)), require_env=False)
    assert job.env_missing == ("CFG_TEST_UNSET", "CFG_TEST_UNSET")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("name: " + "9" * 5000 + "\n", id="a number past Python's digit limit"),
        pytest.param("name: " + "[" * 100_000 + "\n", id="nested past the stack"),
    ],
)
def test_yaml_python_cannot_hold_is_reported_as_not_valid_yaml(tmp_path, text):
    assert "not valid YAML" in load_error(tmp_path, text)


@pytest.mark.parametrize("model", [None, ""])
def test_a_provider_model_left_empty_is_the_jobs_model(tmp_path, model):
    job = load_job(write(tmp_path, job_with(TWO_PROVIDERS, providers__1__model=model)))
    assert [p.model for p in job.providers] == ["text-embedding-3-small", "text-embedding-3-small"]


def test_empty_lists_and_mappings_take_their_defaults(tmp_path):
    job = load_job(write(tmp_path, job_with(input__keep_columns=None, batching=None, retry=None, output__storage=None)))
    assert job.input.keep_columns == ()
    assert job.batching.max_inputs_per_request == 2048 and job.retry.max_attempts == 6
    assert job.output.storage.endpoint_url is None


def test_a_column_or_path_given_twice_is_kept_once_in_order(tmp_path):
    doc = job_with(input__path=["b.parquet", "a.parquet", "b.parquet"], input__keep_columns=["title", "doc_id", "title"])
    job = load_job(write(tmp_path, doc))
    assert [Path(p).name for p in job.input.paths] == ["b.parquet", "a.parquet"]
    assert job.input.keep_columns == ("title", "doc_id")


def test_a_word_for_a_list_is_a_one_item_list(tmp_path):
    job = load_job(write(tmp_path, job_with(input__keep_columns="title")))
    assert job.input.keep_columns == ("title",)
