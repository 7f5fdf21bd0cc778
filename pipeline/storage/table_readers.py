"""Prompt-table file formats: one file's bytes -> Arrow tables of raw rows, a chunk at a time.

:func:`read` is the one way in. Parquet by its row groups; CSV and TSV by
:mod:`.delimited_readers`; JSONL a block at a time (:mod:`.text_blocks`), so a file of any
size is read in bounded memory and its first rows come after a few blocks; a JSON array
is read whole. Every text column
comes back as text (validation parses numbers per row); a cell that is not UTF-8 or a
JSONL line that is not a JSON object marks its own row (``__read_error``), and only a
problem with the whole file raises :class:`InputError`. Row numbering and the table as a
whole are :mod:`.tables`' job.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, BinaryIO, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec import cells
from pipeline.spec.schema import READ_ERROR, READ_TEXT
from pipeline.storage import delimited_readers, text_blocks

def _parquet(stream: BinaryIO, row_groups: Optional[tuple[int, ...]] = None) -> Iterator[pa.Table]:
    """A Parquet file's rows (only ``row_groups`` when given), without a pandas index."""
    try:
        # Parquet needs random access (footer first); Ray's file streams are sequential.
        source = stream if getattr(stream, "seekable", lambda: False)() else pa.BufferReader(stream.read())
        parquet = pq.ParquetFile(source)
        data_columns = parquet_columns(parquet.schema_arrow)
        groups = list(row_groups) if row_groups is not None else None
        for batch in parquet.iter_batches(batch_size=text_blocks.CHUNK_ROWS, row_groups=groups, columns=data_columns):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}") from None


# pandas stores an unnamed index (any but a plain 0..n-1 range) as a column of this name:
# row positions of a DataFrame, not data. A named index keeps its name and stays a column.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def parquet_columns(schema: pa.Schema) -> list[str]:
    """The columns of a Parquet file that are data: all but an unnamed pandas index."""
    return [name for name in schema.names if not _PANDAS_INDEX.fullmatch(name)]


def _jsonl(stream: BinaryIO, id_column: Optional[str] = None) -> Iterator[pa.Table]:
    """A JSONL file, :data:`~.text_blocks.CHUNK_ROWS` lines at a time. Column types are worked out per
    chunk (:func:`rows_to_table`), but the id column is text value by value
    (:func:`_checked`); validation parses each value on its own row, so a row's fate and
    identity do not depend on its neighbours."""
    rows: list[dict[str, Any]] = []
    number = 0
    for block in text_blocks.blocks(stream):
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
            if len(rows) >= text_blocks.CHUNK_ROWS:
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
    # Quotes enclose a TSV field only when they enclose all of it (see read_tsv).
    return {"csv": delimited_readers.read_csv, "tsv": delimited_readers.read_tsv}[fmt](stream)


_JSON_READERS = {"jsonl": _jsonl, "json": _json}
