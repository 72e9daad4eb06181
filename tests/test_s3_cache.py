"""The vector cache on an object store (`cache: s3://bucket/prefix`): real
runs against moto's S3 server (see test_s3.py) and the loopback FakeProvider,
plus the segmented cache driven in-process for rotation and compaction."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest

from conftest import (
    FAST_RETRY,
    MODEL,
    assert_vectors_exact,
    docs_table,
    error_lines,
    provider_entry,
    read_parts,
    rows_sent,
    run_cli,
    sample_texts,
    write_parquet,
)
from fakeprovider import FakeProvider, vector_for
from pipeline.cache import segments
from pipeline.cache.vectors import text_keys
from pipeline.config.job import StorageConfig
from pipeline.cache.segments import SegmentedCache
from test_s3 import ACCESS_KEY, SECRET_KEY, _aws_env, _free_port, _fs, _keys, _start, bucket, kill_during_upload, s3_endpoint  # noqa: F401

DIM = 8


def _job(directory: Path, fp: FakeProvider, cache: Any, *, data: str = "data.parquet", output: str = "out",
         name: str = "job.yaml") -> Path:
    job = {
        "name": "s3-cache-job",
        "input": {"path": data, "text_column": "body", "id_column": "doc_id"},
        "output": {"path": output, "rows_per_part": 10},
        "embedding": {"model": MODEL, "dimensions": DIM},
        "batching": {"max_inputs_per_request": 5},
        "providers": [provider_entry(fp)],
        "retry": FAST_RETRY,
        "cache": cache,
    }
    path = directory / name
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


def _run(job: Path, env: dict[str, str], *args: str) -> Any:
    return run_cli("run", str(job), "--no-progress", *args, env_extra=env)


def _segments(fs: pafs.FileSystem, bucket: str) -> list[str]:
    return [k for k in _keys(fs, f"{bucket}/cache") if k.startswith("segments/")]


def _storage(endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                         secret_access_key=SECRET_KEY)


def _assert_cache_right(cache: SegmentedCache, texts: list[str]) -> int:
    """Every vector the cache holds for these texts is the one paid for; how many it holds."""
    keys = text_keys(texts, MODEL, DIM)
    found = cache.get(keys, DIM)
    for text, key in zip(texts, keys):
        if key in found:
            assert np.array_equal(found[key], vector_for(text, DIM)), f"wrong cached vector for {text!r}"
    return len(found)


def test_s3_cache_rerun_sends_nothing_and_a_backfill_sends_only_changed_rows(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    env = _aws_env(s3_endpoint)
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/cache")
        first = _run(job, env)
        assert first.returncode == 0, first.stderr
        assert rows_sent(fp) == Counter(texts)
    assert len(_segments(_fs(s3_endpoint), bucket)) == 1  # uploaded at close
    assert not list(tmp_path.glob("**/*.sqlite3*")), "the cache must not stay on local disk"

    with FakeProvider(dim=DIM) as fp:  # a new provider: it has been sent nothing
        job = _job(tmp_path, fp, f"s3://{bucket}/cache", output="out2")
        again = _run(job, env, "--restart")
        assert again.returncode == 0, again.stderr
        assert rows_sent(fp) == Counter()
        assert_vectors_exact(read_parts(tmp_path / "out2"), texts, DIM)
        assert json.loads((tmp_path / "out2" / "_summary.json").read_text())["run"]["rows_from_cache"] == 30

    changed = texts[:10] + [t + " (edited)" for t in texts[10:15]] + texts[15:] + sample_texts(5, prefix="new")
    write_parquet(tmp_path / "data.parquet", docs_table(changed))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/cache", output="out3")
        backfill = _run(job, env)
        assert backfill.returncode == 0, backfill.stderr
        assert rows_sent(fp) == Counter(changed[10:15] + changed[30:])
    assert_vectors_exact(read_parts(tmp_path / "out3"), changed, DIM)
    assert len(_segments(_fs(s3_endpoint), bucket)) == 2  # the first run's, and the backfill's 10 new vectors


def test_cache_mapping_with_its_own_storage_keys(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    env = {"MY_KEY": ACCESS_KEY, "MY_SECRET": SECRET_KEY}  # no AWS_* variables at all
    texts = sample_texts(12)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    cache = {"path": f"s3://{bucket}/cache", "storage": {"endpoint_url": s3_endpoint, "region": "us-east-1",
                                                          "access_key_id": "${MY_KEY}", "secret_access_key": "${MY_SECRET}"}}
    with FakeProvider(dim=DIM) as fp:
        first = _run(_job(tmp_path, fp, cache), env)
        assert first.returncode == 0, first.stderr
        again = _run(_job(tmp_path, fp, cache, output="out2"), env)
        assert again.returncode == 0, again.stderr
        assert rows_sent(fp) == Counter(texts)  # the second run took every vector from the cache
    for out in (first, again):
        assert ACCESS_KEY not in out.stderr + out.stdout and SECRET_KEY not in out.stderr + out.stdout


@pytest.mark.timeout(180)
def test_two_shards_at_once_write_separate_segments_and_a_later_run_finds_every_vector(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    env = _aws_env(s3_endpoint)
    texts = sample_texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM, latency_s=0.02) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/cache")
        procs = [_start(job, env, "--shard", f"{k}/2") for k in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert rows_sent(fp) == Counter(texts)
    names = _segments(_fs(s3_endpoint), bucket)
    assert len(names) == 2 and len({n.rsplit("-", 3)[0] for n in names}) == 2  # one per process
    with FakeProvider(dim=DIM) as fp:
        later = _run(_job(tmp_path, fp, f"s3://{bucket}/cache", output="later"), env)
        assert later.returncode == 0, later.stderr
        assert rows_sent(fp) == Counter()
    assert_vectors_exact(read_parts(tmp_path / "later"), texts, DIM)


@pytest.mark.timeout(180)
def test_a_run_killed_while_uploading_its_segment_leaves_only_whole_segments_and_right_vectors(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    env = _aws_env(s3_endpoint)
    old, new = sample_texts(20), sample_texts(20, prefix="new")
    write_parquet(tmp_path / "data.parquet", docs_table(old))
    with FakeProvider(dim=DIM) as fp:
        assert _run(_job(tmp_path, fp, f"s3://{bucket}/cache"), env).returncode == 0
    before = _segments(_fs(s3_endpoint), bucket)
    write_parquet(tmp_path / "data.parquet", docs_table(old + new))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/cache", output="killed")
        proc = kill_during_upload(job, env, s3_endpoint, rf"/{bucket}/cache/segments/")
        assert rows_sent(fp) == Counter(new)  # the old texts came from the cache
    assert _segments(_fs(s3_endpoint), bucket) == before  # the cut-off upload left nothing
    left = list(Path(tempfile.gettempdir()).glob(f"pipeline-cache-{proc.pid}-*"))
    assert left, "the killed run's download folder should still be there"

    cache = SegmentedCache(f"s3://{bucket}/cache", _storage(s3_endpoint), readonly=True)
    assert not any(folder.exists() for folder in left), "the next opener removes a killed run's temp folder"
    try:
        assert _assert_cache_right(cache, old + new) == len(old)  # the killed run's vectors were lost, no more
    finally:
        cache.close()
    with FakeProvider(dim=DIM) as fp:
        rerun = _run(_job(tmp_path, fp, f"s3://{bucket}/cache", output="rerun"), env)
        assert rerun.returncode == 0, rerun.stderr
        assert rows_sent(fp) == Counter(new)
    assert_vectors_exact(read_parts(tmp_path / "rerun"), old + new, DIM)


def test_segments_upload_every_n_vectors_and_compact_past_max_segments_keeping_every_entry(
    s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "UPLOAD_EVERY_VECTORS", 10)
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 3)
    uri, options = f"s3://{bucket}/cache", _storage(s3_endpoint)
    texts = sample_texts(45)
    keys = text_keys(texts, MODEL, DIM)
    vectors = np.stack([vector_for(t, DIM) for t in texts])

    cache = SegmentedCache(uri, options)
    for start in range(0, 25, 5):  # 25 vectors: two segments go up while writing, the rest at close
        cache.put(keys[start:start + 5], vectors[start:start + 5])
    assert len(_segments(_fs(s3_endpoint), bucket)) == 2
    assert _assert_cache_right(cache, texts) == 25  # the local segment is looked up too
    cache.close()
    assert len(_segments(_fs(s3_endpoint), bucket)) == 3

    cache = SegmentedCache(uri, options)  # 3 segments: not more than MAX_SEGMENTS, left alone
    assert len(cache.segment_names()) == 3
    cache.put(keys[25:35], vectors[25:35])  # two more segments: 5 in the store
    cache.put(keys[35:45], vectors[35:45])
    cache.close()
    assert len(_segments(_fs(s3_endpoint), bucket)) == 5

    cache = SegmentedCache(uri, options)  # merges the five into one
    try:
        assert len(cache.segment_names()) == 1
        assert _segments(_fs(s3_endpoint), bucket) == [f"segments/{cache.segment_names()[0]}"]
        assert _assert_cache_right(cache, texts) == 45 and cache.count() == 45
    finally:
        cache.close()
    reopened = SegmentedCache(uri, options, readonly=True)
    try:
        assert _assert_cache_right(reopened, texts) == 45
        assert reopened.get(keys[:3], DIM * 2) == {}  # a vector of another length is a miss
    finally:
        reopened.close()


def test_estimate_counts_the_hits_of_an_s3_cache(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    env = _aws_env(s3_endpoint)
    texts = sample_texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts[:12]))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/cache")
        assert _run(job, env).returncode == 0
        write_parquet(tmp_path / "data.parquet", docs_table(texts))
        estimate = run_cli("estimate", str(job), "--json", env_extra=env)
    assert estimate.returncode == 0, estimate.stderr
    report = json.loads(estimate.stdout)
    assert report["cache_hits"] == 12 and report["inputs_to_send"] == 8


@pytest.mark.parametrize("case", ["missing_bucket", "unreachable"])
def test_an_unusable_s3_cache_is_one_line_exit_2_before_any_request(
    tmp_path: Path, s3_endpoint: str, bucket: str, case: str
) -> None:
    env = _aws_env(s3_endpoint)
    cache: Any = "s3://no-such-cache-bucket/cache"
    if case == "unreachable":  # nothing listens there; input and output are local
        cache = {"path": f"s3://{bucket}/cache", "storage": {"endpoint_url": f"http://127.0.0.1:{_free_port()}"}}
    write_parquet(tmp_path / "data.parquet", docs_table(sample_texts(5)))
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, cache)
        result = _run(job, env)
        assert fp.count() == 0, "no request may be sent before the cache is known good"
    estimate = run_cli("estimate", str(job), env_extra=env)  # reads only: still an error, not 0 hits
    for out in (result, estimate):
        assert out.returncode == 2, out.stderr
        lines = error_lines(out.stderr)
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert "cache: s3://" in lines[0], lines[0]
        assert SECRET_KEY not in out.stderr


def test_an_upload_failing_at_close_is_a_warning_not_an_error(
    s3_endpoint: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    texts = sample_texts(5)
    cache = SegmentedCache(f"s3://{bucket}/cache", _storage(s3_endpoint))
    cache.put(text_keys(texts, MODEL, DIM), np.stack([vector_for(t, DIM) for t in texts]))
    pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1", endpoint_override=s3_endpoint,
                      scheme="http", allow_bucket_deletion=True).delete_dir(bucket)  # the store goes away under the run
    with caplog.at_level("WARNING", logger="pipeline"):
        cache.close()
    assert "5 vectors of this run were not uploaded" in caplog.text
    assert not cache._tmp.exists()  # the download folder is removed all the same
