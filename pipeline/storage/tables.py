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

import codecs
import csv
import io
import json
import re
from typing import Any, BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec.config import InputConfig
from pipeline.spec.schema import INPUT_ROW, INPUT_SOURCE, READ_ERROR, READ_TEXT
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
        data_columns = [name for name in parquet.schema_arrow.names if not _PANDAS_INDEX.fullmatch(name)]
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=data_columns):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}") from None


# pandas stores an unnamed index (any but a plain 0..n-1 range) as a column of this name:
# row positions of a DataFrame, not data. A named index keeps its name and stays a column.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _delimited(delimiter: str, quoted: bool):
    def read(stream: BinaryIO) -> Iterator[pa.Table]:
        # Excel's "CSV UTF-8" starts with a byte-order mark. pyarrow drops it from the first
        # column's name, so the text-only column types keyed by the name with the mark would
        # miss that column and it would be type-guessed (id 007 -> 7): strip it first.
        data = stream.read().removeprefix(codecs.BOM_UTF8)
        if not data.strip():
            return
        if not quoted and b'"' in data:
            yield _decode_binary_columns(_tsv_with_quotes(data))
            return
        header_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
        quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
        names = next(csv.reader([header_line], delimiter=delimiter, quoting=quoting))
        _check_names(names)
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
        guessed = [f.name for f in table.schema if f.type != pa.binary()]
        if guessed:  # every column must come back as text; a type guess changes values
            raise InputError(f"the header's column names {guessed} could not be matched to its columns; check the first line")
        yield _decode_binary_columns(table)

    return read


def _check_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise InputError(f"the header has repeated column names: {names}")


# A TSV field as csv, pandas and Excel write one that holds a quote, tab or newline:
# enclosed in quotes, inner quotes doubled, the closing quote ending the field.
_QUOTED_FIELD = re.compile(rb'"((?:[^"]|"")*)"(?=\t|\r?\n|\Z)')
_PLAIN_FIELD = re.compile(rb"[^\t\n]*")


def _tsv_with_quotes(data: bytes) -> pa.Table:
    """A TSV file that holds quotes -> a table of binary columns.

    A field that is a whole quoted field (``"a ""red"" car"``, as csv, pandas and Excel
    write a field holding a quote, tab or newline) is unquoted; any other field is taken
    as it is, quotes and all, as TSV without quoting has it (PartiPrompts' prompt
    ``"G I G G L E" painted ...`` starts with a quote that does not enclose the field).
    Only files with a quote come here: the rest take pyarrow's faster path, which the
    same rule reads identically. A file that Python's csv reader takes in strict mode
    (every field that starts with a quote is a whole quoted field: what pandas writes)
    is read by it, at C speed; any other is read field by field here (~1 MB/s).
    """
    try:
        records = _strict_tsv_records(data)
    except csv.Error:
        records = _tsv_records(data)
    names = [name.decode("utf-8", errors="replace") for name in records[0]]
    _check_names(names)
    for number, fields in enumerate(records[1:], start=2):
        if len(fields) != len(names):
            raise InputError(f"not a readable TSV file: record {number} has {len(fields)} fields, the header {len(names)}")
    return pa.table({name: pa.array([r[i] for r in records[1:]], pa.binary()) for i, name in enumerate(names)})


def _strict_tsv_records(data: bytes) -> list[list[bytes]]:
    """Records of a TSV whose quotes all enclose whole fields; :class:`csv.Error` otherwise.
    Bytes travel through text and back unchanged (surrogateescape), so a cell that is not
    UTF-8 is still marked on its own row."""
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"', doublequote=True, strict=True)
    return [[field.encode("utf-8", errors="surrogateescape") for field in record] for record in reader if record]


def _tsv_records(data: bytes) -> list[list[bytes]]:
    """Records of a TSV, any field that is not wholly enclosed in quotes taken as it is."""
    records: list[list[bytes]] = []
    record: list[bytes] = []
    pos, end = 0, len(data)
    while True:
        quoted = _QUOTED_FIELD.match(data, pos)
        if quoted:
            record.append(quoted.group(1).replace(b'""', b'"'))
            pos = quoted.end() + (data[quoted.end() : quoted.end() + 1] == b"\r")
        else:
            plain = _PLAIN_FIELD.match(data, pos)
            pos = plain.end()
            record.append(plain.group().removesuffix(b"\r") if pos == end or data[pos : pos + 1] == b"\n" else plain.group())
        if pos < end and data[pos : pos + 1] == b"\t":
            pos += 1
            continue
        if record != [b""]:  # blank lines are skipped, as pyarrow's reader does
            records.append(record)
        record = []
        pos += 1  # past the newline
        if pos >= end:
            break
    return records


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
            row = {READ_ERROR: f"line {number} is {reason}", READ_TEXT: line.decode("utf-8", errors="replace")}
        if not isinstance(row, dict):
            row = {READ_ERROR: f"line {number} is a JSON {type(row).__name__}, not an object", READ_TEXT: line.decode()}
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
    # Quotes enclose a TSV field only when they enclose all of it (see _tsv_with_quotes).
    "tsv": _delimited("\t", quoted=False),
    "jsonl": _jsonl,
    "json": _json,
}
