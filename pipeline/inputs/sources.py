"""Find inputs, fingerprint them, and stream them as units of work.

A unit is a fixed slice of one input file (`rows_per_part` rows, fewer at the
end of a file), numbered in input order. Unit boundaries depend only on the
inputs and `rows_per_part`, so every run and every shard sees the same units,
and unit N always becomes `part-N.parquet`.
"""
from __future__ import annotations

import bisect
import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config.job import InputConfig, StorageConfig
from ..errors import ConfigError, WorkLeftError
from ..storage import fs

FileFormat = Literal["parquet", "csv"]
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".tsv")
READ_BATCH_ROWS = 8192  # Arrow batch size while streaming; memory is bounded by a unit anyway
CSV_BLOCK_BYTES = 4 << 20
COMPRESSED_SUFFIXES = (".gz", ".bz2")
MAX_COMPRESSION_RATIO = 1100  # deflate's ceiling is ~1032:1; bzip2 can beat it, and a run then says so


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute, or a URI (s3://bucket/key)
    format: FileFormat
    size: int
    mtime_ns: int  # an object's last-modified time on an object store
    storage: StorageConfig = StorageConfig()

    def fingerprint(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Unit:
    seq: int  # global, in input order
    file_index: int
    file_start_row: int  # first row within its file
    row_offset: int  # first row over all inputs (the default id)
    table: pa.Table  # the columns the job reads, `num_rows` rows


def find_inputs(cfg: InputConfig) -> list[InputFile]:
    """Every input file, in a stable order: list order, then sorted within a glob or directory."""
    found: list[str] = []
    remote: dict[str, pafs.FileInfo] = {}
    for pattern in cfg.paths:
        if fs.is_remote(pattern):
            matches = _find_remote(pattern, cfg, remote)
        elif os.path.isdir(pattern):
            matches = sorted(
                str(p)
                for p in Path(pattern).rglob("*")
                if p.is_file() and not _hidden(p.relative_to(pattern)) and _format_of(str(p), "auto")
            )
            if not matches:
                raise ConfigError(f"input.path: {pattern}: directory holds no .parquet or .csv file")
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"input.path: {pattern}: matches no file")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise ConfigError(f"input.path: {pattern}: no such file or directory")
        found.extend(matches)
    files = []
    for path in dict.fromkeys(p if p in remote else os.path.abspath(p) for p in found):
        fmt = _format_of(path, cfg.format)
        if fmt is None:
            raise ConfigError(f"input.path: {path}: unknown format; set input.format to parquet or csv")
        if path in remote:
            info = remote[path]
            files.append(InputFile(path, fmt, info.size or 0, info.mtime_ns or 0, cfg.storage))
            continue
        try:
            st = os.stat(path)
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ConfigError(f"input.path: {path}: cannot read ({err.strerror})") from None
        files.append(InputFile(path, fmt, st.st_size, st.st_mtime_ns))
    return files


def _find_remote(pattern: str, cfg: InputConfig, infos: dict[str, pafs.FileInfo]) -> list[str]:
    """An object, a prefix (a "directory": every .parquet/.csv under it) or a glob."""
    try:
        if glob.has_magic(pattern):
            scheme, _, rest = pattern.partition("://")
            fixed = rest[: min(rest.index(c) for c in "*?[" if c in rest)].rsplit("/", 1)[0]
            regex = fs.glob_regex(rest)
            listed = fs.list_files(f"{scheme}://{fixed}", cfg.storage)
            matches = [(uri, info) for uri, info in listed if regex.match(uri.partition("://")[2])]
            if not matches:
                raise ConfigError(f"input.path: {pattern}: matches no object")
        else:
            info = fs.file_info(pattern, cfg.storage)
            if info.type == pafs.FileType.File:
                matches = [(pattern, info)]
            else:
                prefix = pattern.rstrip("/")
                matches = [
                    (uri, i) for uri, i in fs.list_files(prefix, cfg.storage)
                    if not _hidden(Path(uri[len(prefix) + 1:])) and _format_of(uri, "auto")
                ]
                if not matches:
                    raise ConfigError(f"input.path: {pattern}: no such object, nor a prefix holding .parquet or .csv objects")
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"input.path: {pattern}: {fs.store_error(err)}") from None
    matches.sort(key=lambda m: m[0])
    infos.update(matches)
    return [uri for uri, _ in matches]


def parquet_rows(f: InputFile) -> int:
    with _parquet(f) as parquet:
        return parquet.metadata.num_rows


def max_units(files: list[InputFile], rows_per_part: int) -> int:
    """At most how many units the inputs make (part names are sized by it):
    exact for Parquet, from its metadata; for CSV, from its size, as every
    row takes a byte at least (a compressed one, MAX_COMPRESSION_RATIO bytes
    a byte of file)."""
    units = 0
    for f in files:
        if f.format == "parquet":
            rows = parquet_rows(f)
        else:
            compressed = f.path.lower().endswith(COMPRESSED_SUFFIXES)
            rows = f.size * (MAX_COMPRESSION_RATIO if compressed else 1)
        units += -(-rows // rows_per_part)
    return units


def _parquet(f: InputFile) -> pq.ParquetFile:
    return pq.ParquetFile(fs.open_input(f.path, f.storage))


def check_columns(files: list[InputFile], cfg: InputConfig) -> None:
    """Every column the job names exists in every input (reads schemas only)."""
    for f in files:
        names = set(read_schema(f).names)
        for role, cols in (
            ("text_column" if cfg.text_column else "text_template", cfg.text_columns),
            ("id_column", (cfg.id_column,) if cfg.id_column else ()),
            ("keep_columns", cfg.keep_columns),
        ):
            for col in cols:
                if col not in names:
                    known = ", ".join(sorted(names)[:20])
                    raise ConfigError(f"input.{role}: column {col!r} is not in {f.path} (columns: {known})")


def read_schema(f: InputFile) -> pa.Schema:
    try:
        if f.format == "parquet":
            with _parquet(f) as parquet:
                return parquet.schema_arrow
        source = fs.open_stream(f.path, f.storage)
        with pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=1 << 16)) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"input.path: {f.path}: not a readable {f.format} file ({_first_line(err)})") from None


def iter_units(
    files: list[InputFile],
    cfg: InputConfig,
    rows_per_part: int,
    wanted: Callable[[int], bool],
    totals: dict[str, int] | None = None,
) -> Iterator[Unit]:
    """Yield the units for which `wanted(seq)` is true, in order; once every
    input is read, `totals` gets the count of all units and rows.

    Of a Parquet file only the row groups that wanted units lie in are read
    (a resumed run or a recheck does not decode what is done; a file with
    none is skipped from its metadata); a CSV must be read to know where its
    units fall.
    """
    seq = 0
    row_offset = 0
    columns = list(cfg.read_columns)
    for index, f in enumerate(files):
        try:
            if f.format == "parquet":
                with _parquet(f) as parquet:
                    n_rows = parquet.metadata.num_rows
                    n_units = -(-n_rows // rows_per_part)
                    chosen = [j for j in range(n_units) if wanted(seq + j)]
                    for j, table in _parquet_units(parquet, columns, rows_per_part, chosen):
                        yield Unit(seq + j, index, j * rows_per_part, row_offset + j * rows_per_part, table)
                seq, row_offset = seq + n_units, row_offset + n_rows
                continue
            batches = _csv_batches(fs.open_stream(f.path, f.storage), f.path, columns)
            for start, table in _slices(batches, rows_per_part):
                if wanted(seq):
                    yield Unit(seq, index, start, row_offset, table)
                seq += 1
                row_offset += table.num_rows
        except pa.ArrowException as err:
            raise ConfigError(f"input.path: {f.path}: cannot read ({_first_line(err)})") from None
        except OSError as err:  # an object store that stops answering mid-run: a rerun continues
            if not fs.is_remote(f.path):
                raise
            raise WorkLeftError(f"input.path: {f.path}: cannot read ({fs.store_error(err)}); rerun to continue") from None
    if totals is not None:
        totals.update(units=seq, rows=row_offset)


def _parquet_units(parquet: pq.ParquetFile, columns: list[str], rows_per_part: int,
                   chosen: list[int]) -> Iterator[tuple[int, pa.Table]]:
    """The `chosen` units of a Parquet file (indices within it, ascending)
    with their tables, decoding only the row groups they lie in, each once:
    units next to each other, or sharing a row group, are read in one pass
    (a shard's every N-th unit of a file with large row groups decodes each
    group once, not once per unit)."""
    meta = parquet.metadata
    group_starts = list(itertools.accumulate((meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
                                             initial=0))
    n_rows = group_starts[-1]

    def rows_of(j: int) -> tuple[int, int]:
        return j * rows_per_part, min((j + 1) * rows_per_part, n_rows)

    def groups_of(lo: int, hi: int) -> tuple[int, int]:
        """The row groups rows [lo, hi) lie in: first, and one past the last."""
        return bisect.bisect_right(group_starts, lo) - 1, bisect.bisect_left(group_starts, hi)

    passes: list[list[int]] = []
    end_group = 0  # one past the last row group the current pass reads
    for j in chosen:
        first_group, next_end = groups_of(*rows_of(j))
        if passes and (j == passes[-1][-1] + 1 or first_group < end_group):
            passes[-1].append(j)
        else:
            passes.append([j])
        end_group = next_end
    for units in passes:
        lo, hi = rows_of(units[0])[0], rows_of(units[-1])[1]
        g0, g1 = groups_of(lo, hi)
        batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=range(g0, g1), columns=columns)
        wanted = set(units)
        for start, table in _slices(_rows(batches, lo - group_starts[g0], hi - lo), rows_per_part):
            j = units[0] + start // rows_per_part
            if j in wanted:  # a unit between wanted ones, in a row group they share
                yield j, table


def _rows(batches: Iterator[pa.RecordBatch], skip: int, take: int) -> Iterator[pa.RecordBatch]:
    """`take` rows of a stream of batches, after its first `skip`."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, take)
        skip, take = 0, take - batch.num_rows
        if batch.num_rows:
            yield batch
        if take <= 0:
            return


def _csv_batches(source: Any, path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    # CSV has no types: every column is read as text, so a late odd value
    # cannot break type inference halfway through a file.
    convert = pacsv.ConvertOptions(
        include_columns=columns,
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,  # "" stays an empty string, a bare empty field is null
    )
    read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    parse = pacsv.ParseOptions(newlines_in_values=True, delimiter="\t" if path.endswith(".tsv") else ",")
    with pacsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert) as reader:
        yield from reader


def _slices(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[tuple[int, pa.Table]]:
    """Regroup a stream of batches into tables of exactly `rows` rows (the last may be short)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    start = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == rows:
                yield start, pa.Table.from_batches(pending)
                start += rows
                pending, pending_rows = [], 0
    if pending_rows:
        yield start, pa.Table.from_batches(pending)


def _format_of(path: str, configured: str) -> FileFormat | None:
    if configured in ("parquet", "csv"):
        return configured  # type: ignore[return-value]
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
