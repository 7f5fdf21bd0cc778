"""Prompt-table file formats: one file's bytes -> Arrow tables of raw rows.

Each row gets its identity from where it sits: ``__source`` (the file) and ``__row`` (its
position in that file), so a row without an id column keeps the same identity however
the job is split. Problems confined to one row (a JSONL line that is not JSON, a CSV cell
that is not UTF-8) do not fail the table: the row carries ``__read_error`` and becomes an
error row with its reason. Problems with the whole file raise :class:`InputError`.

Text formats are read with every column as a string (CSV carries no types; a prompt
``42`` stays the text ``"42"``); validation parses numbers per row.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec.config import InputConfig
from pipeline.spec.schema import INPUT_ROW, INPUT_SOURCE, READ_ERROR
from pipeline.storage import filesystem

CHUNK_ROWS = 4096


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
        total = 0
        for path in files:
            with filesystem.storage_errors(path, "read"), fs.open(path, "rb") as f:
                try:
                    total += pq.ParquetFile(f).metadata.num_rows
                except (pa.ArrowInvalid, OSError) as exc:
                    raise InputError(f"{inp.url}: {path}: not a readable Parquet file: {exc}") from None
        return total
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


def read_file(stream: BinaryIO, fmt: str, source: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Yield the rows of one prompt-table file as Arrow tables of at most ``chunk_rows``.

    ``source`` names the file in row identities; it should not depend on where the table
    is stored (a path relative to the input URL), so moving the table keeps identities.
    """
    yield from numbered(_READERS[fmt](stream), source, chunk_rows)


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


def _parquet(stream: BinaryIO) -> Iterator[pa.Table]:
    try:
        # Parquet needs random access (footer first); Ray's file streams are sequential.
        source = stream if getattr(stream, "seekable", lambda: False)() else pa.BufferReader(stream.read())
        parquet = pq.ParquetFile(source)
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}") from None


def _delimited(delimiter: str, quoted: bool):
    def read(stream: BinaryIO) -> Iterator[pa.Table]:
        data = stream.read()
        if not data.strip():
            return
        header_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
        quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
        names = next(csv.reader([header_line], delimiter=delimiter, quoting=quoting))
        if len(set(names)) != len(names):
            raise InputError(f"the header has repeated column names: {names}")
        try:
            table = pacsv.read_csv(
                pa.BufferReader(data),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False),
                # Binary first: one undecodable cell must not fail the whole file.
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.binary() for name in names}, strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid as exc:
            raise InputError(f"not a readable {'CSV' if quoted else 'TSV'} file: {exc}") from None
        yield _decode_binary_columns(table)

    return read


def _decode_binary_columns(table: pa.Table) -> pa.Table:
    """Binary columns -> UTF-8 strings; cells that are not UTF-8 become replacement
    characters and their row gets a ``__read_error`` naming the column."""
    errors: list[str | None] = [None] * table.num_rows
    columns = []
    for name in table.column_names:
        column = table.column(name)
        try:
            columns.append(pc.cast(column, pa.string()))
            continue
        except pa.ArrowInvalid:
            pass
        values = []
        for i, raw in enumerate(column.to_pylist()):
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(raw.decode("utf-8", errors="replace"))
                errors[i] = errors[i] or f"column {name!r} is not valid UTF-8 text"
        columns.append(pa.array(values, pa.string()))
    result = pa.table(dict(zip(table.column_names, columns)))
    if any(errors):
        result = result.append_column(READ_ERROR, pa.array(errors, pa.string()))
    return result


def _jsonl(stream: BinaryIO) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(io.BytesIO(stream.read()), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc.msg})"
            row = {READ_ERROR: f"line {number} is {reason}", "line": line.decode("utf-8", errors="replace")}
        if not isinstance(row, dict):
            row = {READ_ERROR: f"line {number} is a JSON {type(row).__name__}, not an object", "line": line.decode()}
        rows.append(row)
    if rows:
        yield rows_to_table(rows)


def _json(stream: BinaryIO) -> Iterator[pa.Table]:
    try:
        data = json.loads(stream.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable JSON file: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise InputError("a .json prompt table must be an array of objects; use .jsonl for one object per line")
    if data:
        yield rows_to_table(data)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of JSON values -> a table. A column whose values do not share one type
    (``seed: 7`` in one row, ``seed: "abc"`` in another) becomes text, so the row, not
    the file, is what validation rejects."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
                pa.string(),
            )
    return pa.table(columns)


_READERS = {
    "parquet": _parquet,
    "csv": _delimited(",", quoted=True),
    # TSV prompt tables hold quotes as text (PartiPrompts has a prompt starting with `"`).
    "tsv": _delimited("\t", quoted=False),
    "jsonl": _jsonl,
    "json": _json,
}
