"""Delimited text tables, CSV and TSV: one file's bytes -> Arrow tables of raw rows, every
column text.

CSV by pyarrow's streaming reader, TSV by Python's csv reader (strict, then the lenient
TSV rule from the first record it refuses), both :data:`~.text_blocks.TEXT_BLOCK_BYTES`
at a time (:mod:`.text_blocks`). Cells are read as bytes and decoded one by one, so a cell
that is not UTF-8 marks its own row (``__read_error``); only a problem with the whole
file raises :class:`~pipeline.errors.InputError`.
"""

from __future__ import annotations

import csv
import io
import re
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.errors import InputError
from pipeline.spec.schema import READ_ERROR
from pipeline.storage import text_blocks


def read_csv(stream: BinaryIO) -> Iterator[pa.Table]:
    """A CSV file, streamed by pyarrow's reader a block at a time (quoted fields as RFC
    4180 has them); every column binary, so each cell is decoded on its own row."""
    blocks = text_blocks.blocks(stream)
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
            text_blocks.Joined(head, blocks),
            read_options=pacsv.ReadOptions(block_size=text_blocks.TEXT_BLOCK_BYTES, use_threads=False),
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
            yield decode_binary_columns(pa.Table.from_batches([batch]))
    except pa.ArrowInvalid as exc:
        raise InputError(f"not a readable CSV file: {exc}") from None


def _check_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise InputError(f"the header has repeated column names: {names}")


def read_tsv(stream: BinaryIO) -> Iterator[pa.Table]:
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
        for block in text_blocks.blocks(stream):
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
            if len(records) >= text_blocks.CHUNK_ROWS:
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
    return decode_binary_columns(pa.table(columns))


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


def decode_binary_columns(table: pa.Table) -> pa.Table:
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
