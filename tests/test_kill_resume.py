"""A job SIGKILLed at several moments, rerun each time, ends with every row
exactly once, in input order, with exact vectors; nothing already committed
is ever sent again."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import KEY_VAR, start_run
from fakeprovider import FakeProvider, vector_for
from pipeline.probe import PROBE_TEXTS

DIM = 8
ROWS = 600
ROWS_PER_PART = 12


def _write_job(tmp_path: Path, base_url: str) -> Path:
    texts = [f"row {i}: {'lorem ipsum ' * (i % 7 + 1)}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": [f"r{i:04d}" for i in range(ROWS)], "text": texts}), tmp_path / "in.parquet", row_group_size=50)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
name: kill-test
input: {{path: in.parquet, text_column: text, id_column: id}}
output: {{path: out, rows_per_part: {ROWS_PER_PART}}}
embedding: {{model: text-embedding-3-small, dimensions: {DIM}}}
batching: {{max_inputs_per_request: 4}}
providers:
  - {{name: slow, base_url: "{base_url}", api_key: "${{{KEY_VAR}}}", max_concurrency: 2, timeout_s: 5}}
retry: {{initial_backoff_s: 0.01, max_backoff_s: 0.05}}
"""
    )
    return job


def _committed_ids(out: Path) -> set[str]:
    manifest = out / "_manifest.json"
    if not manifest.exists():
        return set()
    units = json.loads(manifest.read_text())["units"]
    ids: set[str] = set()
    for seq in units:
        ids.update(pq.read_table(out / f"part-{int(seq):05d}.parquet", columns=["id"]).column("id").to_pylist())
    return ids


@pytest.mark.timeout(240)
def test_sigkill_at_several_moments_then_rerun_gives_every_row_once_in_order(tmp_path: Path) -> None:
    with FakeProvider(dim=DIM, latency_s=0.05) as server:
        job = _write_job(tmp_path, server.base_url)
        out = tmp_path / "out"
        kills = 0
        text_of = {f"r{i:04d}": t for i, t in enumerate(pq.read_table(tmp_path / "in.parquet").column("text").to_pylist())}
        for delay_s in (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.75, 0.95):
            committed = _committed_ids(out)
            sent_before = len(server.inputs_received)
            proc = start_run(job)
            time.sleep(delay_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
            resent = set(server.inputs_received[sent_before:]) & {text_of[i] for i in committed}
            assert not resent, f"rows already committed were sent again: {sorted(resent)[:3]}"
        assert kills >= 5, "the job finished too fast to be killed; slow the server down"

        final = start_run(job)
        _, err = final.communicate(timeout=120)
        assert final.returncode == 0, err

    assert (out / "_SUCCESS").exists()
    parts = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.column("id").to_pylist() == [f"r{i:04d}" for i in range(ROWS)]
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    expected = np.stack([vector_for(text_of[i], DIM) for i in table.column("id").to_pylist()])
    assert np.array_equal(vectors, expected)
    # Redone work is bounded by what was in flight at each kill: whole units in the window.
    sent = [t for t in server.inputs_received if t not in PROBE_TEXTS]  # each run probes once
    duplicates = len(sent) - len(set(sent))
    window_rows = 16 * ROWS_PER_PART  # runner.MAX_UNITS_IN_FLIGHT units at most
    assert duplicates <= kills * window_rows
    assert not list(out.glob(".*.tmp.*")), "temporary files left behind"
