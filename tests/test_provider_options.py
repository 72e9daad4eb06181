"""A provider's `auth`, `headers`, `query`, `extra_body`, `text_prefix` and
`normalize` in the job file: how they read, what they refuse (never quoting a
header value), and that what changes the vectors is part of the cache key and
of the output's fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cache.vectors import text_keys
from pipeline.checkpoint.manifest import describe_change, epoch_of, job_fingerprint
from pipeline.config.job import JobConfig, ProviderConfig, load_job
from pipeline.errors import ConfigError

SECRET = "gw-secret-7f3a9c1e55d0"


def job_file(tmp_path: Path, *providers: dict[str, Any], text: str | None = None) -> Path:
    doc = {"name": "j", "input": {"path": "data.parquet", "text_column": "body"}, "output": {"path": "out"},
           "embedding": {"model": "m"}, "providers": list(providers)}
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def remote(**extra: Any) -> dict[str, Any]:
    return {"name": "r", "base_url": "https://res.openai.azure.com/openai/deployments/emb", "api_key": "${KEY}",
            **extra}


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path)
    return str(info.value)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY", "sk-key-123456")
    monkeypatch.setenv("GW", SECRET)


def test_an_azure_entry_reads_as_written_with_the_api_version_date_kept_as_text(tmp_path: Path) -> None:
    text = """
name: j
input: {path: data.parquet, text_column: body}
output: {path: out}
embedding: {model: text-embedding-3-small}
providers:
  - name: azure
    base_url: https://res.openai.azure.com/openai/deployments/emb-small
    auth: api-key
    api_key: ${KEY}
    query: {api-version: 2024-10-21}
    headers: {X-Gateway-Key: "${GW}", X-Retries: 3}
    extra_body: {input_type: passage, options: {truncate: END, lengths: [1, 2]}}
"""
    p = load_job(job_file(tmp_path, text=text)).providers[0]
    assert p.auth == "api-key"
    assert dict(p.query) == {"api-version": "2024-10-21"}
    assert dict(p.headers) == {"X-Gateway-Key": SECRET, "X-Retries": "3"}
    assert dict(p.extra_body) == {"input_type": "passage", "options": {"truncate": "END", "lengths": [1, 2]}}
    assert SECRET not in repr(p) and "sk-key-123456" not in repr(p)


@pytest.mark.parametrize("entry, expected", [
    (remote(headers={"Authorization": "${GW}"}),
     "providers[0].headers.Authorization: auth: bearer sets it from api_key; write auth: none to send your own"),
    (remote(auth="api-key", headers={"API-Key": "${GW}"}),
     "providers[0].headers.API-Key: auth: api-key sets it from api_key; write auth: none to send your own"),
    (remote(headers={"bad name": "${GW}"}), "providers[0].headers.bad name: 'bad name' is not a header name "
                                            "(letters, digits and - only)"),
    (remote(headers={"X-Two": "a${GW}\nb"}), "providers[0].headers.X-Two: a header value cannot hold a line break"),
    (remote(headers=["X-Org"]), "providers[0].headers: must be a mapping of names to values"),
    (remote(headers={"X-Org": {"nested": 1}}), "providers[0].headers.X-Org: must be text, a number or a date"),
    (remote(extra_body={"model": "other"}), "providers[0].extra_body.model: is the job's own (embedding.model, "
                                            "embedding.dimensions, the texts); extra_body adds other fields"),
    (remote(extra_body={"dimensions": 256}), "providers[0].extra_body.dimensions: is the job's own "
                                             "(embedding.model, embedding.dimensions, the texts); extra_body adds "
                                             "other fields"),
    (remote(extra_body={"encoding_format": "int8"}),
     "providers[0].extra_body.encoding_format: 'int8' is not one of base64, float"),
    (remote(base_url="https://res.openai.azure.com/openai/deployments/emb?api-version=2024-10-21"),
     "providers[0].base_url: ends at the path; put URL parameters under 'query:' (e.g. api-version)"),
    (remote(auth="basic"), "providers[0].auth: 'basic' is not one of bearer, api-key, none"),
    (remote(text_prefix="query: "), "providers[0].text_prefix: only a local provider takes it (a remote one gets "
                                    "the texts as they are)"),
    ({"name": "l", "type": "local", "headers": {"X": "y"}}, "providers[0].headers: a local provider sends no request"),
])
def test_a_wrong_extra_is_one_line_naming_the_key_and_never_a_header_value(tmp_path: Path, entry: dict[str, Any],
                                                                           expected: str) -> None:
    message = load_error(job_file(tmp_path, entry))
    assert message == f"{tmp_path / 'job.yaml'}: {expected}"
    assert SECRET not in message


def test_auth_none_needs_no_key(tmp_path: Path) -> None:
    entry = {"name": "ollama", "base_url": "http://127.0.0.1:11434/v1", "auth": "none"}
    p = load_job(job_file(tmp_path, entry)).providers[0]
    assert p.auth == "none" and p.api_key is None


def test_providers_of_one_job_must_agree_on_what_changes_the_vectors(tmp_path: Path) -> None:
    a = remote(name="a", extra_body={"input_type": "passage"})
    b = remote(name="b", extra_body={"input_type": "query"})
    assert load_error(job_file(tmp_path, a, b)).endswith(
        "providers[1]: its extra_body, text_prefix or normalize differ from a's: the providers of a job make one "
        "vector space")
    # fields that change how answers travel, not the vectors, may differ
    c = remote(name="c", extra_body={"input_type": "passage", "encoding_format": "float", "user": "etl"})
    job = load_job(job_file(tmp_path, a, c))
    assert job.vector_options == {"extra_body": {"input_type": "passage"}}


def test_a_local_model_path_is_relative_to_the_job_file_and_an_id_stays_an_id(tmp_path: Path) -> None:
    (tmp_path / "models" / "bge").mkdir(parents=True)
    folder = load_job(job_file(tmp_path, {"name": "l", "type": "local", "model": "./models/bge"})).providers[0]
    assert folder.model == str(tmp_path / "models" / "bge")
    bare = load_job(job_file(tmp_path, {"name": "l", "type": "local", "model": "models/bge"})).providers[0]
    assert bare.model == str(tmp_path / "models" / "bge")  # a folder that exists beside the job file
    hub = load_job(job_file(tmp_path, {"name": "l", "type": "local", "model": "BAAI/bge-small-en-v1.5",
                                       "text_prefix": "passage: ", "normalize": False})).providers[0]
    assert hub.model == "BAAI/bge-small-en-v1.5"
    assert hub.vector_options == {"text_prefix": "passage: ", "normalize": False}


# ------------------------------------------------------------------ cache keys, fingerprint
def old_key(text: str, model: str, dimensions: int | None) -> bytes:
    """The key as it was before options existed (a cache written then must still hit)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model}\x00{dimensions}\x00".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


def test_cache_keys_without_options_are_unchanged_and_options_make_other_keys() -> None:
    texts = ["alpha", "beta"]
    plain = text_keys(texts, "m", 256)
    assert plain == [old_key(t, "m", 256) for t in texts] == text_keys(texts, "m", 256, {})
    passage = text_keys(texts, "m", 256, {"extra_body": {"input_type": "passage"}})
    query = text_keys(texts, "m", 256, {"extra_body": {"input_type": "query"}})
    assert len({*plain, *passage, *query}) == 6
    # the order the job file gives the fields in does not matter
    assert text_keys(texts, "m", 256, {"extra_body": {"a": 1, "b": 2}}) == \
        text_keys(texts, "m", 256, {"extra_body": {"b": 2, "a": 1}})


def job_of(extra_body: dict[str, Any] | None = None) -> JobConfig:
    from pipeline.config.job import EmbeddingConfig, InputConfig, OutputConfig

    provider = ProviderConfig(name="r", base_url="http://127.0.0.1:9/v1", api_key="k", model="m",
                              extra_body=extra_body or {})
    return JobConfig(name="j", job_path=Path("/tmp/j.yaml"), input=InputConfig(paths=("/tmp/d.parquet",),
                     text_column="body"), output=OutputConfig(path="/tmp/out"), embedding=EmbeddingConfig(model="m"),
                     providers=(provider,))


def test_extra_body_is_in_the_fingerprint_only_when_set_so_older_outputs_stay_the_same_job() -> None:
    plain = job_fingerprint(job_of(), [])
    assert "vector_options" not in plain
    older = dict(plain)  # what a manifest written before extra_body existed holds
    assert epoch_of(older) == epoch_of(job_fingerprint(job_of({"user": "etl"}), []))
    # The epoch its records carry, as the previous version computed it: unchanged, so they still count.
    keys_before = ("inputs", "text", "model", "dimensions", "too_long", "max_input_tokens", "empty", "id_column",
                   "keep_columns", "vector_column", "rows_per_part")
    canonical = json.dumps({k: plain.get(k) for k in keys_before}, sort_keys=True, default=str)
    assert epoch_of(plain) == hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
    passage = job_fingerprint(job_of({"input_type": "passage"}), [])
    assert describe_change(plain, passage) == \
        "vector_options changed from None to {'extra_body': {'input_type': 'passage'}}"
    assert epoch_of(passage) != epoch_of(plain)


# ------------------------------------------------------------------ the example jobs
JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name, check", [
    ("azure-openai.yaml", lambda j: (j.providers[0].auth, dict(j.providers[0].query), j.providers[1].auth)
     == ("api-key", {"api-version": "2024-10-21"}, "bearer")),
    ("nim-input-type.yaml", lambda j: j.vector_options == {"extra_body": {"input_type": "passage", "truncate": "END"}}),
    ("gemini.yaml", lambda j: j.request_limits()[0] == 100),
    ("self-hosted.yaml", lambda j: (j.providers[0].auth, j.providers[0].api_key) == ("none", None)),
    ("local-bge.yaml", lambda j: (j.providers[0].type, j.providers[0].model) == ("local", "BAAI/bge-small-en-v1.5")),
])
def test_every_example_job_file_loads_as_its_comments_say(monkeypatch: pytest.MonkeyPatch, name: str,
                                                          check: Any) -> None:
    import re

    text = (JOBS / name).read_text()
    for var in re.findall(r"\$\{(\w+)\}", text):
        monkeypatch.setenv(var, "placeholder-value")
    assert check(load_job(JOBS / name))
