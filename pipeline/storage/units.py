"""A prompt table cut into read units: the pieces the job reads one task at a time.

A unit is a run of Parquet row groups (one big file gives many units), or whole files
(small files share a unit up to :data:`UNIT_ROWS` rows or :data:`UNIT_BYTES` bytes). Units
come in table order and rows keep the identity :mod:`.tables` gives them (file and
position in the file), so how a table is cut never changes a row's id, seed or request id.

Planning reads only listings and Parquet footers, never rows: the job can start its first
read while a table of any size is still unread. A text file (CSV, TSV, JSONL, JSON) is
one unit, read by one task: CSV rows may hold newlines inside quotes, and a row's position
in its file is its identity, so a byte range cannot be numbered without reading the
ranges before it. CSV, TSV and JSONL are read as a stream (:mod:`.tables`), so the task's
first blocks come after a few MB and its memory does not grow with the file; a JSON
array is read whole. :func:`text_advice` says what to do about a large one.

Pure: pyarrow and fsspec; no Ray.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec.config import InputConfig
from pipeline.storage import filesystem, tables

# Rows (Parquet) or bytes (text) a unit aims at: a read task's worth. Large enough that a
# unit's fixed costs (a task, a Parquet footer, a duplicate-id registration) stay small;
# small enough that the first blocks come within seconds and a unit's rows fit a task.
UNIT_ROWS = 65_536
UNIT_BYTES = 16 << 20
# Text files above this are read by one task for long enough to be worth splitting (and a
# JSON array is held whole); `imagegen validate` warns about them (see text_advice).
LARGE_TEXT_BYTES = 256 << 20


@dataclass(frozen=True)
class Piece:
    """One file, or some of its Parquet row groups (``row_groups``; None: the whole file).
    ``first_row`` is the file position of the piece's first row."""

    path: str
    source: str
    row_groups: Optional[tuple[int, ...]] = None
    first_row: int = 0


@dataclass(frozen=True)
class ReadUnit:
    """Pieces read by one task, in table order. ``seq`` numbers units from 0 in table
    order; ``rows`` is known for Parquet (from the footers), None for text."""

    seq: int
    pieces: tuple[Piece, ...]
    rows: Optional[int]


@dataclass(frozen=True)
class TablePlan:
    """The units of a table and what planning learned: total rows (None when some file is
    text and over the counting budget) and the sizes of its text files."""

    units: list[ReadUnit]
    rows: Optional[int]
    text_bytes: dict[str, int]


def plan_units(inp: InputConfig, unit_rows: Optional[int] = None, unit_bytes: Optional[int] = None) -> TablePlan:
    """Cut the table ``inp`` names into read units from its listing and Parquet footers
    (read on a few threads: on object stores a footer is a request). A unit holds at most
    ``unit_rows`` rows (:data:`UNIT_ROWS`) unless one row group is larger, or files of at
    most ``unit_bytes`` bytes in all (:data:`UNIT_BYTES`) unless one file is larger."""
    unit_rows = unit_rows or UNIT_ROWS
    unit_bytes = unit_bytes or UNIT_BYTES
    listing = tables.list_input(inp)
    fs, files = listing.fs, listing.files
    units: list[ReadUnit] = []
    pending: list[Piece] = []
    pending_size = 0

    def close() -> None:
        nonlocal pending, pending_size
        if pending:
            rows = pending_size if inp.format == "parquet" else None
            units.append(ReadUnit(len(units), tuple(pending), rows))
        pending, pending_size = [], 0

    if inp.format == "parquet":
        with ThreadPoolExecutor(8) as pool:
            footers = list(pool.map(lambda path: _row_groups(fs, path, inp.url), files))
        for path, groups in zip(files, footers):
            source, first = listing.source(path), 0
            chosen: list[int] = []
            for index, rows in enumerate(groups):
                if pending_size and pending_size + rows > unit_rows:
                    if chosen:
                        pending.append(Piece(path, source, tuple(chosen), first))
                        first += sum(groups[i] for i in chosen)
                        chosen = []
                    close()
                chosen.append(index)
                pending_size += rows
            if chosen:
                pending.append(Piece(path, source, tuple(chosen), first))
        close()
        return TablePlan(units, sum(sum(g) for g in footers), {})

    with filesystem.storage_errors(inp.url, "read"):
        sizes = {path: fs.size(path) for path in files}
    for path in files:
        if pending and pending_size + sizes[path] > unit_bytes:
            close()
        pending.append(Piece(path, listing.source(path)))
        pending_size += sizes[path]
    close()
    return TablePlan(units, tables.count_rows(inp), sizes)


def _row_groups(fs, path: str, url: str) -> list[int]:
    with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{url}: {path}: not a readable Parquet file: {exc}") from None
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_unit(inp: InputConfig, unit: ReadUnit, chunk_rows: int = tables.CHUNK_ROWS) -> Iterator[pa.Table]:
    """The raw rows of one unit, numbered within their files, in chunks of at most
    ``chunk_rows`` (a chunk never spans files)."""
    fs, _ = filesystem.open_url(inp.url, inp.storage_options)
    for piece in unit.pieces:
        with filesystem.storage_errors(piece.path, "read"), fs.open(piece.path, "rb") as f:
            try:
                yield from tables.read_file(f, inp.format, piece.source, chunk_rows, inp.id_column, piece.row_groups, piece.first_row)
            except InputError as exc:
                raise InputError(f"{inp.url}: {piece.path}: {exc}") from None


def text_advice(plan: TablePlan, fmt: str) -> list[str]:
    """What ``imagegen validate`` says about text files big enough to slow a job: each is
    read by one task (a JSON array whole, before its first block; CSV, TSV and JSONL as a
    stream), and how to shard it for reads in parallel."""
    big = {path: size for path, size in plan.text_bytes.items() if size > LARGE_TEXT_BYTES}
    if not big:
        return []
    shards = max(2, -(-max(big.values()) // UNIT_BYTES))
    if fmt == "json":
        how = "one task reads this JSON array whole before its first rows reach an engine; write it as JSONL (an object per line), which is read as a stream, or "
    else:
        how = (
            "one task reads it as a stream, so its rows are validated one task at a time (and with input.id_column the "
            "files after it wait until it is read); for reads in parallel, "
        )
    return [
        f"{path} is {size / 2**20:.0f} MB of {fmt.upper()}: {how}split it into files of about {UNIT_BYTES >> 20} MB "
        f"({shards} or more) in one folder and point input.url at the folder (a row's identity is its file and line, "
        "so set input.id_column to keep ids across the split), or write it as Parquet with row groups of about 50k rows"
        for path, size in big.items()
    ]
