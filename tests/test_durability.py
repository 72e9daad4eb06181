"""What schedulers do to jobs: SIGKILL at any instant, SIGTERM while a
provider stalls, N shards on one output (one of them killed), a second
writer, an unwritable output, a full disk. Real subprocesses, real files and
a real loopback provider; every output compared row for row and bit for bit."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import (
    wait_until,
    KEY,
    KEY_VAR,
    PROBE_TEXTS,
    assert_vectors_exact,
    committed_units,
    docs_table,
    error_lines,
    part_files,
    provider_entry,
    read_checkpoint,
    read_parts,
    rows_sent,
    run_cli,
    sample_texts,
    start_run,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider
from pipeline.checkpoint import layout
from pipeline.config.job import load_job
from pipeline.errors import WorkLeftError
from pipeline.storage import LocalOutput
from pipeline.storage.output import TEMP_MARK
from pipeline.engine.runner import GRACE_S as DEFAULT_GRACE_S
from pipeline.commands.run import RunOptions
from pipeline.commands.run import run as run_job

DIM = 8
KEEP = ["title"]


# ------------------------------------------------------------------ helpers
def _texts(n: int) -> list[str]:
    """Distinct texts, with a blank one now and then (a rejected row, a null vector)."""
    texts = sample_texts(n)
    for i in range(5, n, 23):
        texts[i] = "   "
    return texts


def _expected(texts: list[str]) -> list[str | None]:
    return [None if not t.strip() else t for t in texts]


def _job(tmp_path: Path, fp: FakeProvider, *, output: str = "out", file_name: str = "job.yaml",
         rows_per_part: int = 3, per_request: int = 1, **provider: Any) -> Path:
    return write_job(
        tmp_path, [provider_entry(fp, **{"max_concurrency": 4, **provider})], keep_columns=KEEP,
        rows_per_part=rows_per_part, embedding={"dimensions": DIM},
        batching={"max_inputs_per_request": per_request}, output=output, file_name=file_name,
    )


def _committed(out: Path) -> set[int]:
    return committed_units(out)


def _lock_holder(out: Path) -> int | None:
    """The pid a run wrote into the output's lock once it took it."""
    try:
        text = (out / "_run.lock").read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _temps(out: Path) -> set[Path]:
    return {p for p in out.rglob(".*") if TEMP_MARK in p.name}


def _assert_manifest_consistent(out: Path) -> Any:
    """The checkpoint reads (snapshots whole JSON, records whole) and every part it lists is there, complete."""
    checkpoint = read_checkpoint(out)
    assert checkpoint is not None
    for record in checkpoint.ledger.records():
        part = out / checkpoint.part_name(record.seq)
        assert part.exists(), f"the checkpoint lists {part.name}, which is missing"
        assert pq.read_table(part).num_rows == record.rows, f"{part.name} is not what the checkpoint says"
    return checkpoint


def _assert_same_output(out: Path, reference: Path) -> None:
    """Same part files, same decoded tables (ids, kept columns, vectors bit for bit, metadata)."""
    names = [p.name for p in part_files(out)]
    assert names == [p.name for p in part_files(reference)]
    for name in names:
        got, want = pq.read_table(out / name), pq.read_table(reference / name)
        assert got.equals(want, check_metadata=True), f"{name} differs from the uninterrupted run's"
        bits = [np.asarray(t.column("embedding").combine_chunks().values, dtype=np.float32).view(np.uint32)
                for t in (got, want)]
        assert np.array_equal(*bits), f"{name}: vectors differ in their bits"
    assert read_parts(out).equals(read_parts(reference))
    assert pq.read_table(out / "_rejects.parquet").equals(pq.read_table(reference / "_rejects.parquet"))


# ------------------------------------------------------------------ what each kill cost
# An answer is journaled a moment after the server returns it (the client
# reads it, frees its slot, appends it): answers returned this long before a
# kill count as in flight at it, for a client scheduled late on a busy machine.
TRANSIT_S = 0.5


class Kills:
    """What the server received in each killed run, and what was in flight at each kill:
    every text re-sent after a kill must have been in flight at it."""

    def __init__(self, fp: FakeProvider) -> None:
        self.fp = fp
        self.runs: list[tuple[int, float]] = []  # (index of its first request in the log, kill instant)
        self.starts: list[int] = []  # every run's first request in the log, the last (unkilled) run's too

    def started(self) -> None:
        self.starts.append(len(self.fp.received_log))

    def killed(self, proc: subprocess.Popen[str]) -> float:
        at = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
        self.runs.append((self.starts[-1], at))
        return at

    def judge(self) -> list[tuple[set[str], set[str]]]:
        """(re-sent, in flight) per kill, once the runs after the last kill are over."""
        log = self.fp.received_log
        ends = self.starts[1:len(self.runs) + 1]
        assert len(ends) == len(self.runs), "judged before the run after the last kill started"
        out = []
        for (start, at), end in zip(self.runs, ends):
            run = [(texts, answered) for arrived, texts, answered in log[start:end]]
            in_flight = {t for texts, answered in run if answered is None or answered > at - TRANSIT_S for t in texts}
            later = {t for _, texts, _ in log[end:] for t in texts}
            resent = {t for texts, _ in run for t in texts} & later
            out.append((resent - set(PROBE_TEXTS), in_flight - set(PROBE_TEXTS)))
        return out


def _received(fp: FakeProvider) -> Counter[str]:
    """Every text the server received (answered or cut off by a kill), without the start-up probes."""
    return Counter(t for t in fp.texts_received if t not in PROBE_TEXTS)


# ------------------------------------------------------------------ SIGKILL torture
KILLS = 22
SEED = 20240611
PHASES = ("start-up", "requests", "requests", "part write", "part write", "record write", "record write")
WRITES = {"part write": ".part-", "record write": ".unit-"}


def _spin_until_temp(out: Path, prefix: str, proc: subprocess.Popen[str], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for folder in (out, out / layout.REJECTS_DIR, out / layout.RECORDS_DIR):
            try:
                if any(e.name.startswith(prefix) and TEMP_MARK in e.name for e in os.scandir(folder)):
                    return
            except FileNotFoundError:
                pass


@pytest.mark.timeout(120)
def test_sigkill_at_random_instants_then_rerun_equals_an_uninterrupted_run_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED)
    texts = _texts(900)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out, ref = tmp_path / "out", tmp_path / "ref"
    kills = temps_left = 0
    phases: Counter[str] = Counter()
    with FakeProvider(dim=DIM, latency_s=0.02) as fp, FakeProvider(dim=DIM) as ref_fp:
        job = _job(tmp_path, fp)
        stale: set[Path] = set()
        ledger = Kills(fp)
        while kills < KILLS:
            committed = {t for s in _committed(out) for t in texts[3 * s:3 * s + 3]}
            before = len(fp.texts_received)
            requests = fp.count()
            ledger.started()
            proc = start_run(job)
            phase = rng.choice(PHASES)
            phases[phase] += 1
            if phase == "start-up":  # once it holds the output: checkpoint read, temp clean-up, orphan removal
                wait_until(lambda: _lock_holder(out) == proc.pid or proc.poll() is not None)
                time.sleep(rng.uniform(0.0, 0.2))
            else:
                wait_until(lambda: fp.count() > requests + 1 or proc.poll() is not None)
                if phase == "requests":
                    time.sleep(rng.uniform(0.0, 0.3))
                else:  # the moment a temp file of that kind shows up
                    _spin_until_temp(out, WRITES[phase], proc)
            assert proc.poll() is None, f"the run ended before kill {kills + 1}; give it more rows"
            ledger.killed(proc)
            kills += 1
            resent = set(fp.texts_received[before:]) & committed
            assert not resent, f"committed rows were sent again: {sorted(resent)[:3]}"
            now = _temps(out)
            if fp.count() > requests:  # that run got past its start-up clean-up
                assert not (stale & now), f"temp files of a dead run survived a restart: {sorted(stale & now)[:3]}"
            temps_left += len(now - stale)
            stale = now
        ledger.started()
        final = start_run(job)
        _, stderr = final.communicate(timeout=60)
        assert final.returncode == 0, stderr
        sent = _received(fp)
        judged = ledger.judge()

        ref_job = _job(tmp_path, ref_fp, output="ref", file_name="ref.yaml")
        uninterrupted = run_cli("run", str(ref_job), "--no-progress")
        assert uninterrupted.returncode == 0, uninterrupted.stderr

    assert (out / "_SUCCESS").exists()
    assert not _temps(out), "temp files left behind"
    _assert_same_output(out, ref)
    table = read_parts(out)
    assert table.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(len(texts))]
    assert_vectors_exact(table, _expected(texts), DIM)
    # Work redone is bounded by the requests in flight at each kill: every
    # answer is journaled as it arrives, before its part commits. The server
    # counts a text when it receives it, so a request cut off by a kill counts.
    for k, (resent, in_flight) in enumerate(judged):
        assert resent <= in_flight, f"kill {k + 1} re-sent texts not in flight at it: {sorted(resent - in_flight)[:3]}"
    in_flight = 4 * 1  # max_concurrency x max_inputs_per_request
    duplicates = sum(sent.values()) - len(sent)
    assert set(sent) == {t for t in texts if t.strip()}
    assert duplicates <= sum(len(resent) for resent, _ in judged) <= sum(len(f) for _, f in judged)
    assert duplicates <= kills * in_flight, (duplicates, kills, in_flight)
    assert temps_left, "no kill landed during a write"
    print(f"{kills} kills {dict(phases)}, {duplicates} rows sent twice (bound {kills * in_flight}), "
          f"{temps_left} temp files left by kills")


LARGE_ROWS_PER_PART = 800
LARGE_PER_REQUEST = 4
LARGE_KILLS = 3
LOST_AT_KILL = 700  # texts of unfinished parts answered when a kill lands: what a run without a journal re-sends


@pytest.mark.timeout(240)
def test_sigkill_in_the_middle_of_large_parts_re_sends_only_what_was_in_flight_not_the_parts_answers(
        tmp_path: Path) -> None:
    """Parts of 800 rows, 200 requests each: a kill lands when hundreds of a
    part's rows are answered and the part is not committed. Without the
    journal all of them would be sent again; with it, only what was in flight."""
    texts = sample_texts(LARGE_ROWS_PER_PART * 4)
    unit_of = {t: i // LARGE_ROWS_PER_PART for i, t in enumerate(texts)}
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    lost: list[int] = []  # per kill: texts received for parts not committed at it

    def lost_now(before: float | None = None) -> int:
        done = _committed(out)
        return sum(1 for arrived, got, _ in fp.received_log if before is None or arrived <= before
                   for t in got if t in unit_of and unit_of[t] not in done)

    with FakeProvider(dim=DIM, latency_s=0.2) as fp:  # 80 texts/s: few answered within TRANSIT_S of a kill
        job = _job(tmp_path, fp, rows_per_part=LARGE_ROWS_PER_PART, per_request=LARGE_PER_REQUEST)
        ledger = Kills(fp)
        for k in range(LARGE_KILLS):
            ledger.started()
            requests = fp.count()
            proc = start_run(job)
            wait_until(lambda: (fp.count() > requests + 20 and lost_now() >= LOST_AT_KILL) or proc.poll() is not None,
                        timeout_s=60)
            assert proc.poll() is None, f"the run ended before kill {k + 1}; give it more rows"
            at = ledger.killed(proc)
            lost.append(lost_now(before=at))
        ledger.started()
        final = start_run(job)
        _, stderr = final.communicate(timeout=120)
        assert final.returncode == 0, stderr
        judged = ledger.judge()
        sent = _received(fp)

    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), texts, DIM)
    assert set(sent) == set(texts)
    bounds = [len(in_flight) for _, in_flight in judged]
    for k, (resent, in_flight) in enumerate(judged):
        assert resent <= in_flight, f"kill {k + 1} re-sent texts not in flight at it: {sorted(resent - in_flight)[:3]}"
    duplicates = sum(sent.values()) - len(sent)
    assert duplicates <= sum(bounds), (duplicates, bounds)
    # The test has teeth: what these kills would have cost without the journal
    # is at least ten times what they may cost with it.
    assert sum(lost) >= 10 * sum(bounds), (lost, bounds)
    print(f"{LARGE_KILLS} kills: {duplicates} texts sent twice; in flight at the kills {bounds}; "
          f"a run without a journal would have re-sent {lost}")


# ------------------------------------------------------------------ SIGTERM
GRACE_S = 2.0
STOP_MARGIN_S = 4.0  # cancelling, checkpointing and interpreter exit, on a slow 2-core runner


def test_sigterm_with_a_stalled_request_exits_within_the_grace_period_and_a_rerun_completes(tmp_path: Path) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    ok = 8
    with FakeProvider(dim=DIM, script=["ok"] * ok + ["stall:60"] * 100) as fp:
        job = _job(tmp_path, fp, max_concurrency=2, timeout_s=120)
        proc = start_run(job, "--grace-seconds", str(GRACE_S))
        wait_until(lambda: fp.count() >= ok + 2)  # both slots now wait on a provider that stalls for 60 s
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - signalled
        answered = rows_sent(fp)
    assert proc.returncode == 1, stderr
    assert stopped_s < GRACE_S + STOP_MARGIN_S, f"took {stopped_s:.1f}s to stop after SIGTERM"
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1 and "SIGTERM" in error_lines(stderr)[0], stderr
    checkpoint = _assert_manifest_consistent(out)
    committed = set(checkpoint.ledger.committed_seqs())
    assert committed, "the answered requests should have completed a part"
    assert not _temps(out)
    assert checkpoint.meta["runs"][-1]["status"] == "stopped"
    assert not (out / "_SUCCESS").exists()

    with FakeProvider(dim=DIM) as fp2:
        job = _job(tmp_path, fp2)
        rerun = start_run(job)
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
        # Rows of unfinished parts only, none of them answered before the stop (the journal kept those).
        assert set(rows_sent(fp2)) <= {t for i, t in enumerate(texts) if i // 3 not in committed and t.strip()}
        assert rows_sent(fp2) == Counter(t for t in texts if t.strip()) - answered
    assert (out / "_SUCCESS").exists()
    assert_vectors_exact(read_parts(out), _expected(texts), DIM)


def test_a_second_signal_stops_at_once_without_waiting_out_the_grace_period(tmp_path: Path) -> None:
    texts = _texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    ok = 8
    with FakeProvider(dim=DIM, script=["ok"] * ok + ["stall:60"] * 100) as fp:
        job = _job(tmp_path, fp, max_concurrency=2, timeout_s=120)
        proc = start_run(job)  # the default grace period: 20 s
        wait_until(lambda: fp.count() >= ok + 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=DEFAULT_GRACE_S / 2)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1 and "SIGINT" in error_lines(stderr)[0], stderr
    assert _assert_manifest_consistent(out).ledger.committed
    assert not _temps(out)


def test_grace_seconds_must_be_a_non_negative_number(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "job.yaml"), "--grace-seconds", "-1")
    assert result.returncode == 2
    assert "--grace-seconds" in result.stderr


# ------------------------------------------------------------------ sharding
@pytest.mark.timeout(120)
def test_four_concurrent_shards_one_killed_and_rerun_alone_give_the_unsharded_output(tmp_path: Path) -> None:
    texts = _texts(160)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out, ref = tmp_path / "out", tmp_path / "ref"
    with FakeProvider(dim=DIM, latency_s=0.03) as fp, FakeProvider(dim=DIM) as ref_fp:
        job = _job(tmp_path, fp, rows_per_part=4, per_request=2, max_concurrency=1)
        shards = {k: start_run(job, "--shard", f"{k}/4") for k in range(4)}
        wait_until(lambda: any(s % 4 == 2 for s in _committed(out)))
        assert shards[2].poll() is None, "shard 2 finished before it could be killed; give it more rows"
        shards[2].kill()
        shards[2].wait(timeout=10)
        killed_with = {s for s in _committed(out) if s % 4 == 2}
        for k in (0, 1, 3):
            _, stderr = shards[k].communicate(timeout=60)
            assert shards[k].returncode == 0, stderr
        assert not (out / "_SUCCESS").exists(), "_SUCCESS written while shard 2 still had work"
        assert {s for s in range(40) if s % 4 != 2} <= _committed(out)

        report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert report["state"] == "incomplete" and not report["running"]
        by_shard = {tuple(s["shard"]): s for s in report["shards"]}
        assert set(by_shard) == {(k, 4) for k in range(4)}
        assert all(by_shard[(k, 4)]["last_run"]["status"] == "done" for k in (0, 1, 3))
        assert by_shard[(2, 4)]["last_run"] is None and by_shard[(2, 4)]["units_done"] == len(killed_with)
        assert not any(s["running"] for s in report["shards"])

        rerun = start_run(job, "--shard", "2/4")
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
        sent = rows_sent(fp)

        ref_job = _job(tmp_path, ref_fp, output="ref", file_name="ref.yaml", rows_per_part=4, per_request=2)
        unsharded = run_cli("run", str(ref_job), "--no-progress")
        assert unsharded.returncode == 0, unsharded.stderr

    assert (out / "_SUCCESS").exists()
    _assert_same_output(out, ref)
    assert_vectors_exact(read_parts(out), _expected(texts), DIM)
    # Only shard 2's rows in flight at its kill were sent twice; every other row once.
    twice = {t for t, n in Counter(sent).items() if n > 1}
    assert set(sent) == {t for t in texts if t.strip()}
    assert all(i // 4 % 4 == 2 for i, t in enumerate(texts) if t in twice)
    text = run_cli("status", str(job), key=None)
    assert text.returncode == 0 and "complete" in text.stdout
    assert all(f"shard {k}/4" in text.stdout for k in range(4)), text.stdout


def test_status_shows_which_shards_hold_their_lock_now(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(12)))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp)
        assert run_cli("run", str(job), "--no-progress", "--shard", "0/3").returncode == 0
        with LocalOutput(str(out)).writer_lock((1, 3)):
            report = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
            text = run_cli("status", str(job), key=None).stdout
    assert report["running"] is True
    assert {tuple(s["shard"]): s["running"] for s in report["shards"]} == {(0, 3): False, (1, 3): True, (2, 3): False}
    assert "shard 1/3" in text and "running now" in text
    shard0 = next(line for line in text.splitlines() if "shard 0/3" in line)
    assert "done" in shard0 and "running now" not in shard0


# ------------------------------------------------------------------ one writer
@pytest.mark.parametrize("shard", [None, "1/2"], ids=["unsharded", "same_shard"])
def test_second_run_on_a_live_output_refuses_at_once_and_a_killed_holder_frees_it(tmp_path: Path, shard: str | None) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    extra = ["--shard", shard] if shard else []
    with FakeProvider(dim=DIM, latency_s=0.3) as slow, FakeProvider(dim=DIM) as fast:
        job = _job(tmp_path, slow, max_concurrency=1, per_request=3)
        same_job_other_provider = _job(tmp_path, fast, file_name="other.yaml", per_request=3)
        first = start_run(job, *extra)
        wait_until(lambda: slow.count() >= 2)  # it holds the output
        second = run_cli("run", str(same_job_other_provider), "--no-progress", *extra)
        status = json.loads(run_cli("status", str(job), "--json", key=None).stdout)
        assert first.poll() is None
        first.kill()
        first.wait(timeout=10)
        assert fast.count() == 0  # the refused run called no provider
        third = start_run(same_job_other_provider, *extra)
        _, stderr = third.communicate(timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert "in use" in lines[0] and str(out) in lines[0], lines[0]
    assert status["running"] is True
    assert third.returncode == 0, stderr
    done = _committed(out)
    assert done >= ({s for s in range(20) if s % 2 == 1} if shard else set(range(20)))
    assert_vectors_exact(read_parts(out), [t for i, t in enumerate(_expected(texts)) if i // 3 in done], DIM)


# ------------------------------------------------------------------ disk and permission faults
def test_output_path_that_cannot_be_created_exits_2_with_one_line_and_calls_no_provider(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data.parquet", docs_table(_texts(10)))
    (tmp_path / "afile").write_text("a regular file, not a directory\n")
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp, output="afile/out")
        result = run_cli("run", str(job), "--no-progress")
        assert fp.count() == 0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "output.path" in lines[0] and "Not a directory" in lines[0], result.stderr


def _make_read_only(folder: Path) -> Callable[[], None]:
    """Take write permission away from `folder`; returns the undo. Root ignores
    mode bits, so as root the folder is made immutable instead."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return lambda: folder.chmod(0o755)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root, where chmod does not stop writes, and chattr +i is not available here")
    return lambda: subprocess.run([chattr, "-i", str(folder)], check=True)


def test_unwritable_output_with_progress_exits_with_one_line_and_leaves_the_manifest_as_it_was(tmp_path: Path) -> None:
    texts = _texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = _job(tmp_path, fp)
        assert run_cli("run", str(job), "--no-progress", "--limit", "10").returncode == 0
        manifest = (out / "_manifest.json").read_bytes()
        files = sorted(p.name for p in out.rglob("*"))
        undo = _make_read_only(out)
        try:
            requests = fp.count()
            result = run_cli("run", str(job), "--no-progress")
            assert fp.count() == requests
        finally:
            undo()
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not writable" in lines[0] and str(out) in lines[0], result.stderr
        assert (out / "_manifest.json").read_bytes() == manifest
        assert sorted(p.name for p in out.rglob("*")) == files
        rerun = run_cli("run", str(job), "--no-progress")
        assert rerun.returncode == 0, rerun.stderr
    assert_vectors_exact(read_parts(out), _expected(texts), DIM)


def test_disk_full_mid_run_stops_with_work_left_an_intact_manifest_and_a_rerun_completes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _texts(60)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    monkeypatch.setenv(KEY_VAR, KEY)
    real_fsync = os.fsync
    part_writes = 0
    full = False

    def fsync(fd: int) -> None:
        """The disk fills after three part files: every file written into the output fails from then on."""
        nonlocal part_writes, full
        name = os.readlink(f"/proc/self/fd/{fd}")
        if TEMP_MARK in name and name.startswith(str(out)):
            if full or (".part-" in name and part_writes >= 3):
                full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            part_writes += ".part-" in name
        real_fsync(fd)

    with FakeProvider(dim=DIM) as fp:
        job = load_job(str(_job(tmp_path, fp, max_concurrency=2)))
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(WorkLeftError) as stopped:
            run_job(job, RunOptions(progress=False))
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert stopped.value.exit_code == 1
        assert "No space left on device" in str(stopped.value) and str(out) in str(stopped.value)
        checkpoint = _assert_manifest_consistent(out)
        committed = set(checkpoint.ledger.committed_seqs())
        assert 1 <= len(committed) <= 3
        assert not _temps(out), "a failed write left a temp file"
        assert not (out / "_SUCCESS").exists()
        before = len(fp.inputs_received)

        assert run_job(job, RunOptions(progress=False)) == 0
        resent = set(fp.inputs_received[before:]) & {t for s in committed for t in texts[3 * s:3 * s + 3]}
        assert not resent, "parts committed before the disk filled were sent again"
    assert (out / "_SUCCESS").exists()
    table = read_parts(out)
    assert table.column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(60)]
    assert_vectors_exact(table, _expected(texts), DIM)


def test_a_real_full_filesystem_stops_the_run_cleanly_and_after_growing_it_a_rerun_completes(tmp_path: Path) -> None:
    mount = shutil.which("mount")
    fs = tmp_path / "fs"
    fs.mkdir()
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(fs)],
                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root and CAP_SYS_ADMIN)")
    try:
        texts = _texts(300)
        write_parquet(tmp_path / "data.parquet", docs_table(texts))
        out = fs / "out"
        with FakeProvider(dim=DIM) as fp:
            job = _job(tmp_path, fp, output="fs/out")
            full = run_cli("run", str(job), "--no-progress")
            assert full.returncode == 1, full.stderr
            assert "Traceback" not in full.stderr
            assert len(error_lines(full.stderr)) == 1 and "No space left on device" in error_lines(full.stderr)[0]
            assert _assert_manifest_consistent(out).ledger.committed, "some parts should fit before the disk is full"
            assert not _temps(out)
            assert not (out / "_SUCCESS").exists()
            subprocess.run([mount, "-o", "remount,size=16m", str(fs)], check=True)
            rerun = run_cli("run", str(job), "--no-progress")
            assert rerun.returncode == 0, rerun.stderr
        assert_vectors_exact(read_parts(out), _expected(texts), DIM)
    finally:
        subprocess.run(["umount", str(fs)], check=False)
