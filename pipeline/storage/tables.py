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


# Bytes a text reader takes from its file at a time, so a file of any size is read in
# bounded memory and its first rows come after a few blocks, not the whole file. pyarrow's
# CSV reader reads about 32 blocks ahead and needs one row to fit in a block.
TEXT_BLOCK_BYTES = 1 << 20


def _blocks(stream: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in blocks cut after a newline (the last one may lack it), the
    byte-order mark Excel's "CSV UTF-8" starts with removed: pyarrow drops it from the first
    column's name, so text-only column types keyed by the name with the mark would miss
    that column and it would be type-guessed (id 007 -> 7)."""
    rest, first = b"", True
    while True:
        data = stream.read(TEXT_BLOCK_BYTES)
        if first:
            data, first = data.removeprefix(codecs.BOM_UTF8), False
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut]
    if rest:
        yield rest


class _Joined(io.RawIOBase):
    """Blocks already read, then the rest of a stream: one readable file for pyarrow."""

    def __init__(self, head: bytes, rest: Iterator[bytes]):
        self._buffer, self._at, self._rest = memoryview(head), 0, rest

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while self._at == len(self._buffer):
            block = next(self._rest, None)
            if block is None:
                return 0
            self._buffer, self._at = memoryview(block), 0
        n = min(len(target), len(self._buffer) - self._at)
        target[:n] = self._buffer[self._at : self._at + n]
        self._at += n
        return n


def _csv(stream: BinaryIO) -> Iterator[pa.Table]:
    """A CSV file, streamed by pyarrow's reader a block at a time (quoted fields as RFC
    4180 has them); every column binary, so each cell is decoded on its own row."""
    blocks = _blocks(stream)
    head = b""
    for block in blocks:  # the header: the first line that is not blank
        head += block
        if head.strip():
            break
    if not head.strip():
        return
    names = next(csv.reader([head.lstrip(b"\r\n").split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")]))
    _check_names(names)
    try:
        reader = pacsv.open_csv(
            _Joined(head, blocks),
            read_options=pacsv.ReadOptions(block_size=TEXT_BLOCK_BYTES, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=",", quote_char='"'),
            # Binary first: one undecodable cell must not fail the whole file.
            convert_options=pacsv.ConvertOptions(column_types={name: pa.binary() for name in names}, strings_can_be_null=False),
        )
        guessed = [f.name for f in reader.schema if f.type != pa.binary()]
        if guessed:  # every column must come back as text; a type guess changes values
            raise InputError(f"the header's column names {guessed} could not be matched to its columns; check the first line")
        for batch in reader:
            yield _decode_binary_columns(pa.Table.from_batches([batch]))
    except pa.ArrowInvalid as exc:
        raise InputError(f"not a readable CSV file: {exc}") from None


def _check_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise InputError(f"the header has repeated column names: {names}")


def _tsv(stream: BinaryIO) -> Iterator[pa.Table]:
    """A TSV file, a chunk of records at a time.

    A field that is a whole quoted field (``"a ""red"" car"``, as csv, pandas and Excel
    write a field holding a quote, tab or newline) is unquoted; any other field is taken
    as it is, quotes and all, as TSV without quoting has it (PartiPrompts' prompt
    ``"G I G G L E" painted ...`` starts with a quote that does not enclose the field).
    Records are read by Python's csv reader in strict mode (every field that starts with a
    quote is a whole quoted field: what pandas writes), at C speed, as long as it takes
    them; from the first record it refuses on, the rest of the file is read field by field
    here (~1 MB/s, and held whole: such files are rare and small). Both rules read a record
    that the strict one takes identically, so the switch changes no earlier record.
    """
    consumed: list[str] = []  # lines the csv reader took since its last record

    def lines() -> Iterator[str]:
        for block in _blocks(stream):
            # Bytes travel through text and back unchanged (surrogateescape), so a cell that
            # is not UTF-8 is still marked on its own row.
            for line in io.StringIO(block.decode("utf-8", errors="surrogateescape"), newline=""):
                consumed.append(line)
                yield line

    source = lines()
    reader = csv.reader(source, delimiter="\t", quotechar='"', doublequote=True, strict=True)
    names: list[str] | None = None
    records: list[list[bytes]] = []
    number = 0  # records so far, the header included
    yielded = False
    try:
        for record in reader:
            consumed.clear()
            if not record:
                continue  # blank lines are skipped, as pyarrow's reader does
            number += 1
            fields = [field.encode("utf-8", errors="surrogateescape") for field in record]
            names = names or _header(fields)
            if number > 1:
                records.append(_fields(fields, names, number))
            if len(records) >= CHUNK_ROWS:
                yield _binary_table(names, records)
                records, yielded = [], True
        rest = b""
    except csv.Error:
        rest = "".join([*consumed, *source]).encode("utf-8", errors="surrogateescape")
    for fields in _tsv_records(rest) if rest.strip() else []:
        number += 1
        names = names or _header(fields)
        if number > 1:
            records.append(_fields(fields, names, number))
    if names is not None and (records or not yielded):  # a header alone is a table without rows
        yield _binary_table(names, records)


def _header(fields: list[bytes]) -> list[str]:
    names = [name.decode("utf-8", errors="replace") for name in fields]
    _check_names(names)
    return names


def _fields(fields: list[bytes], names: list[str], number: int) -> list[bytes]:
    if len(fields) != len(names):
        raise InputError(f"not a readable TSV file: record {number} has {len(fields)} fields, the header {len(names)}")
    return fields


def _binary_table(names: list[str], records: list[list[bytes]]) -> pa.Table:
    columns = {name: pa.array([r[i] for r in records], pa.binary()) for i, name in enumerate(names)}
    return _decode_binary_columns(pa.table(columns))


# A TSV field as csv, pandas and Excel write one that holds a quote, tab or newline:
# enclosed in quotes, inner quotes doubled, the closing quote ending the field.
_QUOTED_FIELD = re.compile(rb'"((?:[^"]|"")*)"(?=\t|\r?\n|\Z)')
_PLAIN_FIELD = re.compile(rb"[^\t\n]*")


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
    """A JSONL file, :data:`CHUNK_ROWS` lines at a time. Column types are worked out per
    chunk (:func:`rows_to_table`); validation parses each value on its own row, so a
    row's fate does not depend on its neighbours."""
    rows: list[dict[str, Any]] = []
    number = 0
    for block in _blocks(stream):
        for line in io.BytesIO(block):
            number += 1
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
            if len(rows) >= CHUNK_ROWS:
                yield rows_to_table(rows)
                rows = []
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
    "csv": _csv,
    # Quotes enclose a TSV field only when they enclose all of it (see _tsv).
    "tsv": _tsv,
    "jsonl": _jsonl,
    "json": _json,
}
