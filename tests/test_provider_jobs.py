"""Whole jobs (`python -m pipeline run`, a subprocess) against loopback servers
speaking the dialects teams meet: Azure OpenAI, a gateway wanting its own
secret header, an asymmetric model's `input_type` (synchronous and through the
Batch API), Gemini's 100-input cap, Ollama's floats. Every vector checked
exactly; secrets looked for in every output, log line and file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import (
    FAST_RETRY,
    docs_table,
    error_lines,
    provider_entry,
    read_parts,
    read_summary,
    rows_sent,
    run_job,
    sample_texts,
    write_job,
    write_parquet,
)
from fakebatch import FakeBatchAPI
from fakeprovider import FakeProvider, salted, vector_for
from pipeline.core.probe import PROBE_TEXTS

pytestmark = pytest.mark.slow  # subprocess runs: not in the `-m "not slow"` inner loop

DIM = 8
AZURE_VERSION = "2024-10-21"
GATEWAY_SECRET = "gw-secret-7f3a9c1e55d0"
GW_VAR = "EMB_TEST_GATEWAY"


def assert_vectors(out: Path, texts: list[str], **fields: Any) -> None:
    """Each row's vector is exactly what the model makes of its text with these body fields."""
    vectors = read_parts(out).column("embedding").to_pylist()
    assert len(vectors) == len(texts)
    for vec, text in zip(vectors, texts):
        assert vec is not None
        assert np.array_equal(np.asarray(vec, dtype=np.float32), vector_for(salted(text, fields), DIM)), text


def assert_nowhere(secret: str, out: Path, *streams: str) -> None:
    for stream in streams:
        assert secret not in stream
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_an_azure_openai_deployment_job_embeds_every_row_through_its_route_version_and_api_key(tmp_path: Path) -> None:
    texts = sample_texts(23)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, deployment="emb-small", auth="api-key",
                      required_query={"api-version": AZURE_VERSION}) as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="azure", auth="api-key",
                                                  query={"api-version": AZURE_VERSION})])
        result = run_job(job)
        calls = fp.calls
        assert rows_sent(fp) == {t: 1 for t in texts}
    assert result.returncode == 0, result.stderr
    assert_vectors(tmp_path / "out", texts)
    assert calls and {c["path"] for c in calls} == {"/openai/deployments/emb-small/embeddings"}
    assert all(c["query"] == {"api-version": AZURE_VERSION} and c["headers"]["api-key"] == fp.api_key
               and "Authorization" not in c["headers"] for c in calls)


def test_an_azure_job_without_its_api_version_embeds_nothing_and_exits_1_naming_why(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(9)))
    with FakeProvider(dim=DIM, deployment="emb-small", auth="api-key",
                      required_query={"api-version": AZURE_VERSION}) as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="azure", auth="api-key")])
        result = run_job(job)
        assert fp.inputs_received == []
        assert fp.count() == 1  # the probe, answered 404: a missing endpoint is not retried
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: no provider can take work (azure: HTTP 404 [404] Resource not found (check base_url, and for Azure "
        "the deployment in it and query: {api-version: ...}))"]


def test_a_gateways_secret_header_is_sent_on_every_request_and_is_nowhere_in_logs_or_files(tmp_path: Path) -> None:
    texts = sample_texts(17)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    headers = {"X-Gateway-Key": "${" + GW_VAR + "}", "X-Org": "data-team"}
    env = {GW_VAR: GATEWAY_SECRET}
    with FakeProvider(dim=DIM, required_headers={"X-Gateway-Key": GATEWAY_SECRET, "X-Org": "data-team"}) as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="gateway", headers=headers)])
        result = run_job(job, "--debug", env_extra=env)
        assert result.returncode == 0, result.stderr
        assert all(c["headers"]["X-Gateway-Key"] == GATEWAY_SECRET for c in fp.calls)
        assert_vectors(tmp_path / "out", texts)
        assert_nowhere(GATEWAY_SECRET, tmp_path / "out", result.stdout, result.stderr)

        # a wrong value: refused, and the value it was is shown nowhere either
        wrong = "gw-wrong-value-0000aa"
        failed = run_job(job, "--debug", "--restart", env_extra={GW_VAR: wrong})
    assert failed.returncode == 1
    assert error_lines(failed.stderr) == ["error: no provider can take work (gateway: HTTP 401 [invalid_api_key] "
                                          "Missing or invalid X-Gateway-Key header.)"]
    assert_nowhere(wrong, tmp_path / "out", failed.stdout, failed.stderr)
    assert_nowhere(GATEWAY_SECRET, tmp_path / "out", failed.stdout, failed.stderr)


def test_extra_body_is_on_every_request_and_in_the_cache_key_and_changing_it_needs_restart(tmp_path: Path) -> None:
    texts = sample_texts(19)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"

    def job_for(fp: FakeProvider, input_type: str, output: str = "out") -> Path:
        path = write_job(tmp_path, [provider_entry(fp, name="nim", extra_body={"input_type": input_type,
                                                                               "truncate": "END"})],
                         output=output, file_name=f"{output}.yaml")
        text = path.read_text() + "cache: .cache/vectors\n"
        path.write_text(text)
        return path

    with FakeProvider(dim=DIM, vary_with=("input_type",)) as fp:
        first = run_job(job_for(fp, "passage"))
        assert first.returncode == 0, first.stderr
        assert all(b["input_type"] == "passage" and b["truncate"] == "END" for b in fp.requests)  # the probe too
        assert any(b["input"] == list(PROBE_TEXTS) for b in fp.requests)
        assert_vectors(out, texts, input_type="passage")

        # the same texts and fields for another output: every vector comes from the cache
        before = fp.count()
        again = run_job(job_for(fp, "passage", output="again"))
        assert again.returncode == 0, again.stderr
        assert fp.count() == before + 1  # its probe only
        assert_vectors(tmp_path / "again", texts, input_type="passage")

        # another input_type is another vector space: refused on this output, re-embedded with --restart
        refused = run_job(job_for(fp, "query"))
        assert refused.returncode == 2
        assert error_lines(refused.stderr)[0].startswith("error: ")
        assert "input_type" in refused.stderr and "--restart" in refused.stderr
        sent_before = rows_sent(fp)
        restarted = run_job(job_for(fp, "query"), "--restart")
        assert restarted.returncode == 0, restarted.stderr
        assert rows_sent(fp) - sent_before == {t: 1 for t in texts}  # nothing taken from the passage vectors
    assert_vectors(out, texts, input_type="query")


def test_a_100_input_cap_is_learned_with_no_row_rejected_and_the_log_names_it(tmp_path: Path) -> None:
    texts = sample_texts(700)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM, input_cap=100, cap_wording="gemini") as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="gemini", max_concurrency=2)], rows_per_part=350,
                        batching={"max_inputs_per_request": 300})
        result = run_job(job)
        sizes = [len(b["input"]) for b in fp.requests]
        assert rows_sent(fp) == {t: 1 for t in texts}
    assert result.returncode == 0, result.stderr
    assert_vectors(out, texts)
    summary = read_summary(out)
    assert summary["status"] == "complete" and summary["run"]["rows_embedded"] == len(texts)
    assert summary["job"]["rows_rejected"] == {}
    assert not (out / "_rejects.parquet").exists() or pq.read_table(out / "_rejects.parquet").num_rows == 0
    assert (out / "_SUCCESS").exists()
    refused = [n for n in sizes if n > 100]
    assert 1 <= len(refused) <= 2  # refused while in flight when the cap was found; then packed to it
    assert "gemini takes at most 100 inputs a request (as it says" in result.stderr
    assert summary["providers"]["gemini"]["state"] == "ready"


def test_an_ollama_style_endpoint_answering_floats_without_a_key_gives_the_exact_vectors(tmp_path: Path) -> None:
    texts = sample_texts(13)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, base64="ignore", auth="none") as fp:
        entry = {"name": "ollama", "base_url": fp.base_url, "auth": "none", "timeout_s": 5}
        job = write_job(tmp_path, [entry])
        result = run_job(job, key=None)
        asked = {b["encoding_format"] for b in fp.requests}
    assert result.returncode == 0, result.stderr
    assert asked == {"base64"}  # asked every time, answered in floats every time
    assert_vectors(tmp_path / "out", texts)


def test_teis_bare_429_backs_off_and_the_job_completes(tmp_path: Path) -> None:
    texts = sample_texts(11)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, script=["ok", "429-tei", "429-tei"]) as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="tei")], retry=FAST_RETRY)
        result = run_job(job)
        directives = fp.directives
    assert result.returncode == 0, result.stderr
    assert directives[:3] == ["ok", "429-tei", "429-tei"]
    assert read_summary(tmp_path / "out")["providers"]["tei"]["rate_limited"] == 2
    assert_vectors(tmp_path / "out", texts)


def test_a_batch_api_job_carries_extra_body_on_every_line_and_its_headers_and_query_on_every_call(
        tmp_path: Path) -> None:
    texts = sample_texts(15)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    wanted = {"X-Gateway-Key": GATEWAY_SECRET}
    with FakeBatchAPI(dim=DIM, duration_s=0.2, vary_with=("input_type",), required_headers=wanted,
                      required_query={"api-version": AZURE_VERSION}) as api:
        entry = provider_entry(api.base_url, name="batch", type="openai_batch", poll_interval_s=0.05,
                               extra_body={"input_type": "passage"}, query={"api-version": AZURE_VERSION},
                               headers={"X-Gateway-Key": "${" + GW_VAR + "}"})
        job = write_job(tmp_path, [entry], batching={"max_inputs_per_request": 4})
        result = run_job(job, env_extra={GW_VAR: GATEWAY_SECRET})
        lines = list(api.line_bodies)
        calls = list(api.api_calls) + list(api.calls)
    assert result.returncode == 0, result.stderr
    assert lines and all(b["input_type"] == "passage" for b in lines)
    assert sorted(t for b in lines for t in b["input"] if t not in PROBE_TEXTS) == sorted(texts)
    assert calls and all(c["query"] == {"api-version": AZURE_VERSION} and
                         c["headers"]["X-Gateway-Key"] == GATEWAY_SECRET for c in calls)
    assert_vectors(tmp_path / "out", texts, input_type="passage")
    assert_nowhere(GATEWAY_SECRET, tmp_path / "out", result.stdout, result.stderr)
