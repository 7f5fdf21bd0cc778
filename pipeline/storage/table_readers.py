"""Prompt-table file formats: one file's bytes -> Arrow tables of raw rows, a chunk at a time.

Parquet by its row groups; CSV (pyarrow's streaming reader), TSV (Python's csv reader,
strict, then the lenient TSV rule from the first record it refuses) and JSONL are read
:data:`TEXT_BLOCK_BYTES` at a time, so a file of any size is read in bounded memory and
its first rows come after a few blocks; a JSON array is read whole. Every text column
comes back as text (validation parses numbers per row); a cell that is not UTF-8 or a
JSONL line that is not a JSON object marks its own row (``__read_error``), and only a
problem with the whole file raises :class:`InputError`. Row numbering and the table as a
whole are :mod:`.tables`' job.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from typing import Any, BinaryIO, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec import cells
from pipeline.spec.schema import READ_ERROR, READ_TEXT

# Rows a reader puts in one table (JSONL lines, TSV records, Parquet batch rows).
CHUNK_ROWS = 4096


def _parquet(stream: BinaryIO, row_groups: Optional[tuple[int, ...]] = None) -> Iterator[pa.Table]:
    """A Parquet file's rows (only ``row_groups`` when given), without a pandas index."""
    try:
        # Parquet needs random access (footer first); Ray's file streams are sequential.
        source = stream if getattr(stream, "seekable", lambda: False)() else pa.BufferReader(stream.read())
        parquet = pq.ParquetFile(source)
        data_columns = parquet_columns(parquet.schema_arrow)
        groups = list(row_groups) if row_groups is not None else None
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, row_groups=groups, columns=data_columns):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}") from None


# pandas stores an unnamed index (any but a plain 0..n-1 range) as a column of this name:
# row positions of a DataFrame, not data. A named index keeps its name and stays a column.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def parquet_columns(schema: pa.Schema) -> list[str]:
    """The columns of a Parquet file that are data: all but an unnamed pandas index."""
    return [name for name in schema.names if not _PANDAS_INDEX.fullmatch(name)]


# Bytes a text reader takes from its file at a time, so a file of any size is read in
# bounded memory and its first rows come after a few blocks, not the whole file. pyarrow's
# CSV reader reads about 32 blocks ahead and needs one row to fit in a block.
TEXT_BLOCK_BYTES = 1 << 20


def _blocks(stream: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in blocks cut after a newline (the last one may lack it), the
    byte-order mark Excel's "CSV UTF-8" starts with removed: pyarrow drops it from the first
    column's name, so text-only column types keyed by the name with the mark would miss
    that column and it would be type-guessed (id 007 -> 7). A first block that is not
    line-based text raises :class:`InputError` (:func:`_check_text`)."""
    rest, first = b"", True
    while True:
        data = stream.read(TEXT_BLOCK_BYTES)
        if first:
            data, first = data.removeprefix(codecs.BOM_UTF8), False
            _check_text(data)
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
    """Blocks already read, then the rest of a stream: one readable file for pyarrow.

    A read is filled across blocks (short only at the end, or by the CR it holds back):
    pyarrow takes each read as a block, and a row that straddles two block boundaries
    fails the file."""

    def __init__(self, head: bytes, rest: Iterator[bytes]):
        self._buffer, self._at, self._rest = memoryview(head), 0, rest

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        filled = 0
        while filled < len(target):
            if self._at == len(self._buffer):
                block = next(self._rest, None)
                if block is None:
                    break
                self._buffer, self._at = memoryview(block), 0
            n = min(len(target) - filled, len(self._buffer) - self._at)
            target[filled : filled + n] = self._buffer[self._at : self._at + n]
            self._at += n
            filled += n
        if filled == len(target) > 1 and target[filled - 1] == 0x0D:
            # Never end a block between a CR and what follows: pyarrow (26) drops the LF of
            # a quoted CRLF cut there ("a\r\nb" read back as "a\rb").
            self._at -= 1
            filled -= 1
        return filled


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
    try:
        names = next(csv.reader([head.lstrip(b"\r\n").split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")]))
    except csv.Error as exc:
        raise InputError(f"not a readable CSV file: its header does not parse ({exc})") from None
    _check_names(names)
    try:
        reader = pacsv.open_csv(
            _Joined(head, blocks),
            read_options=pacsv.ReadOptions(block_size=TEXT_BLOCK_BYTES, use_threads=False),
            # Quote-aware block boundaries: a quoted field may hold newlines (LLM-written
            # prompts do), and a block cut at one of them fails the file or splits its row.
            parse_options=pacsv.ParseOptions(delimiter=",", quote_char='"', newlines_in_values=True),
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


def _check_text(head: bytes) -> None:
    """Refuse, with one message, a file that is not line-based text: binary data (a NUL
    byte in its first 8 KB, git's test) or lines ended by CR alone (classic Mac OS), which
    would be one endless line here (blocks are cut at newlines, so the reader would hold
    the whole file) and is rare enough to ask for a conversion."""
    if b"\0" in head[:8192]:
        raise InputError("not a text file: it holds NUL bytes (binary data?); check that the file is the table its name says")
    if b"\r" in head and b"\n" not in head:
        raise InputError("its lines end in CR alone (classic Mac OS line ends); save it with LF or CRLF line ends")


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


def _jsonl(stream: BinaryIO, id_column: Optional[str] = None) -> Iterator[pa.Table]:
    """A JSONL file, :data:`CHUNK_ROWS` lines at a time. Column types are worked out per
    chunk (:func:`rows_to_table`), but the id column is text value by value
    (:func:`_checked`); validation parses each value on its own row, so a row's fate and
    identity do not depend on its neighbours."""
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
            elif READ_ERROR not in row:
                row = _checked(row, id_column, f"line {number}", line.decode() if _SURROGATE_ESCAPE.search(line) else None)
            rows.append(row)
            if len(rows) >= CHUNK_ROWS:
                yield rows_to_table(rows)
                rows = []
    if rows:
        yield rows_to_table(rows)


def _json(stream: BinaryIO, id_column: Optional[str] = None) -> Iterator[pa.Table]:
    raw = stream.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable JSON file: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise InputError("a .json prompt table must be an array of objects; use .jsonl for one object per line")
    escapes = bool(_SURROGATE_ESCAPE.search(raw))
    data = [_checked(row, id_column, f"object {i}", json.dumps(row) if escapes else None) for i, row in enumerate(data)]
    if data:
        yield rows_to_table(data)


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): a pair is one character, a lone
# one is a str that no encoder can write (Python's json accepts it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _checked(row: dict[str, Any], id_column: Optional[str], where: str, text: Optional[str]) -> dict[str, Any]:
    """A parsed JSON row as the table gets it: its id as text, decided by its own value
    (:func:`~pipeline.spec.cells.id_text`: ``1.0`` is ``"1"`` whatever the rows around
    it hold, where a column's type would follow its chunk's mix); or a row marked with
    :data:`READ_ERROR` when its id cannot be one, or when it holds a lone surrogate
    (checked only when ``text``, its JSON text, has a surrogate escape)."""
    if text is not None:
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return {READ_ERROR: f"{where} holds a lone surrogate U+{ord(exc.object[exc.start]):04X}, which is not text (no encoder can write it)", READ_TEXT: text}
    if id_column is not None and row.get(id_column) is not None and not isinstance(row[id_column], str):
        try:
            row[id_column] = cells.id_text(row[id_column])
        except cells.RowError as exc:
            return {READ_ERROR: f"{where}: {exc}", READ_TEXT: json.dumps(row)}
    return row


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


def read(stream: BinaryIO, fmt: str, id_column: Optional[str] = None, row_groups: Optional[tuple[int, ...]] = None) -> Iterator[pa.Table]:
    """One file of format ``fmt`` as tables of raw rows: the only way the job, ``validate``
    and ``verify`` read a file, so they never read one differently. ``id_column`` is
    made text value by value where a format's types follow the rows around a value
    (JSON, JSONL); ``row_groups`` reads only those of a Parquet file."""
    if fmt == "parquet":
        return _parquet(stream, row_groups)
    if fmt in ("json", "jsonl"):
        return _JSON_READERS[fmt](stream, id_column)
    # Quotes enclose a TSV field only when they enclose all of it (see _tsv).
    return {"csv": _csv, "tsv": _tsv}[fmt](stream)


_JSON_READERS = {"jsonl": _jsonl, "json": _json}
