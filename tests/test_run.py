"""`python -m pipeline` end to end, as a subprocess, against FakeProviders
running in this process; every vector checked exactly against vector_for."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    assert_vectors_exact,
    cli_env,
    docs_table,
    error_lines,
    KEY,
    KEY_VAR,
    MODEL,
    part_files,
    REPO,
    provider_entry,
    read_parts,
    read_summary as summary,
    rows_sent,
    run_cli,
    run_job as run,
    sample_texts,
    write_csv,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider, vector_for
from pipeline.config.job import EmbeddingConfig, InputConfig
from pipeline.core.probe import PROBE_TEXTS
from pipeline.inputs.sources import find_inputs, iter_units
from pipeline.inputs.texts import prepare

SECRET = "sk-live-SECRET-0123456789abcdef"


def rejects(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "_rejects.parquet").to_pylist()


def probe_requests(fp: FakeProvider) -> int:
    return sum(1 for body in fp.requests if body.get("input") == list(PROBE_TEXTS))


def one_error_line(stderr: str) -> str:
    """The CLI's error: exactly one `error:` line, the last line, and no traceback."""
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and "Traceback" not in stderr
    return lines[0]


def expected_requests(n_rows: int, rows_per_part: int = 7, per_request: int = 5) -> int:
    sizes = [min(rows_per_part, n_rows - s) for s in range(0, n_rows, rows_per_part)]
    return sum(math.ceil(s / per_request) for s in sizes)


# ------------------------------------------------------------------ output
@pytest.mark.parametrize("fmt, dimensions", [("parquet", None), ("csv", 12)])
def test_every_row_once_in_input_order_with_exact_vectors(tmp_path: Path, fmt: str, dimensions: int | None) -> None:
    texts = sample_texts(40)
    table = docs_table(texts)
    data = write_parquet(tmp_path / "data.parquet", table) if fmt == "parquet" else write_csv(tmp_path / "data.csv", table)
    embedding = {"dimensions": dimensions} if dimensions else {}
    dim = dimensions or 8
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], input_path=data.name, keep_columns=["doc_id", "title"],
                        embedding=embedding)
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert fp.count() == expected_requests(40) + 1
        assert probe_requests(fp) == 1
        assert rows_sent(fp) == Counter(texts)  # each row's text sent exactly once
        if dimensions:
            assert all(r["dimensions"] == dimensions for r in fp.requests)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert [p.name for p in part_files(out)] == [f"part-{i:05d}.parquet" for i in range(6)]
    parts = read_parts(out)
    assert parts.column_names == ["doc_id", "title", "embedding"]
    assert parts.column("doc_id").to_pylist() == table.column("doc_id").to_pylist()
    assert parts.column("title").to_pylist() == table.column("title").to_pylist()
    assert parts.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert_vectors_exact(parts, texts, dim)
    for part in part_files(out):
        meta = pq.read_schema(part).metadata
        assert meta[b"pipeline.model"] == MODEL.encode()
        assert meta[b"pipeline.dimensions"] == str(dim).encode()
        assert meta[b"pipeline.job"] == b"test-job"
    s = summary(out)
    assert s["status"] == "complete" and s["run"]["rows_embedded"] == 40 and s["run"]["rows_rejected"] == {}
    assert s["job"]["total_rows"] == 40


def test_id_defaults_to_row_number_when_id_column_is_unset(tmp_path: Path) -> None:
    texts = sample_texts(16)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], id_column=None, keep_columns=["title"])
        result = run(job)
        assert result.returncode == 0, result.stderr
    parts = read_parts(tmp_path / "out")
    assert parts.column_names == ["row_id", "title", "embedding"]
    assert parts.column("row_id").to_pylist() == list(range(16))
    assert_vectors_exact(parts, texts, 8)


def test_vector_column_name_is_configurable(tmp_path: Path) -> None:
    texts = sample_texts(9)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        text = job.read_text().replace("rows_per_part: 7", "rows_per_part: 7\n  vector_column: vec")
        job.write_text(text)
        result = run(job)
        assert result.returncode == 0, result.stderr
    parts = read_parts(tmp_path / "out")
    assert parts.column_names == ["doc_id", "vec"]
    assert_vectors_exact(parts, texts, 8, column="vec")


# ------------------------------------------------------------------ row policies
def test_empty_null_and_whitespace_texts_get_null_vectors_and_are_listed_as_rejects(tmp_path: Path) -> None:
    texts: list[str | None] = list(sample_texts(20))
    blank = {2: None, 5: "", 9: "   ", 15: "\n\t\r\n"}
    for i, t in blank.items():
        texts[i] = t
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(t for i, t in enumerate(texts) if i not in blank)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(20)]
    assert_vectors_exact(parts, [None if i in blank else t for i, t in enumerate(texts)], 8)
    s = summary(out)
    assert s["run"]["rows_embedded"] == 16
    assert s["run"]["rows_rejected"] == {"empty": 4}
    assert s["job"]["rows_rejected"] == {"empty": 4}
    assert [(r["id"], r["reason"]) for r in rejects(out)] == [(f"id-{i:04d}", "empty") for i in sorted(blank)]


LONG = " ".join(f"word{i} alpha beta" for i in range(30))  # ~120 cl100k tokens
LIMIT = 20


def too_long_rows(tmp_path: Path) -> list[str]:
    texts = sample_texts(10)
    texts[4] = LONG
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    return texts


def prepared_pieces(policy: str) -> Any:
    emb = EmbeddingConfig(model=MODEL, max_input_tokens=LIMIT, too_long=policy)  # type: ignore[arg-type]
    return prepare([LONG], emb, ["id-0004"])


def test_too_long_skip_rejects_the_row(tmp_path: Path) -> None:
    texts = too_long_rows(tmp_path)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], embedding={"max_input_tokens": LIMIT, "too_long": "skip"})
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(t for i, t in enumerate(texts) if i != 4)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), [None if i == 4 else t for i, t in enumerate(texts)], 8)
    assert [(r["id"], r["reason"]) for r in rejects(out)] == [("id-0004", "too_long")]
    assert summary(out)["run"]["rows_rejected"] == {"too_long": 1}


def test_too_long_truncate_embeds_the_first_tokens(tmp_path: Path) -> None:
    texts = too_long_rows(tmp_path)
    (piece,) = prepared_pieces("truncate").pieces
    assert LONG.startswith(piece) and len(piece) < len(LONG)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], embedding={"max_input_tokens": LIMIT, "too_long": "truncate"})
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter([piece] + [t for i, t in enumerate(texts) if i != 4])
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), [piece if i == 4 else t for i, t in enumerate(texts)], 8)
    assert rejects(out) == []


def test_too_long_chunk_mean_is_the_renormalised_token_weighted_mean_of_the_chunks(tmp_path: Path) -> None:
    texts = too_long_rows(tmp_path)
    prepared = prepared_pieces("chunk_mean")
    chunks, weights = prepared.pieces, prepared.piece_tokens
    assert len(chunks) >= 3 and all(w <= LIMIT for w in weights)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)],
                        embedding={"max_input_tokens": LIMIT, "too_long": "chunk_mean"})
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(list(chunks) + [t for i, t in enumerate(texts) if i != 4])
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert_vectors_exact(parts.slice(0, 4), texts[:4], 8)
    assert_vectors_exact(parts.slice(5), texts[5:], 8)
    mean = sum(float(w) * vector_for(c, 8).astype(np.float64) for c, w in zip(chunks, weights))
    expected = (mean / np.linalg.norm(mean)).astype(np.float32)
    got = np.asarray(parts.column("embedding")[4].as_py(), dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
    assert rejects(out) == []


def test_too_long_fail_stops_with_exit_2_and_one_error_line(tmp_path: Path) -> None:
    too_long_rows(tmp_path)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], embedding={"max_input_tokens": LIMIT, "too_long": "fail"})
        result = run(job)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "id-0004" in line and "too_long" in line
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_row_refused_by_the_provider_is_isolated_and_the_rest_embedded(tmp_path: Path) -> None:
    texts = sample_texts(20)
    texts[9] = "this row holds FORBIDDEN content"
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8, reject_marker="FORBIDDEN") as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(t for i, t in enumerate(texts) if i != 9)
        with_marker = [r["input"] for r in fp.requests if any("FORBIDDEN" in t for t in r.get("input", []))]
    # bisection: the 5-row request, then the 3-row half, then the row alone; never retried as is
    assert [len(x) for x in with_marker] == [5, 3, 1]
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(20)]
    assert_vectors_exact(parts, [None if i == 9 else t for i, t in enumerate(texts)], 8)
    assert rejects(out) == [{"id": "id-0009", "reason": "provider_rejected", "error_code": "400",
                             "part": "part-00001.parquet"}]
    assert summary(out)["run"]["rows_rejected"] == {"provider_rejected": 1}


# ------------------------------------------------------------------ resume
def test_limit_then_rerun_sends_every_row_exactly_once_and_a_complete_job_sends_nothing(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        first = run(job, "--limit", "10")
        assert first.returncode == 0, first.stderr
        assert not (out / "_SUCCESS").exists()
        assert rows_sent(fp) == Counter(texts[:10])
        smoke = read_parts(out)  # the smoke test's rows are there to look at
        assert smoke.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(10)]
        assert_vectors_exact(smoke, texts[:10], 8)

        second = run(job)
        assert second.returncode == 0, second.stderr
        assert (out / "_SUCCESS").exists()
        assert rows_sent(fp) == Counter(texts)  # across both runs: each row once
        assert probe_requests(fp) == 2  # one per run
        requests_so_far = fp.count()

        third = run(job)
        assert third.returncode == 0, third.stderr
        assert fp.count() == requests_so_far
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(30)]
    assert_vectors_exact(parts, texts, 8)
    assert summary(out)["job"]["rows_done"] == 30


@pytest.mark.parametrize("group_rows, rows_per_part", [(11, 7), (7, 25), (50, 10), (10, 10)])
@pytest.mark.parametrize("pick", ["all", "every other", "every fourth", "last", "a middle run", "none"])
def test_units_of_a_parquet_file_are_the_same_whichever_of_them_are_read(
    tmp_path: Path, group_rows: int, rows_per_part: int, pick: str
) -> None:
    """Only the row groups of the wanted units are read; what they make is
    exactly what reading the whole file and cutting it would."""
    rows = 103
    table = docs_table(sample_texts(rows))
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=group_rows)
    cfg = InputConfig(paths=(str(tmp_path / "data.parquet"),), text_column="body")
    files = find_inputs(cfg)
    n_units = -(-rows // rows_per_part)
    wanted = {"all": set(range(n_units)), "every other": set(range(0, n_units, 2)),
              "every fourth": set(range(1, n_units, 4)), "last": {n_units - 1},
              "a middle run": set(range(n_units // 3, 2 * n_units // 3 + 1)), "none": set()}[pick]
    totals: dict[str, int] = {}
    units = list(iter_units(files, cfg, rows_per_part, wanted.__contains__, totals))
    assert [u.seq for u in units] == sorted(wanted)
    whole = table.select(list(cfg.read_columns))
    for u in units:
        assert (u.file_start_row, u.row_offset) == (u.seq * rows_per_part, u.seq * rows_per_part)
        assert u.table.equals(whole.slice(u.seq * rows_per_part, rows_per_part))
    assert totals == {"units": n_units, "rows": rows}


def test_a_resumed_run_reads_only_the_row_groups_of_the_units_it_has_left(tmp_path: Path) -> None:
    """A backfill of one large Parquet file resumes without decoding what is
    done: here the done units' row groups are overwritten with garbage (same
    size and mtime, so the input counts as unchanged) and the rerun does not notice."""
    texts = sample_texts(60)
    data = tmp_path / "data.parquet"
    pq.write_table(docs_table(texts), data, row_group_size=10)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=10)
        assert run(job, "--limit", "30").returncode == 0
        meta = pq.ParquetFile(data).metadata
        stat = data.stat()
        with open(data, "r+b") as fh:
            for group in range(3):  # units 0-2, done
                for column in range(meta.num_columns):
                    chunk = meta.row_group(group).column(column)
                    fh.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
                    fh.write(b"\xff" * chunk.total_compressed_size)
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with pytest.raises(OSError):  # the file really is damaged there
            pq.read_table(data)
        second = run(job)
        assert second.returncode == 0, second.stderr
        assert rows_sent(fp) == Counter(texts)
    parts = read_parts(tmp_path / "out")
    assert parts.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(60)]
    assert_vectors_exact(parts, texts, 8)


def change_model(tmp_path: Path, fp: FakeProvider) -> tuple[Path, list[str]]:
    job = write_job(tmp_path, [provider_entry(fp, model=MODEL)], embedding={"model": "text-embedding-3-large"})
    return job, sample_texts(30)


def change_text_column(tmp_path: Path, fp: FakeProvider) -> tuple[Path, list[str]]:
    return write_job(tmp_path, [provider_entry(fp)], text_column="summary"), sample_texts(30, prefix="summary")


def change_input_file(tmp_path: Path, fp: FakeProvider) -> tuple[Path, list[str]]:
    texts = sample_texts(31, prefix="rewritten document")
    write_parquet(tmp_path / "data.parquet", with_summary(docs_table(texts)))
    stat = (tmp_path / "data.parquet").stat()
    os.utime(tmp_path / "data.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return write_job(tmp_path, [provider_entry(fp)]), texts


def with_summary(table: pa.Table) -> pa.Table:
    n = table.num_rows
    return table.append_column("summary", pa.array(sample_texts(n, prefix="summary"), pa.string()))


@pytest.mark.parametrize("change", [change_model, change_text_column, change_input_file],
                         ids=["model", "text_column", "input_contents"])
def test_changing_what_the_vectors_are_is_refused_unless_restart(tmp_path: Path, change: Any) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", with_summary(docs_table(texts)))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        first = run(job, "--limit", "10")
        assert first.returncode == 0, first.stderr
        before = fp.count()

        job, new_texts = change(tmp_path, fp)
        refused = run(job)
        assert refused.returncode == 2
        assert "--restart" in only_line(refused.stderr)
        assert fp.count() == before  # refused before any request

        restarted = run(job, "--restart")
        assert restarted.returncode == 0, restarted.stderr
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.num_rows == len(new_texts)
    assert_vectors_exact(parts, new_texts, 8)
    model = pq.read_schema(part_files(out)[0]).metadata[b"pipeline.model"].decode()
    assert model == ("text-embedding-3-large" if change is change_model else MODEL)


def test_changing_how_rows_are_sent_keeps_the_progress(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as fp1, FakeProvider(dim=8) as fp2:
        job = write_job(tmp_path, [provider_entry(fp1)])
        assert run(job, "--limit", "10").returncode == 0
        job = write_job(tmp_path, [provider_entry(fp2, name="other", max_concurrency=2)],
                        retry={"max_attempts": 5, "initial_backoff_s": 0.01, "max_backoff_s": 0.02})
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp1) == Counter(texts[:10])
        assert rows_sent(fp2) == Counter(texts[10:])
        assert probe_requests(fp2) == 1  # the new provider is checked against the output's vectors
    assert_vectors_exact(read_parts(out), texts, 8)


# ------------------------------------------------------------------ bad jobs
def test_missing_column_exits_2_with_one_error_line_naming_it(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(5)))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], text_column="no_such_column")
        result = run(job)
        assert fp.count() == 0
    assert result.returncode == 2
    assert "no_such_column" in only_line(result.stderr)
    assert result.stdout == ""


def test_unset_env_var_exits_2_naming_it(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(5)))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        result = run(job, key=None)
        assert fp.count() == 0
    assert result.returncode == 2
    assert KEY_VAR in only_line(result.stderr)


def test_wrong_key_exits_1_naming_the_provider_and_never_writes_the_key(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(12)))
    out = tmp_path / "out"
    with FakeProvider(dim=8, api_key="sk-the-servers-own-key") as fp:
        job = write_job(tmp_path, [provider_entry(fp, name="relay-a")])
        result = run(job, key=SECRET)
        assert fp.count() == 1  # an unusable provider is not asked again
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "relay-a" in line and "invalid_api_key" in line
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert (out / "_manifest.json").exists() and (out / "_summary.json").exists()
    assert not (out / "_SUCCESS").exists()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert summary(out)["providers"]["relay-a"]["state"] == "unusable"


def test_validate_exits_0_on_a_good_job_without_calling_the_provider(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(5)))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        result = run_cli("validate", str(job))
        assert fp.count() == 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:") and result.stderr == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing_column", "unset_var", "changed_job", "no_input"])
def test_validate_exits_2_on_a_bad_job_with_one_line_naming_the_problem(tmp_path: Path, problem: str) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(10)))
    key: str | None = KEY
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        if problem == "missing_column":
            job, named = write_job(tmp_path, [provider_entry(fp)], text_column="nope"), "'nope'"
        elif problem == "unset_var":
            key, named = None, KEY_VAR
        elif problem == "changed_job":
            assert run(job, "--limit", "3").returncode == 0
            job, named = write_job(tmp_path, [provider_entry(fp)], embedding={"too_long": "skip"}), "--restart"
        else:
            job, named = write_job(tmp_path, [provider_entry(fp)], input_path="missing/*.parquet"), "missing"
        requests = fp.count()
        result = run_cli("validate", str(job), key=key)
        assert fp.count() == requests
    assert result.returncode == 2
    assert named in only_line(result.stderr)


def test_status_shows_not_started_then_rows_done_and_complete(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(20)))
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        before = run_cli("status", str(job), "--json", key=None)
        assert before.returncode == 0, before.stderr
        assert json.loads(before.stdout)["state"] == "not started"

        assert run(job, "--limit", "10").returncode == 0
        middle = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert middle["state"] == "incomplete"
        assert middle["rows_done"] == 10 and middle["units_done"] == 1 and middle["partial_units"] == 1

        assert run(job).returncode == 0
        requests = fp.count()
        after = run_cli("status", str(job), "--json", key=None)
        text = run_cli("status", str(job), key=None)
        assert fp.count() == requests  # no API call
    report = json.loads(after.stdout)
    assert report["state"] == "complete"
    assert report["rows_done"] == 20 and report["rows_embedded"] == 20 and report["total_rows"] == 20
    assert text.returncode == 0 and "complete" in text.stdout and "20/20" in text.stdout


def test_successive_limits_extend_the_cut_part_and_each_row_is_sent_once(tmp_path: Path) -> None:
    texts = sample_texts(30)
    texts[8] = "   "  # a reject inside the part that is cut, before the cut
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)])
        for limit in ("10", "12", "9"):
            result = run(job, "--limit", limit)
            assert result.returncode == 0, result.stderr
            assert not (out / "_SUCCESS").exists()
        assert rows_sent(fp) == Counter(t for i, t in enumerate(texts[:12]) if i != 8)
        final = run(job)
        assert final.returncode == 0, final.stderr
        assert rows_sent(fp) == Counter(t for i, t in enumerate(texts) if i != 8)
    assert (out / "_SUCCESS").exists()
    parts = read_parts(out)
    assert parts.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(30)]
    assert_vectors_exact(parts, [None if i == 8 else t for i, t in enumerate(texts)], 8)
    assert [(r["id"], r["reason"]) for r in rejects(out)] == [("id-0008", "empty")]
    assert summary(out)["job"]["rows_rejected"] == {"empty": 1}
    assert summary(out)["job"]["rows_done"] == 30



@pytest.mark.parametrize("relay", [dict(base64="reject"), dict(base64="ignore"), dict(dialect="ctyun"),
                                   dict(shuffle=True)], ids=["rejects_base64", "ignores_base64", "ctyun", "shuffled"])
def test_relay_dialects_give_the_same_exact_output(tmp_path: Path, relay: dict[str, Any]) -> None:
    texts = sample_texts(15)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8, **relay) as fp:
        job = write_job(tmp_path, [provider_entry(fp, max_concurrency=1)])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(texts)
        formats = [r["encoding_format"] for r in fp.requests]
    if relay.get("base64") == "reject":
        assert formats[0] == "base64" and set(formats[1:]) == {"float"}  # asked once, then remembered
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, 8)


def test_flaky_provider_is_retried_and_no_corrupt_answer_reaches_the_output(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    failures = ["500", "drop", "429:0.05", "truncated", "count", "nan", "dimlen", "error200:500001", "502"]
    script = ["ok"] + [d for f in failures for d in (f, "ok")]
    with FakeProvider(dim=8, script=script) as fp:
        job = write_job(tmp_path, [provider_entry(fp, max_concurrency=1)],
                        # two parts in flight share the script: one request may meet every failure
                        retry={"max_attempts": len(failures) + 1, "initial_backoff_s": 0.01, "max_backoff_s": 0.02})
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(texts)
        assert fp.count() == 1 + expected_requests(30) + len(failures)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), texts, 8)
    s = summary(out)
    assert s["run"]["retries"] == len(failures)
    assert s["providers"]["fake"]["rate_limited"] == 1


def test_bad_key_provider_is_dropped_after_one_request_and_the_other_does_the_job(tmp_path: Path) -> None:
    texts = sample_texts(21)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8, api_key="sk-not-this-one") as bad, FakeProvider(dim=8) as good:
        job = write_job(tmp_path, [provider_entry(bad, name="first", priority=0, max_concurrency=1),
                                   provider_entry(good, name="second", priority=1)])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert bad.count() == 1
        assert rows_sent(good) == Counter(texts)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), texts, 8)
    providers = summary(out)["providers"]
    assert providers["first"]["state"] == "unusable" and "invalid_api_key" in providers["first"]["reason"]
    assert providers["second"]["requests"] == 1 + expected_requests(21)


def test_parquet_and_csv_inputs_together_keep_file_order_and_row_numbers(tmp_path: Path) -> None:
    texts = sample_texts(25)
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "a.parquet", docs_table(texts[:10]))
    write_csv(tmp_path / "in" / "b.csv", docs_table(texts[10:]))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], input_path="in/*", id_column=None)
        assert run(job, "--limit", "12").returncode == 0  # cuts the CSV's first part
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(texts)
    # units never cross a file: 7 + 3 rows from a.parquet, 7 + 7 + 1 from b.csv
    assert [pq.read_metadata(p).num_rows for p in part_files(out)] == [7, 3, 7, 7, 1]
    parts = read_parts(out)
    assert parts.column("row_id").to_pylist() == list(range(25))
    assert_vectors_exact(parts, texts, 8)


def test_a_run_does_not_import_pandas_yet_leaves_it_importable(tmp_path: Path) -> None:
    """pyarrow imports all of pandas at its first array to learn whether it
    exists: start-up CPU every run, shard and Airflow task would pay."""
    pytest.importorskip("pandas")
    texts = sample_texts(30)
    with FakeProvider(dim=8) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], input_path=write_parquet(tmp_path / "d.parquet", docs_table(texts)).name)
        script = (
            "import runpy, sys\n"
            f"sys.argv = ['pipeline', 'run', {str(job)!r}, '--no-progress']\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
            "except SystemExit as done:\n    code = done.code\n"
            "print('pandas imported:', 'pandas' in sys.modules, 'exit:', code)\n"
            "import pandas, pyarrow.parquet as pq\n"
            f"print('rows:', len(pq.read_table({str(tmp_path / 'out')!r}).to_pandas()))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pandas imported: False exit: 0" in result.stdout
    assert "rows: 30" in result.stdout
