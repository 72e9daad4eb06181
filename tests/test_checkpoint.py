"""The checkpoint at backfill scale: one small record per committed unit,
snapshots that compact them, the unit journal that keeps paid answers
across kills, part names that sort past 100,000 parts, outputs of the
previous format, and the byte budget of work in flight."""
from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import shutil
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import pytest

from conftest import (
    KEY,
    KEY_VAR,
    assert_vectors_exact,
    committed_units,
    docs_table,
    part_files,
    provider_entry,
    read_checkpoint,
    read_parts,
    rows_sent,
    sample_texts,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider
from pipeline.checkpoint import journal
from pipeline.checkpoint import layout
from pipeline.checkpoint import records
from pipeline.engine.inflight import MemoryBudget
from pipeline.config.job import load_job
from pipeline.errors import ConfigError
from pipeline.checkpoint.records import Ledger, UnitRecord, merge_meta, parse_snapshot, snapshot_json
from pipeline.commands.run import RunOptions
from pipeline.commands.run import run as run_job
from pipeline.checkpoint.manifest import Checkpoint
from pipeline.config.job import StorageConfig
from pipeline.storage import LocalOutput
from pipeline.storage.objectstore import ObjectOutput
from pipeline.storage.output import Output, Staged
from test_s3 import ACCESS_KEY, SECRET_KEY, bucket, s3_endpoint  # noqa: F401  (fixtures: moto's S3 server)

DIM = 8


def _run(job: Path, **options: object) -> int:
    return run_job(load_job(str(job)), RunOptions(progress=False, **options))  # type: ignore[arg-type]


# ------------------------------------------------------------------ records and the ledger


def _record(seq: int, state: str = "committed", rows: int = 5, **extra: int) -> UnitRecord:
    return UnitRecord(seq, state, rows, extra.pop("embedded", rows), extra.pop("tokens", 10 * rows), **extra)  # type: ignore[arg-type]


def test_a_unit_seen_twice_counts_once_and_a_committed_record_supersedes_a_partial_one() -> None:
    ledger = Ledger()
    ledger.add(_record(3, "partial", rows=2))
    ledger.add(_record(3, "partial", rows=1))  # an older cut: the longer one stays
    assert ledger.partial[3].rows == 2 and not ledger.is_done(3)
    ledger.add(_record(3, rows=5, rejected_empty=1, embedded=4))
    ledger.add(_record(3, rows=5, rejected_empty=1, embedded=4))  # its snapshot and its record
    ledger.add(_record(3, "partial", rows=2))  # a stale partial after the commit changes nothing
    ledger.add(_record(1000, rows=7, deduped=2, from_cache=1))
    assert ledger.is_done(3) and ledger.is_done(1000) and not ledger.is_done(999) and not ledger.is_done(10**9)
    assert ledger.partial == {}
    assert ledger.counters() == {"units_done": 2, "rows_done": 12, "rows_embedded": 11, "rows_rejected": {"empty": 1},
                                 "tokens": 120, "rows_deduped": 2, "rows_from_cache": 1}


@pytest.mark.parametrize("bad", [{"state": "done"}, {"rows": -1}, {"seq": -1}])
def test_a_record_with_an_unknown_state_or_a_negative_count_is_refused(bad: dict[str, object]) -> None:
    fields = {"seq": 1, "state": "committed", "rows": 1, "embedded": 1, "tokens": 1, **bad}
    with pytest.raises(ValueError):
        UnitRecord(**fields)  # type: ignore[arg-type]


def test_a_snapshot_round_trips_and_keeps_only_the_writers_own_units() -> None:
    ledger = Ledger()
    for seq in range(6):
        ledger.add(_record(seq, rows=seq + 1))
    ledger.add(_record(7, "partial", rows=2))
    meta = records.new_meta("job", {"model": "m"}, 6, "2026-01-01T00:00:00Z")
    data = json.loads(json.dumps(snapshot_json(meta, ledger, lambda seq: seq % 2 == 1)))
    assert sorted(data["units"]) == ["1", "3", "5"] and list(data["partial"]) == ["7"]
    parsed_meta, parsed = parse_snapshot(data)
    assert parsed_meta["part_digits"] == 6
    assert sorted((r.seq, r.state, r.rows) for r in parsed) == [(1, "committed", 2), (3, "committed", 4),
                                                                 (5, "committed", 6), (7, "partial", 2)]


def test_a_format_1_manifest_reads_as_committed_units_with_five_digit_names_and_its_partials_redone() -> None:
    v1 = {"format_version": 1, "job": "j", "fingerprint": {"model": "m"}, "dimensions": 8, "probes": ["AAAA"],
          "total_units": 4, "total_rows": 20, "runs": [{"finished_at": "2024-01-01"}],
          "units": {"0": {"rows": 5, "embedded": 4, "rejected": {"empty": 1}, "tokens": 40, "deduped": 1},
                    "2": {"rows": 5, "embedded": 5, "rejected": {}, "tokens": 50}},
          "partial": {"1": {"rows": 2, "embedded": 2, "rejected": {}, "tokens": 9, "file": "part-00001.parquet"}}}
    meta, units = parse_snapshot(v1)
    assert meta["part_digits"] == 5 and meta["dimensions"] == 8 and meta["total_units"] == 4
    assert sorted((u.seq, u.state, u.embedded, u.rejected_empty, u.deduped) for u in units) == [
        (0, "committed", 4, 1, 1), (2, "committed", 5, 0, 0)]


@pytest.mark.parametrize("bad", [{"format_version": 3}, {"format_version": None}, [], "x",
                                 {"format_version": 2, "unit_fields": ["rows", "bogus"], "units": {}}])
def test_a_snapshot_of_an_unknown_format_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_snapshot(bad)


def test_merging_another_writers_meta_takes_what_it_learned_and_each_run_once() -> None:
    mine = records.new_meta("j", {"model": "m"}, 5, "2024-01-01")
    mine["runs"] = [{"finished_at": "2024-01-02", "shard": [0, 2]}]
    other = {**records.new_meta("j", {"model": "m"}, 5, "2024-01-01"), "dimensions": 8, "total_units": 4,
             "runs": [{"finished_at": "2024-01-01", "shard": [1, 2]}, {"finished_at": "2024-01-02", "shard": [0, 2]}]}
    merge_meta(mine, other)
    assert mine["dimensions"] == 8 and mine["total_units"] == 4
    assert [r["finished_at"] for r in mine["runs"]] == ["2024-01-01", "2024-01-02"]


# ------------------------------------------------------------------ the journal


def _keys(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) * 8 for i in range(n)]


def _bytes(piece: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in piece)


def test_a_journal_gives_back_every_whole_piece_and_skips_a_torn_one() -> None:
    vectors = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM) / 7
    first = _bytes(journal.vectors_piece(_keys(3), vectors, tokens=30))
    refusal = _bytes(journal.refused_piece(_keys(1, 9)[0], "content_filter"))
    later = _bytes(journal.vectors_piece(_keys(1, 5), vectors[:1] + 1, tokens=4))
    torn = _bytes(journal.vectors_piece(_keys(2, 7), vectors[:2], tokens=99))[:-5]
    contents = journal.parse(first + torn + refusal + later + torn, DIM)
    assert len(contents) == 4 and contents.tokens == 34  # the torn pieces count for nothing
    assert np.array_equal(contents.vector(_keys(3)[2]), vectors[2])  # the very bits written
    assert contents.vector(_keys(1, 5)[0]).tobytes() == (vectors[0] + 1).tobytes()
    assert contents.refused == {_keys(1, 9)[0]: "content_filter"}
    flipped = bytearray(first)
    flipped[-20] ^= 1  # a bit flipped in the vectors: the checksum catches it
    assert len(journal.parse(bytes(flipped), DIM)) == 0
    assert len(journal.parse(first, DIM + 1)) == 0  # vectors of another length are not this job's
    assert len(journal.parse(b"", DIM)) == 0 and len(journal.parse(journal.MAGIC + b"\0" * 3, DIM)) == 0


def _pieces(n: int, per: int = 3) -> tuple[list[bytes], np.ndarray]:
    """n vector pieces of `per` entries each, all different."""
    vectors = (np.arange(n * per * DIM, dtype=np.float32).reshape(n * per, DIM) + 1) / 7
    return [_bytes(journal.vectors_piece(_keys(per, tag=i), vectors[i * per:(i + 1) * per], tokens=10 + i))
            for i in range(n)], vectors


def test_a_journal_torn_at_every_byte_keeps_exactly_the_pieces_before_the_tear() -> None:
    pieces, vectors = _pieces(3)
    data = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    for cut in range(len(data)):
        contents = journal.parse(data[:cut], DIM)
        whole = int(np.searchsorted(ends, cut, side="right"))  # pieces that end at or before the cut
        assert len(contents) == 3 * whole, cut
        assert contents.tokens == sum(10 + i for i in range(whole)), cut
        for i in range(3 * whole):
            assert contents.vector(_keys(3, tag=i // 3)[i % 3]).tobytes() == vectors[i].tobytes()


def test_a_flipped_bit_anywhere_in_a_piece_drops_that_piece_and_no_other() -> None:
    pieces, _ = _pieces(3)
    data = bytearray(b"".join(pieces))
    start, end = len(pieces[0]), len(pieces[0]) + len(pieces[1])
    for pos in range(start, end):  # the header, the keys, every vector's bytes, the checksum
        for bit in (0, 5):
            data[pos] ^= 1 << bit
            contents = journal.parse(bytes(data), DIM)
            data[pos] ^= 1 << bit
            assert len(contents) == 6 and contents.tokens == 10 + 12, (pos, bit)
            assert _keys(3, tag=1)[0] not in contents


def test_swapped_or_reordered_blocks_of_a_piece_never_check_out() -> None:
    """A store or a kernel that writes a piece's blocks out of order: the same
    bytes, the same sums of words, in another order."""
    pieces, _ = _pieces(1, per=6)
    piece = pieces[0]
    floats = journal.HEADER.size + 6 * len(_keys(1)[0])
    for size in (4, 8, 16, 32):
        a, b = floats, floats + size
        swapped = piece[:a] + piece[b:b + size] + piece[a:b] + piece[b + size:]
        assert swapped != piece and sorted(swapped) == sorted(piece)
        assert len(journal.parse(swapped, DIM)) == 0, size
    vectors_swapped = piece[:floats] + piece[floats + 4 * DIM:floats + 8 * DIM] + piece[floats:floats + 4 * DIM] + \
        piece[floats + 8 * DIM:]  # two whole vectors exchanged: each key would get the other's vector
    assert len(journal.parse(vectors_swapped, DIM)) == 0
    keys_swapped = piece[:journal.HEADER.size] + piece[journal.HEADER.size + 16:journal.HEADER.size + 32] + \
        piece[journal.HEADER.size:journal.HEADER.size + 16] + piece[journal.HEADER.size + 32:]
    assert len(journal.parse(keys_swapped, DIM)) == 0


def test_a_journal_of_the_previous_format_is_discarded_with_a_warning_and_later_pieces_are_read(
        caplog: pytest.LogCaptureFixture) -> None:
    import struct

    vectors = np.ones((2, DIM), dtype=np.float32)
    keys = b"".join(_keys(2))
    floats = vectors.tobytes()
    header = struct.pack("<4sBIIQQ", b"EJ2\n", 1, 2, DIM, 20, len(keys) + len(floats))
    words = int(np.frombuffer(floats, dtype="<u8").sum(dtype=np.uint64))
    old = header + keys + floats + struct.pack("<IQ", zlib.crc32(keys, zlib.crc32(header)), words)
    new = _bytes(journal.vectors_piece(_keys(1, tag=9), vectors[:1], tokens=4))
    with caplog.at_level("WARNING", logger="pipeline"):
        contents = journal.parse(old + new, DIM)
    assert len(contents) == 1 and contents.tokens == 4 and _keys(1, tag=9)[0] in contents
    assert any("previous format" in r.getMessage() for r in caplog.records)


def test_a_journal_appended_after_a_torn_piece_is_read_on_a_real_file(tmp_path: Path) -> None:
    output = LocalOutput(str(tmp_path))
    output.prepare(layout.FOLDERS)
    log = journal.Journal(output, 4, DIM)
    vectors = np.ones((2, DIM), dtype=np.float32)
    log.answered(_keys(2), vectors, 20)
    output.append(layout.journal_name(4), [_bytes(journal.vectors_piece(_keys(2, 3), vectors, 1))[:30]])  # a kill mid-write
    log.answered(_keys(1, 4), vectors[:1] * 2, 10)
    log.refused(_keys(1, 6)[0], None)
    contents = log.read()
    assert len(contents) == 3 and contents.tokens == 30 and contents.refused == {_keys(1, 6)[0]: None}
    log.delete()
    assert len(log.read()) == 0 and not (tmp_path / layout.journal_name(4)).exists()


# ------------------------------------------------------------------ the byte budget


def test_the_budget_grants_in_order_and_an_oversized_slice_alone() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        a, b, c, d = (budget.reserve(n) for n in (60, 30, 50, 500))

        def granted() -> str:
            return "".join(name for name, r in zip("abcd", (a, b, c, d)) if r.granted.done())

        assert granted() == "ab" and budget.used == 90  # c waits, though 10 are free: no overtaking
        b.release()
        assert granted() == "ab"  # 60 + 50 > 100
        a.release()
        assert granted() == "abc" and budget.used == 50
        await asyncio.wait_for(c.wait(), 1)
        c.release()
        assert granted() == "abcd" and budget.used == 500  # larger than the whole budget: alone
        e = budget.reserve(1)
        e.release()  # leaves the queue without ever holding bytes
        d.release()
        d.release()  # idempotent
        assert budget.used == 0 and budget.reserve(100).granted.done()

    asyncio.run(scenario())


# ------------------------------------------------------------------ part names


@pytest.mark.parametrize(("units", "digits"), [(0, 5), (1, 5), (100_000, 5), (100_001, 6), (10**6, 6),
                                                (10**6 + 1, 7), (10**12, 12)])
def test_part_names_are_wide_enough_for_every_unit(units: int, digits: int) -> None:
    assert layout.part_digits(units) == digits
    seqs = sorted({s for s in (0, 9, 10, units // 2, units - 1) if 0 <= s < units})
    names = [layout.part_name(s, digits) for s in seqs]
    assert names == sorted(names) and len(set(names)) == len(names)


def test_an_output_of_more_parts_than_five_digits_name_keeps_name_order_equal_to_input_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "MIN_PART_DIGITS", 1)  # 12 parts then need 2 digits: the same rule at 100,000
    monkeypatch.setenv(KEY_VAR, KEY)
    texts = sample_texts(12)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=DIM) as fp:
        assert _run(write_job(tmp_path, [provider_entry(fp)], rows_per_part=1, embedding={"dimensions": DIM})) == 0
    names = [p.name for p in part_files(tmp_path / "out")]
    assert names == [f"part-{i:02d}.parquet" for i in range(12)]
    assert read_parts(tmp_path / "out").column("doc_id").to_pylist() == [f"id-{i:04d}" for i in range(12)]


# ------------------------------------------------------------------ commits


def test_a_commit_reads_nothing_so_its_cost_does_not_grow_with_the_parts_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    reads: Counter[str] = Counter()
    real = LocalOutput.read_bytes

    def counting(self: LocalOutput, rel: str) -> bytes:
        reads[rel.split("/")[0]] += 1
        return real(self, rel)

    monkeypatch.setattr(LocalOutput, "read_bytes", counting)
    per_size = {}
    for rows in (10, 40):
        folder = tmp_path / str(rows)
        folder.mkdir()
        write_parquet(folder / "data.parquet", docs_table(sample_texts(rows)))
        reads.clear()
        with FakeProvider(dim=DIM) as fp:
            assert _run(write_job(folder, [provider_entry(fp)], rows_per_part=1, embedding={"dimensions": DIM})) == 0
        per_size[rows] = dict(reads)
        out = folder / "out"
        assert not list((out / layout.RECORDS_DIR).iterdir()), "records are compacted into the snapshot at the end"
        assert len(json.loads((out / layout.MANIFEST).read_text())["units"]) == rows
    assert per_size[10] == per_size[40], per_size  # 4x the parts, the same reads: the start and the end only


def test_shards_write_only_their_own_records_and_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setattr("pipeline.checkpoint.manifest.COMPACT_EVERY_RECORDS", 10**9)
    texts = sample_texts(24)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    written: list[str] = []
    real = LocalOutput.write

    def recording(self: LocalOutput, rel: str, data: bytes) -> None:
        written.append(rel)
        real(self, rel, data)

    monkeypatch.setattr(LocalOutput, "write", recording)
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=3, embedding={"dimensions": DIM})
        assert _run(job, shard=(1, 2)) == 0
        records_written = sorted(layout.seq_of(r) for r in written if r.startswith(layout.RECORDS_DIR))
        assert records_written == [1, 3, 5, 7]
        assert [p.name for p in part_files(out)] == [layout.part_name(s, 5) for s in (1, 3, 5, 7)]
        assert not (out / layout.SUCCESS).exists()
        assert {r for r in written if r.endswith(".json") and not r.startswith(layout.RECORDS_DIR)} == {
            layout.snapshot_name((1, 2)), layout.MANIFEST, layout.SUMMARY}  # the header, once: the output was new
        written.clear()
        assert _run(job, shard=(0, 2)) == 0
    assert layout.MANIFEST in written  # the shard finishing the job writes the whole checkpoint
    assert sorted(layout.seq_of(r) for r in written if r.startswith(layout.RECORDS_DIR)) == [0, 2, 4, 6]
    assert committed_units(out) == set(range(8)) and (out / layout.SUCCESS).exists()
    assert_vectors_exact(read_parts(out), texts, DIM)


# ------------------------------------------------------------------ --limit cuts and format 1


def test_a_limit_cut_is_a_partial_record_its_answers_stay_journaled_and_nothing_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    texts = sample_texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=7, embedding={"dimensions": DIM})
        assert _run(job, limit=10) == 0
        checkpoint = read_checkpoint(out)
        assert set(checkpoint.ledger.committed_seqs()) == {0}
        assert {s: (r.state, r.rows) for s, r in checkpoint.ledger.partial.items()} == {1: ("partial", 3)}
        assert (out / layout.journal_name(1)).exists() and not (out / layout.journal_name(0)).exists()
        assert not (out / layout.LEGACY_PARTIAL_DIR).exists()
        assert _run(job) == 0
        assert rows_sent(fp) == Counter(texts)  # the journal gave the 3 cut rows back
    assert not list((out / layout.JOURNAL_DIR).iterdir())
    assert_vectors_exact(read_parts(out), texts, DIM)


def _to_format_1(out: Path) -> None:
    """What the previous version left: one manifest listing the committed units; no records, no journals."""
    checkpoint = read_checkpoint(out)
    meta = checkpoint.meta
    units = {str(r.seq): {"rows": r.rows, "embedded": r.embedded, "rejected": r.rejected, "tokens": r.tokens}
             for r in checkpoint.ledger.records() if r.state == "committed"}
    v1 = {"format_version": 1, "job": meta["job"], "created_at": meta["created_at"], "updated_at": meta["updated_at"],
          "fingerprint": meta["fingerprint"], "dimensions": meta["dimensions"], "probes": meta["probes"],
          "total_units": None, "total_rows": None, "units": units, "partial": {}, "runs": meta["runs"]}
    for folder in (layout.MANIFEST_DIR, layout.JOURNAL_DIR):
        shutil.rmtree(out / folder)
    (out / layout.MANIFEST).write_text(json.dumps(v1))


def _resumed_from(tmp_path: Path, convert: Callable[[Path], None], limit: int) -> tuple[Path, list[str], Counter[str]]:
    """35 rows in parts of 7: a run cut at `limit` rows, its output turned into
    an older format by `convert`, then run to the end. (output, texts, what the end sent)."""
    texts = sample_texts(35)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=7, embedding={"dimensions": DIM})
        assert _run(job, limit=limit) == 0
        convert(out)
        before = rows_sent(fp)
        assert _run(job) == 0
        return out, texts, rows_sent(fp) - before


def test_an_output_of_the_previous_format_resumes_and_pays_nothing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    out, texts, sent = _resumed_from(tmp_path, _to_format_1, limit=14)
    assert sent == Counter(texts[14:])
    assert json.loads((out / layout.MANIFEST).read_text())["format_version"] == records.FORMAT_VERSION
    assert [p.name for p in part_files(out)] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert_vectors_exact(read_parts(out), texts, DIM)


def test_a_previous_format_output_past_its_five_digit_names_is_refused_and_keeps_its_parts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setattr(records, "V1_PART_DIGITS", 1)  # stands in for its 100,000 five-digit names
    texts = sample_texts(24)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=DIM) as fp:
        job = write_job(tmp_path, [provider_entry(fp)], rows_per_part=2, embedding={"dimensions": DIM})
        monkeypatch.setattr(layout, "MIN_PART_DIGITS", 1)
        assert _run(job, limit=6) == 0
        _to_format_1(out)
        with pytest.raises(ConfigError, match="rows_per_part.*--restart") as info:
            _run(job)
    assert info.value.exit_code == 2
    assert committed_units(out) == set(range(10))  # what fits its names was done and kept
    assert_vectors_exact(read_parts(out), texts[:20], DIM)
    assert not (out / layout.SUCCESS).exists()


# ------------------------------------------------------------------ a reader while another shard compacts


class _Interleaved(Output):
    """An output that runs `between` once, just before the reader's `step`-th
    call to the store (a read, a list, an existence check): another writer
    acting between two steps of a read."""

    def __init__(self, inner: Output, step: int, between: Callable[[], None]) -> None:
        super().__init__(inner.root)
        self.inner, self.step, self.between = inner, step, between
        self.calls = 0
        self.fired = False

    def _next(self) -> None:
        if self.calls == self.step:
            self.fired = True
            self.between()
        self.calls += 1

    def exists(self, rel: str) -> bool:
        self._next()
        return self.inner.exists(rel)

    def read_bytes(self, rel: str) -> bytes:
        self._next()
        return self.inner.read_bytes(rel)

    def list(self, folder: str, pattern: str) -> list[str]:
        self._next()
        return self.inner.list(folder, pattern)

    def read_log(self, rel: str) -> bytes | mmap.mmap:
        self._next()
        return self.inner.read_log(rel)

    def list_logs(self, folder: str) -> list[str]:
        self._next()
        return self.inner.list_logs(folder)

    def get_file(self, rel: str, local: Path) -> None:
        self._next()
        self.inner.get_file(rel, local)

    def prepare(self, folders: tuple[str, ...] = ()) -> None:
        self.inner.prepare(folders)

    def write(self, rel: str, data: bytes) -> None:
        self.inner.write(rel, data)

    def stage(self, rel: str) -> Staged:
        return self.inner.stage(rel)

    def delete(self, rel: str) -> None:
        self.inner.delete(rel)

    def append(self, rel: str, buffers: Sequence[bytes | memoryview]) -> None:
        self.inner.append(rel, buffers)

    def delete_log(self, rel: str) -> None:
        self.inner.delete_log(rel)

    def put_file(self, local: Path, rel: str) -> None:
        self.inner.put_file(local, rel)

    def writer_lock(self, shard: tuple[int, int] | None) -> contextlib.AbstractContextManager[object]:
        return self.inner.writer_lock(shard)

    def running_shards(self) -> tuple[bool | None, list[tuple[int, int]]]:
        return self.inner.running_shards()


UNITS = 12


def _two_shards(output: Output) -> tuple[Checkpoint, Checkpoint]:
    """Shard 0 of 2 with every unit committed and compacted; shard 1 with
    its units in several snapshot writes (segments, where there are) and its
    last unit a record not yet compacted. The job has UNITS units."""
    output.prepare(layout.FOLDERS)
    job = SimpleNamespace(name="interleaved")
    fingerprint = {"model": "m", "inputs": []}
    writers = [Checkpoint.open(output, job, fingerprint, restart=False, shard=(k, 2), max_units=UNITS)  # type: ignore[arg-type]
               for k in (0, 1)]
    first, second = writers
    first.learn(total_units=UNITS)
    for seq in range(0, UNITS, 2):
        first.commit(_record(seq), [])
    first.compact()
    for seq in range(1, UNITS - 1, 2):
        second.commit(_record(seq), [])
        second.compact()  # one snapshot write per unit: with segments, tiers to merge
    second.commit(_record(UNITS - 1), [])
    return first, second


def _read_while_compacting(make_output: Callable[[int], Output], monkeypatch: pytest.MonkeyPatch) -> int:
    """For every step of a read: a fresh output, shard 1 compacts just before
    that step, and the reader must still see every unit done. The steps tried."""
    monkeypatch.setattr("pipeline.checkpoint.manifest.TIER_FANOUT", 2, raising=False)  # merges at every other write
    step = 0
    while True:
        output = make_output(step)
        _, second = _two_shards(output)
        reader = _Interleaved(output, step, second.compact)
        seen = Checkpoint.read(reader)
        if not reader.fired:
            assert step > 4, f"a read of two shards' checkpoints took only {step} steps"
            return step
        assert seen is not None
        missing = set(range(UNITS)) - set(seen.ledger.committed_seqs())
        assert not missing, f"with shard 1 compacting before step {step} of the read, units {sorted(missing)} look undone"
        assert seen.complete(), f"with shard 1 compacting before step {step}, the job does not read as complete"
        after = Checkpoint.read(output)  # and what the compaction left reads whole too
        assert after is not None and set(after.ledger.committed_seqs()) == set(range(UNITS))
        step += 1


def test_a_reader_sees_every_unit_whichever_step_another_shard_compacts_at(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def local(step: int) -> Output:
        return LocalOutput(str(tmp_path / f"step-{step}"))

    steps = _read_while_compacting(local, monkeypatch)
    print(f"shard 1 compacted before each of {steps} steps of the read")


@pytest.mark.slow
def test_a_reader_sees_every_unit_whichever_step_another_shard_compacts_at_on_an_object_store(
        s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = StorageConfig(endpoint_url=s3_endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY)

    def remote(step: int) -> Output:
        return ObjectOutput(f"s3://{bucket}/step-{step}", options)

    steps = _read_while_compacting(remote, monkeypatch)
    print(f"shard 1 compacted before each of {steps} steps of the read")


# ------------------------------------------------------------------ segments merged in tiers


def _writer(output: Output, shard: tuple[int, int] | None = None, units: int = 10**6) -> Checkpoint:
    output.prepare(layout.FOLDERS)
    return Checkpoint.open(output, SimpleNamespace(name="tiers"), {"model": "m", "inputs": []},  # type: ignore[arg-type]
                           restart=False, shard=shard, max_units=units)


def test_compactions_merge_segments_in_tiers_so_each_unit_is_rewritten_once_per_tier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.checkpoint import manifest

    monkeypatch.setattr(manifest, "COMPACT_EVERY_RECORDS", 10)
    monkeypatch.setattr(manifest, "TIER_FANOUT", 4)
    monkeypatch.setattr(manifest, "TOP_TIER", 2)
    segment_units: Counter[int] = Counter()  # times each unit was written into a segment
    real = LocalOutput.write

    def recording(self: LocalOutput, rel: str, data: bytes) -> None:
        if rel.startswith(layout.SEGMENTS_DIR):
            from pipeline.checkpoint import segments

            segment_units.update(segments.decode(data)[0].tolist())
        real(self, rel, data)

    monkeypatch.setattr(LocalOutput, "write", recording)
    output = LocalOutput(str(tmp_path / "out"))
    checkpoint = _writer(output)
    most = 0
    for seq in range(1000):
        checkpoint.commit(_record(seq), [])
        names = output.list(layout.SEGMENTS_DIR, "*.seg")
        most = max(most, len(names))
        assert sorted(names) == sorted(r.name for r in checkpoint._segments)  # merged segments are gone
    checkpoint.compact()
    assert set(segment_units) == set(range(1000))
    assert max(segment_units.values()) <= 3  # tier 0, 1, 2: never more, however many units
    tiers = Counter(r.tier for r in checkpoint._segments)
    assert tiers[0] < 4 and tiers[1] < 4 and tiers[2] == 1000 // (10 * 4 * 4)
    assert most <= 2 * 3 + 1000 // 160 + 1  # below the top: at most fanout - 1 a tier (plus the one merging)
    seen = Checkpoint.read(output)
    assert seen is not None and set(seen.ledger.committed_seqs()) == set(range(1000))
    assert seen.counters()["rows_done"] == 5000 and seen.counters()["tokens"] == 50_000


def test_a_kill_mid_compaction_leaves_segments_no_snapshot_names_which_the_next_start_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = LocalOutput(str(tmp_path / "out"))
    checkpoint = _writer(output)
    for seq in range(5):
        checkpoint.commit(_record(seq), [])
    real = LocalOutput.write

    def dies_at_the_snapshot(self: LocalOutput, rel: str, data: bytes) -> None:
        if rel == layout.MANIFEST:
            raise KeyboardInterrupt  # killed after the segment, before the snapshot naming it
        real(self, rel, data)

    monkeypatch.setattr(LocalOutput, "write", dies_at_the_snapshot)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.compact()
    monkeypatch.setattr(LocalOutput, "write", real)
    stray = set(output.list(layout.SEGMENTS_DIR, "*.seg"))
    assert len(stray) == 1 and not json.loads((tmp_path / "out" / layout.MANIFEST).read_text())["segments"]
    again = _writer(output)
    assert set(again.ledger.committed_seqs()) == set(range(5))  # from the records, still there
    again.clean()
    assert set(output.list(layout.SEGMENTS_DIR, "*.seg")) == {r.name for r in again._segments}
    assert not output.list(layout.RECORDS_DIR, "*.json")
    seen = Checkpoint.read(output)
    assert seen is not None and set(seen.ledger.committed_seqs()) == set(range(5))


def test_the_unsharded_writer_takes_the_shards_units_into_its_own_segments(tmp_path: Path) -> None:
    output = LocalOutput(str(tmp_path / "out"))
    shards = [_writer(output, (k, 3), 30) for k in range(3)]
    for seq in range(30):
        shards[seq % 3].commit(_record(seq, rows=seq + 1), [])
    for shard in shards[:2]:
        shard.compact()  # the third leaves its units as records
    whole = _writer(output, None, 30)
    whole.clean()
    assert output.list(layout.MANIFEST_DIR, layout.SNAPSHOT_PATTERN) == []
    assert output.list(layout.RECORDS_DIR, "*.json") == []
    assert all(name.startswith(f"{layout.SEGMENTS_DIR}/all.") for name in output.list(layout.SEGMENTS_DIR, "*"))
    seen = Checkpoint.read(output)
    assert seen is not None and set(seen.ledger.committed_seqs()) == set(range(30))
    assert seen.counters()["rows_done"] == sum(range(1, 31))


def _to_format_2(out: Path) -> None:
    """What the previous version (format 2) left: each writer's snapshot with its units inline, no segments."""
    checkpoint = read_checkpoint(out)
    meta = {k: v for k, v in checkpoint.meta.items()}
    units = {str(r.seq): list(r.values()) for r in checkpoint.ledger.records() if r.state == "committed"}
    partial = {str(r.seq): list(r.values()) for r in checkpoint.ledger.records() if r.state == "partial"}
    keep_last = max(int(s) for s in units)
    last = {**UnitRecord.from_values(keep_last, "committed", units.pop(str(keep_last))).to_json(),
            "epoch": checkpoint.epoch}  # one unit left as a record, not yet compacted
    v2 = {**meta, "format_version": 2, "counters": checkpoint.counters(), "unit_fields": list(records.UNIT_FIELDS),
          "units": units, "partial": partial}
    shutil.rmtree(out / layout.MANIFEST_DIR)
    (out / layout.RECORDS_DIR).mkdir(parents=True)
    (out / layout.MANIFEST).write_text(json.dumps(v2))
    (out / layout.record_name(keep_last)).write_text(json.dumps(last))


def test_an_output_of_format_2_resumes_pays_nothing_again_and_moves_into_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)

    def convert(out: Path) -> None:
        _to_format_2(out)
        assert committed_units(out) == {0, 1}  # read from format 2's inline units and its record

    # Units 0 and 1 committed, 2 cut at 3 rows (journaled): the end sends only what is after the cut.
    out, texts, sent = _resumed_from(tmp_path, convert, limit=17)
    assert sent == Counter(texts[17:])
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["format_version"] == records.FORMAT_VERSION == 3 and manifest["segments"]
    assert sorted(int(s) for s in manifest["units"]) == list(range(5))  # complete: every unit inline too
    assert not list((out / layout.RECORDS_DIR).iterdir())
    assert_vectors_exact(read_parts(out), texts, DIM)


def test_a_segment_as_large_as_a_merge_would_make_starts_in_that_tier() -> None:
    from pipeline.checkpoint import manifest

    every, fanout, top = manifest.COMPACT_EVERY_RECORDS, manifest.TIER_FANOUT, manifest.TOP_TIER
    assert [manifest._tier_for(n) for n in (0, 1, every, every * fanout - 1)] == [0, 0, 0, 0]
    assert manifest._tier_for(every * fanout) == 1 and manifest._tier_for(every * fanout ** top) == top
    assert manifest._tier_for(10**9) == top  # format 2's million units: top tier, never merged again


def test_a_segment_round_trips_and_a_damaged_one_is_refused() -> None:
    from pipeline.checkpoint import segments

    seqs = np.array([7, 2, 900_000, 3], dtype=np.int64)
    values = np.arange(4 * len(records.UNIT_FIELDS), dtype=np.int64).reshape(4, -1)
    data = segments.encode(seqs, values, records.UNIT_FIELDS, "e1")
    got_seqs, got_values, names, epoch = segments.decode(data)
    order = np.argsort(seqs)
    assert got_seqs.tolist() == [2, 3, 7, 900_000] and np.array_equal(got_values, values[order])
    assert names == list(records.UNIT_FIELDS) and epoch == "e1"
    for bad in (data[:-3], data[:5], b"x" + data, data[:-8] + bytes(8)):
        with pytest.raises(ValueError):
            segments.decode(bad)
    backwards = segments.MAGIC + data[len(segments.MAGIC):].split(b"\n", 1)[0] + b"\n" + zlib.compress(
        np.array([5, -2, 1, 1], dtype="<i8").tobytes() + np.zeros(4 * len(records.UNIT_FIELDS), "<i8").tobytes())
    with pytest.raises(ValueError, match="out of order"):
        segments.decode(backwards)
