"""A prompt table as a whole: its files read in order, rows numbered, its head and counts.

Each row gets its identity from where it sits: ``__source`` (the file) and ``__row`` (its
position in that file), so a row without an id column keeps the same identity however
the job is split. How one file's bytes become rows, per format, is :mod:`.table_readers`.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec.config import InputConfig
from pipeline.spec.schema import INPUT_ROW, INPUT_SOURCE
from pipeline.storage import filesystem, table_readers

CHUNK_ROWS = table_readers.CHUNK_ROWS


def read_input(inp: InputConfig, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Every row of the prompt table ``inp`` names, file by file, in this process.

    For checks that need the whole table before work starts (and for ``verify``); the
    job itself reads through Ray, file by file in parallel.
    """
    fs, base, files = filesystem.list_table(inp.url, inp.storage_options)
    if not files:
        raise InputError(f"no prompt-table files at {inp.url!r}")
    for path in files:
        with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
            try:
                yield from read_file(f, inp.format, filesystem.relative_name(path, base), chunk_rows)
            except InputError as exc:
                raise InputError(f"{inp.url}: {path}: {exc}") from None


def preflight(inp: InputConfig) -> None:
    """Check the table as a whole before any work: its files exist and the first readable
    rows have the columns ``inp`` names. Raises :class:`InputError` saying which setting
    to change. Reads only the head of the files it opens (:func:`head`), so it costs the
    same for a table of any size."""
    first = head(inp)
    if first is None:
        raise InputError(f"the prompt table at {inp.url!r} has no rows")
    columns = [c for c in first.column_names if not c.startswith("__")]
    needed = {"input.prompt_column": inp.prompt_column}
    if inp.id_column:
        needed["input.id_column"] = inp.id_column
    needed.update({f"input.columns.{k}": v for k, v in inp.columns.items()})
    for setting, column in needed.items():
        if column not in columns:
            raise InputError(
                f"{setting} is {column!r}, but {inp.url} has no such column; its columns are {columns}. "
                f"Set {setting} to one of them."
            )


HEAD_BYTES = 1 << 20


def head(inp: InputConfig, max_rows: int = 64) -> pa.Table | None:
    """The first rows of the first file of ``inp`` that has any, or None when none has.

    Parquet reads its first row group; a text file its first :data:`HEAD_BYTES` bytes cut
    at a line end (the whole file when that does not parse: a quoted newline at the cut,
    or JSON, which has no lines). JSONL columns are those of the head's lines.
    """
    fs, base, files = filesystem.list_table(inp.url, inp.storage_options)
    if not files:
        raise InputError(f"no prompt-table files at {inp.url!r}")
    for path in files:
        source = filesystem.relative_name(path, base)
        with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
            try:
                chunk = next(_head_chunks(f, inp.format, source, max_rows), None)
            except InputError as exc:
                raise InputError(f"{inp.url}: {path}: {exc}") from None
        if chunk is not None:
            return chunk
    return None


def _head_chunks(f: BinaryIO, fmt: str, source: str, max_rows: int) -> Iterator[pa.Table]:
    if fmt in ("parquet", "json"):
        yield from read_file(f, fmt, source, max_rows)
        return
    data = f.read(HEAD_BYTES + 1)
    if len(data) > HEAD_BYTES:
        try:
            chunks = list(read_file(io.BytesIO(data[: data.rfind(b"\n") + 1]), fmt, source, max_rows))
            if chunks:
                yield chunks[0]
                return
        except InputError:
            pass
        f.seek(0)
        data = f.read()
    yield from read_file(io.BytesIO(data), fmt, source, max_rows)


def count_rows(inp: InputConfig, max_text_bytes: int = 64 << 20) -> int | None:
    """The number of rows in the table ``inp`` names, or None where counting would mean
    reading a large table whole: Parquet is counted from its footers; text formats are
    read (and counted as the job reads them) only up to ``max_text_bytes`` in all."""
    fs, _, files = filesystem.list_table(inp.url, inp.storage_options)
    if inp.format == "parquet":
        return sum(_footer_rows(fs, path, inp.url) for path in files)
    with filesystem.storage_errors(inp.url, "read"):
        size = sum(fs.size(path) for path in files)
    if size > max_text_bytes:
        return None
    if inp.format == "jsonl":  # a row per non-blank line (a bad line is an error row): no need to parse
        total = 0
        for path in files:
            with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        return total
    return sum(chunk.num_rows for chunk in read_input(inp))


def rows_per_file(inp: InputConfig) -> dict[str, int]:
    """Rows in each file of the table ``inp`` names, by the file's name in row identities
    (``__source``): Parquet from the footers, text formats by reading them."""
    fs, base, files = filesystem.list_table(inp.url, inp.storage_options)
    if inp.format == "parquet":
        return {filesystem.relative_name(path, base): _footer_rows(fs, path, inp.url) for path in files}
    rows: dict[str, int] = {}
    for chunk in read_input(inp):
        for source, n in zip(*pc.value_counts(chunk.column(INPUT_SOURCE)).flatten()):
            rows[source.as_py()] = rows.get(source.as_py(), 0) + n.as_py()
    return rows


def _footer_rows(fs, path: str, url: str) -> int:
    with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{url}: {path}: not a readable Parquet file: {exc}") from None


def read_file(stream: BinaryIO, fmt: str, source: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Yield the rows of one prompt-table file as Arrow tables of at most ``chunk_rows``.

    ``source`` names the file in row identities; it should not depend on where the table
    is stored (a path relative to the input URL), so moving the table keeps identities.
    """
    yield from numbered(table_readers.READERS[fmt](stream), source, chunk_rows)


def numbered(tables: Iterable[pa.Table], source: str, chunk_rows: int = CHUNK_ROWS, first_row: int = 0) -> Iterator[pa.Table]:
    """Consecutive rows of one file, cut into chunks of at most ``chunk_rows``, each row
    given its identity: ``__source`` and ``__row`` (its position in the file, counted
    from ``first_row``)."""
    offset = first_row
    for table in tables:
        for batch in table.to_batches(max_chunksize=chunk_rows):
            chunk = pa.Table.from_batches([batch], schema=table.schema)
            n = chunk.num_rows
            chunk = chunk.append_column(INPUT_SOURCE, pa.array([source] * n, pa.string()))
            chunk = chunk.append_column(INPUT_ROW, pa.array(range(offset, offset + n), pa.int64()))
            offset += n
            yield chunk
