"""Inputs and outputs on an object store: a real S3-compatible server (moto's
server mode, a separate process: `moto[server]` from the test extra) on 127.0.0.1, reached over HTTP by pyarrow's
S3 client exactly as a user's run reaches AWS or MinIO.

A throttling proxy in front of it can hold one key's upload open, so a test
can SIGKILL a run in the middle of writing a part.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from aiohttp import ClientSession, web

from conftest import (
    FAST_RETRY,
    MODEL,
    REPO,
    assert_vectors_exact,
    cli_env,
    docs_table,
    error_lines,
    provider_entry,
    rows_sent,
    run_cli,
    sample_texts,
)
from fakeprovider import FakeProvider, vector_for
from pipeline.checkpoint.columns import read_ranges
from pipeline.config.job import StorageConfig
from pipeline.core.quantize import Int8Ranges, to_int8
from pipeline.storage.fs import glob_regex
from pipeline.checkpoint.manifest import Checkpoint
from pipeline.storage.objectstore import ObjectOutput

DIM = 8
ACCESS_KEY = "AKIATESTS3PIPELINE"  # moto accepts any key; this one must never be printed
SECRET_KEY = "s3cr3t-never-printed"
SERVER_START_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server as its own process: it outlives a SIGKILLed client."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(10)


def _aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    _fs(s3_endpoint, create=True).create_dir(name)
    return name


def _fs(endpoint: str, *, create: bool = False) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                             endpoint_override=endpoint, scheme="http", allow_bucket_creation=create)


def _put_parquet(fs: pafs.FileSystem, key: str, table: pa.Table) -> None:
    with fs.open_output_stream(key) as fh:
        pq.write_table(table, fh, row_group_size=11)


def _put_csv(fs: pafs.FileSystem, key: str, table: pa.Table) -> None:
    with fs.open_output_stream(key) as fh:
        pacsv.write_csv(table, fh)


def _keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _committed(endpoint: str, prefix: str) -> set[int]:
    """The units the output's checkpoint lists as committed, read as every reader reads it."""
    options = StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY)
    checkpoint = Checkpoint.read(ObjectOutput(f"s3://{prefix}", options))
    return set(checkpoint.ledger.committed_seqs()) if checkpoint is not None else set()


def _read_parts(fs: pafs.FileSystem, prefix: str) -> pa.Table:
    parts = [k for k in _keys(fs, prefix) if re.fullmatch(r"part-\d{5}\.parquet", k)]
    assert parts, f"no part objects under {prefix}"
    tables = []
    for key in parts:
        with fs.open_input_file(f"{prefix}/{key}") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def _read_json(fs: pafs.FileSystem, key: str) -> Any:
    with fs.open_input_stream(key) as fh:
        return json.loads(fh.read())


def _job(directory: Path, fp: FakeProvider, input_path: Any, output: str, *, rows_per_part: int = 7,
         storage: dict[str, Any] | None = None, max_concurrency: int = 4, timeout_s: float = 5) -> Path:
    job = {
        "name": "s3-job",
        "input": {"path": input_path, "text_column": "body", "id_column": "doc_id", "keep_columns": ["title"]},
        "output": {"path": output, "rows_per_part": rows_per_part, **({"storage": storage} if storage else {})},
        "embedding": {"model": MODEL, "dimensions": DIM},
        "batching": {"max_inputs_per_request": 5},
        "providers": [provider_entry(fp, max_concurrency=max_concurrency, timeout_s=timeout_s)],
        "retry": FAST_RETRY,
    }
    path = directory / "job.yaml"
    path.write_text(json.dumps(job), encoding="utf-8")  # JSON is YAML
    return path


def _start(job: Path, env_extra: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
        cwd=REPO, env=cli_env(env_extra=env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# ------------------------------------------------------------------ reading and writing


def test_parquet_and_csv_inputs_from_s3_by_key_prefix_and_glob_embedded_into_s3(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(40)
    chunks = [texts[0:9], texts[9:20], texts[20:26], texts[26:33], texts[33:40]]
    tables = [docs_table(c, ids=[f"id-{texts.index(t):04d}" for t in c]) for c in chunks]
    _put_parquet(fs, f"{bucket}/in/one.parquet", tables[0])  # a key
    _put_parquet(fs, f"{bucket}/dir/a.parquet", tables[1])  # a prefix: its .parquet and .csv objects, sorted
    _put_csv(fs, f"{bucket}/dir/sub/b.csv", tables[2])
    _put_csv(fs, f"{bucket}/dir/_hidden.csv", docs_table(["must not be read"]))
    _put_parquet(fs, f"{bucket}/glob/2024/x.parquet", tables[3])  # a glob
    _put_parquet(fs, f"{bucket}/glob/2025/y.parquet", tables[4])
    _put_parquet(fs, f"{bucket}/glob/2025/skip.txt.parquet.bak", tables[4])
    inputs = [f"s3://{bucket}/in/one.parquet", f"s3://{bucket}/dir/", f"s3://{bucket}/glob/*/*.parquet"]

    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, inputs, f"s3://{bucket}/out/job")
        result = run_cli("run", str(job), "--no-progress", env_extra=_aws_env(s3_endpoint))
        assert result.returncode == 0, result.stderr
        assert rows_sent(fp) == Counter(texts)  # every row sent once

        out = _read_parts(fs, f"{bucket}/out/job")
        assert out.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(40)]
        assert_vectors_exact(out, texts, DIM)
        keys = _keys(fs, f"{bucket}/out/job")
        assert "_SUCCESS" in keys and "_summary.json" in keys
        manifest = _read_json(fs, f"{bucket}/out/job/_manifest.json")
        assert sorted(int(s) for s in manifest["units"]) == list(range(len(manifest["units"])))
        assert [f["path"] for f in manifest["fingerprint"]["inputs"]] == [
            f"s3://{bucket}/in/one.parquet", f"s3://{bucket}/dir/a.parquet", f"s3://{bucket}/dir/sub/b.csv",
            f"s3://{bucket}/glob/2024/x.parquet", f"s3://{bucket}/glob/2025/y.parquet",
        ]
        assert not any(".tmp." in k for k in keys)

        # Done is done: a rerun sends nothing; status reads the object store.
        again = run_cli("run", str(job), "--no-progress", env_extra=_aws_env(s3_endpoint))
        assert again.returncode == 0 and rows_sent(fp) == Counter(texts), again.stderr
        status = run_cli("status", str(job), key=None, env_extra=_aws_env(s3_endpoint))
        assert status.returncode == 0 and "complete" in status.stdout, status.stderr

        # A changed input object is a changed job (size + last-modified).
        _put_parquet(fs, f"{bucket}/dir/a.parquet", docs_table(texts[9:19]))
        changed = run_cli("run", str(job), "--no-progress", env_extra=_aws_env(s3_endpoint))
        assert changed.returncode == 2, changed.stderr
        assert "dir/a.parquet changed" in error_lines(changed.stderr)[0]


def test_local_input_to_s3_output_with_endpoint_from_the_job_file(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    texts = sample_texts(12)
    pacsv.write_csv(docs_table(texts), tmp_path / "data.csv")
    env = {k: v for k, v in _aws_env(s3_endpoint).items() if k != "AWS_ENDPOINT_URL"}
    env["MY_S3_KEY"], env["MY_S3_SECRET"] = ACCESS_KEY, SECRET_KEY
    storage = {"endpoint_url": s3_endpoint, "region": "us-east-1",
               "access_key_id": "${MY_S3_KEY}", "secret_access_key": "${MY_S3_SECRET}"}
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, "data.csv", f"s3://{bucket}/emb", storage=storage)
        result = run_cli("run", str(job), "--no-progress", env_extra=env)
    assert result.returncode == 0, result.stderr
    assert_vectors_exact(_read_parts(_fs(s3_endpoint), f"{bucket}/emb"), texts, DIM)
    assert ACCESS_KEY not in result.stderr + result.stdout and SECRET_KEY not in result.stderr + result.stdout


def test_int8_ranges_on_s3_are_recorded_once_and_every_part_and_rerun_uses_them(tmp_path: Path, s3_endpoint: str,
                                                                                bucket: str) -> None:
    texts = sample_texts(30)
    pacsv.write_csv(docs_table(texts), tmp_path / "data.csv")
    env = _aws_env(s3_endpoint)
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, "data.csv", f"s3://{bucket}/emb", rows_per_part=6)
        doc = json.loads(job.read_text())
        doc["output"]["vectors"] = [{"column": "q", "dtype": "int8"}]
        job.write_text(json.dumps(doc))
        first = run_cli("run", str(job), "--no-progress", "--limit", "4", env_extra=env)
        assert first.returncode == 0, first.stderr
        rest = run_cli("run", str(job), "--no-progress", env_extra=env)
        assert rest.returncode == 0, rest.stderr
    fs = _fs(s3_endpoint)
    [ranges_key] = [k for k in _keys(fs, f"{bucket}/emb") if k.startswith("_manifest.d/int8-ranges.q.")]
    recorded = Int8Ranges.from_json(_read_json(fs, f"{bucket}/emb/{ranges_key}"))
    assert recorded.rows == 4  # calibrated by the --limit run's answers, kept by the next run
    table = _read_parts(fs, f"{bucket}/emb")
    parts = [k for k in _keys(fs, f"{bucket}/emb") if re.fullmatch(r"part-\d{5}\.parquet", k)]
    for key in parts:
        with fs.open_input_file(f"{bucket}/emb/{key}") as fh:
            assert read_ranges(pq.read_schema(fh).metadata, "q") == recorded
    assert_vectors_exact(table, texts, DIM)
    codes = [to_int8(vector_for(t, DIM)[None, :], recorded)[0].tolist() for t in texts]
    assert table.column("q").to_pylist() == codes


def test_limit_on_s3_keeps_a_cut_short_part_that_a_later_run_finishes(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(20)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(texts))
    env = _aws_env(s3_endpoint)
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/in/data.parquet", f"s3://{bucket}/out", rows_per_part=7)
        smoke = run_cli("run", str(job), "--no-progress", "--limit", "10", env_extra=env)
        assert smoke.returncode == 0, smoke.stderr
        assert "_SUCCESS" not in _keys(fs, f"{bucket}/out")
        assert _read_parts(fs, f"{bucket}/out").num_rows == 10  # part 1 holds 3 of its 7 rows
        rest = run_cli("run", str(job), "--no-progress", env_extra=env)
        assert rest.returncode == 0, rest.stderr
        assert rows_sent(fp) == Counter(texts)  # the 10 rows were not sent again
    out = _read_parts(fs, f"{bucket}/out")
    assert out.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(20)]
    assert_vectors_exact(out, texts, DIM)
    assert not [k for k in _keys(fs, f"{bucket}/out") if k.startswith("_partial.d/")]


# ------------------------------------------------------------------ bad storage: one line, exit 2


@pytest.mark.parametrize("case", ["missing_bucket", "missing_input", "unreachable", "secret_in_file"])
def test_storage_problems_are_one_line_exit_2_before_any_request(
    tmp_path: Path, s3_endpoint: str, bucket: str, case: str
) -> None:
    fs = _fs(s3_endpoint)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(sample_texts(5)))
    env = _aws_env(s3_endpoint)
    inputs, output, storage = f"s3://{bucket}/in/data.parquet", f"s3://{bucket}/out", None
    if case == "missing_bucket":
        output = "s3://no-such-bucket-here/out"
    elif case == "missing_input":
        inputs = f"s3://{bucket}/in/nothing-*.parquet"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, inputs, output, storage=storage)
        if case == "secret_in_file":
            raw = json.loads(job.read_text())
            raw["output"]["storage"] = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}
            job.write_text(json.dumps(raw))
        result = run_cli("run", str(job), "--no-progress", env_extra=env)
        assert fp.count() == 0, "no request may be sent before the storage is known good"
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = {"missing_bucket": "no-such-bucket-here", "missing_input": "matches no object",
                "unreachable": "input.path", "secret_in_file": "output.storage.access_key_id"}[case]
    assert expected in lines[0], lines[0]
    assert ACCESS_KEY not in result.stderr and SECRET_KEY not in result.stderr


# ------------------------------------------------------------------ SIGKILL during an upload


def kill_during_upload(job: Path, env: dict[str, str], s3_endpoint: str, path_pattern: str) -> subprocess.Popen[str]:
    """Run the job behind a proxy that holds the upload matching `path_pattern`
    open, and SIGKILL it while that upload is under way."""
    with StallingProxy(s3_endpoint, path_pattern) as proxy:
        proc = _start(job, {**env, "AWS_ENDPOINT_URL": proxy.endpoint})
        try:
            if not proxy.stalled.wait(60):
                proc.kill()
                pytest.fail(f"the run never made the upload {path_pattern}: {proc.communicate()[1]}")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(30)
    return proc


class StallingProxy:
    """An HTTP proxy to the S3 server that holds forever any upload whose
    path matches `stall`, and says when one arrived."""

    def __init__(self, upstream: str, stall: str) -> None:
        self.upstream = upstream
        self.stall = re.compile(stall)
        self.stalled = threading.Event()
        self.port = _free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        self._released = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)  # the held upload is dropped at exit
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        self._released.set()
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method in ("PUT", "POST") and self.stall.search(request.path):
            self.stalled.set()
            await self._released.wait()  # the client is killed meanwhile
            raise web.HTTPServiceUnavailable()
        skip = {"host", "content-length", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body) as upstream:
            data = await upstream.read()
            drop = skip | {"content-encoding"} if request.method != "HEAD" else {"transfer-encoding"}  # HEAD: the size
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in drop}
            return web.Response(status=upstream.status, headers=out, body=data)


@pytest.mark.timeout(180)
def test_sigkill_while_a_part_uploads_then_resume_gives_every_row_once_in_order(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(60)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(texts))
    prefix = f"{bucket}/out"
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/in/data.parquet", f"s3://{prefix}", rows_per_part=6,
                   max_concurrency=1)
        kill_during_upload(job, _aws_env(s3_endpoint), s3_endpoint, rf"/{prefix}/part-00003\.parquet$")
        # Killed mid-upload: part 3 is not there at all, and the manifest does not list it.
        keys = _keys(fs, prefix)
        assert "part-00003.parquet" not in keys
        units = _committed(s3_endpoint, prefix)
        assert 3 not in units and "_SUCCESS" not in keys
        sent_before = rows_sent(fp)

        resumed = _start(job, _aws_env(s3_endpoint))
        _, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, err

        out = _read_parts(fs, prefix)
        assert out.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(60)]  # once each, in order
        assert_vectors_exact(out, texts, DIM)
        resent = rows_sent(fp) - sent_before
        committed = {t for seq in units for t in texts[int(seq) * 6:(int(seq) + 1) * 6]}
        assert not set(resent) & committed, "rows committed before the kill were sent again"
        assert _keys(fs, prefix).count("part-00003.parquet") == 1


# ------------------------------------------------------------------ shards


@pytest.mark.timeout(180)
def test_three_shards_at_once_into_one_s3_output_lose_no_commit(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(90)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(texts))
    prefix = f"{bucket}/sharded"
    env = _aws_env(s3_endpoint)
    with FakeProvider(dim=DIM, latency_s=0.02) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/in/data.parquet", f"s3://{prefix}", rows_per_part=5)
        procs = [_start(job, env, "--shard", f"{k}/3") for k in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert rows_sent(fp) == Counter(texts)
        status = run_cli("status", str(job), "--json", key=None, env_extra=env)

    keys = _keys(fs, prefix)
    assert "_SUCCESS" in keys
    snapshots = [f"_manifest.d/shard-{k}-of-3.json" for k in range(3)]
    named = {s["name"] for rel in snapshots for s in _read_json(fs, f"{prefix}/{rel}")["segments"]}
    assert named and all(name.startswith("_manifest.d/segments/shard-") for name in named)
    # No record left behind, and no segment that no snapshot names: each shard's snapshot and its segments only.
    assert sorted(k for k in keys if k.startswith("_manifest.d/")) == sorted([*snapshots, *named])
    whole = _read_json(fs, f"{prefix}/_manifest.json")  # the last shard to finish folds every shard's progress in
    assert sorted(int(s) for s in whole["units"]) == list(range(18))
    out = _read_parts(fs, prefix)
    assert out.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(90)]
    assert_vectors_exact(out, texts, DIM)
    report = json.loads(status.stdout)
    assert report["state"] == "complete" and report["running"] is False  # every lease released
    assert {tuple(s["shard"]): s["units_done"] for s in report["shards"]} == {(0, 3): 6, (1, 3): 6, (2, 3): 6}


# ------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("b/in/*.parquet", "b/in/x.parquet", True),
        ("b/in/*.parquet", "b/in/sub/x.parquet", False),  # * stays within one name
        ("b/**/x.parquet", "b/x.parquet", True),
        ("b/**/x.parquet", "b/a/c/x.parquet", True),
        ("b/in/part-?.csv", "b/in/part-1.csv", True),
        ("b/in/part-?.csv", "b/in/part-12.csv", False),
        ("b/in/[ab].csv", "b/in/a.csv", True),
        ("b/in/[!ab].csv", "b/in/a.csv", False),
        ("b/in.v2/*.csv", "b/inXv2/a.csv", False),  # dots are literal
    ],
)
def test_glob_patterns_on_object_keys_read_like_local_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) is matches


def test_a_second_writer_of_a_shard_on_s3_is_refused_while_the_first_runs(tmp_path: Path, s3_endpoint: str,
                                                                           bucket: str) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(60)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(texts))
    env = _aws_env(s3_endpoint)
    # The first run's third request (after its probe and a part) stalls: it holds its lease meanwhile.
    with FakeProvider(dim=DIM, script=["ok", "ok", "stall:15"]) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/in/data.parquet", f"s3://{bucket}/out", rows_per_part=5,
                   max_concurrency=1, timeout_s=60)
        first = _start(job, env, "--shard", "0/2")
        deadline = time.monotonic() + 30
        while fp.count() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        status = json.loads(run_cli("status", str(job), "--json", key=None, env_extra=env).stdout)
        others = [run_cli("run", str(job), "--no-progress", *args, env_extra=env)
                  for args in (["--shard", "0/2"], [])]  # the same shard; an unsharded run
        sibling = _start(job, env, "--shard", "1/2")  # another shard may run beside it
        for proc in (first, sibling):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    assert status["running"] is True and [s["running"] for s in status["shards"]] == [True, False]
    for other in others:
        assert other.returncode == 1, other.stderr
        (line,) = error_lines(other.stderr)
        assert "is in use" in line and "lease lapses" in line
    assert rows_sent(fp) == Counter(texts)  # the refused runs sent nothing
    assert_vectors_exact(_read_parts(fs, f"{bucket}/out"), texts, DIM)


@pytest.mark.parametrize("expires_in_s, refused", [(3600, True), (-1, False)])
def test_a_lease_from_another_host_holds_until_it_lapses(tmp_path: Path, s3_endpoint: str, bucket: str,
                                                         expires_in_s: float, refused: bool) -> None:
    fs = _fs(s3_endpoint)
    texts = sample_texts(10)
    _put_parquet(fs, f"{bucket}/in/data.parquet", docs_table(texts))
    lease = {"holder": "worker-7:4242", "host": "worker-7", "pid": 4242, "token": "x",
             "expires_at": time.time() + expires_in_s}
    with fs.open_output_stream(f"{bucket}/out/_run.lease") as fh:
        fh.write(json.dumps(lease).encode())
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, f"s3://{bucket}/in/data.parquet", f"s3://{bucket}/out")
        result = run_cli("run", str(job), "--no-progress", env_extra=_aws_env(s3_endpoint))
        sent = rows_sent(fp)
    if refused:
        assert result.returncode == 1 and "worker-7:4242 is writing to it" in result.stderr
        assert not sent
    else:
        assert result.returncode == 0, result.stderr
        assert sent == Counter(texts) and "_run.lease" not in _keys(fs, f"{bucket}/out")
