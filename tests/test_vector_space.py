"""One vector space per output: a relay serving another model under the
requested name never gets a row into the output."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    assert_vectors_exact,
    docs_table,
    provider_entry,
    read_parts,
    rows_sent,
    run_job as run,
    sample_texts,
    write_job,
    write_parquet,
)
from fakeprovider import FakeProvider
from pipeline.core import probe


def test_a_relay_serving_another_model_is_dropped_at_start_and_never_gets_a_row(tmp_path: Path) -> None:
    texts = sample_texts(30)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as genuine, FakeProvider(dim=8, serves="other-model:") as impostor:
        # Equal priority: without the check, the impostor would take half the rows.
        job = write_job(tmp_path, [provider_entry(genuine, name="genuine"), provider_entry(impostor, name="impostor")])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert impostor.count() == 1  # the probe, nothing after
        assert rows_sent(genuine) == Counter(texts)
    out = tmp_path / "out"
    assert_vectors_exact(read_parts(out), texts, 8)
    report = json.loads((out / "_summary.json").read_text())["providers"]["impostor"]
    assert report["state"] == "unusable" and "different model" in report["reason"]


def test_a_relay_of_another_length_is_dropped_at_start(tmp_path: Path) -> None:
    texts = sample_texts(12)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    with FakeProvider(dim=8) as genuine, FakeProvider(dim=6) as shorter:
        job = write_job(tmp_path, [provider_entry(genuine, name="genuine", priority=0), provider_entry(shorter, name="shorter", priority=0)])
        result = run(job)
        assert result.returncode == 0, result.stderr
        assert shorter.count() == 1
    assert_vectors_exact(read_parts(tmp_path / "out"), texts, 8)


def test_a_later_run_whose_only_provider_serves_another_model_stops_without_touching_the_output(tmp_path: Path) -> None:
    texts = sample_texts(20)
    write_parquet(tmp_path / "data.parquet", docs_table(texts))
    out = tmp_path / "out"
    with FakeProvider(dim=8) as genuine:
        assert run(write_job(tmp_path, [provider_entry(genuine, name="relay")]), "--limit", "7").returncode == 0
    recorded = json.loads((out / "_manifest.json").read_text())["probes"]
    before = read_parts(out)
    with FakeProvider(dim=8, serves="swapped:") as swapped:  # the relay swapped models overnight
        result = run(write_job(tmp_path, [provider_entry(swapped, name="relay")]))
        assert result.returncode == 1
        assert "different model" in result.stderr.strip().splitlines()[-1]
        assert swapped.count() == 1
    assert read_parts(out).equals(before)
    assert json.loads((out / "_manifest.json").read_text())["probes"] == recorded
    with FakeProvider(dim=8) as genuine_again:
        assert run(write_job(tmp_path, [provider_entry(genuine_again, name="relay")])).returncode == 0
    assert_vectors_exact(read_parts(out), texts, 8)


@pytest.mark.parametrize(
    "scale, noise, same",
    [(1.0, 0.0, True), (3.5, 0.0, True), (1.0, 1e-4, True), (1.0, 0.5, False), (-1.0, 0.0, False)],
)
def test_probe_vectors_match_by_length_and_direction_only(scale: float, noise: float, same: bool) -> None:
    rng = np.random.default_rng(7)
    reference = rng.standard_normal((3, 16)).astype(np.float32)
    other = (reference * scale + noise * rng.standard_normal((3, 16))).astype(np.float32)
    assert (probe.mismatch(reference, other) is None) is same


def test_probe_vectors_with_nan_or_zeros_never_match() -> None:
    reference = np.ones((3, 4), dtype=np.float32)
    assert probe.mismatch(reference, np.full((3, 4), np.nan, dtype=np.float32)) is not None
    assert probe.mismatch(reference, np.zeros((3, 4), dtype=np.float32)) is not None


def test_probe_vectors_survive_the_manifest_round_trip_bit_for_bit() -> None:
    vectors = np.random.default_rng(1).standard_normal((3, 1536)).astype(np.float32)
    assert np.array_equal(probe.decode(json.loads(json.dumps(probe.encode(vectors)))), vectors)
