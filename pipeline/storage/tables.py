"""A prompt table as a whole: its files (:func:`list_input`, the one listing) read in
order, rows numbered, its head and counts.

Each row gets its identity from where it sits: ``__source`` (the file) and ``__row`` (its
position in that file), so a row without an id column keeps the same identity however
the job is split. How one file's bytes become rows, per format, is :mod:`.table_readers`.
"""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.spec.config import InputConfig, format_suffixes
from pipeline.spec.schema import INPUT_ROW, INPUT_SOURCE, SOURCE, passthrough_columns
from pipeline.storage import filesystem, table_readers, text_blocks

CHUNK_ROWS = text_blocks.CHUNK_ROWS


@dataclass(frozen=True)
class Listing:
    """A table's files, in the one order every reader takes them (the job, ``validate``,
    ``verify``), and the files of its folder that are not read, each with why."""

    fs: fsspec.AbstractFileSystem
    base: str
    files: list[str]
    skipped: list[tuple[str, str]]  # (name relative to the input URL, why it is not read)

    def source(self, path: str) -> str:
        """``path``'s name in row identities: relative to the input URL."""
        return filesystem.relative_name(path, self.base)

    def notes(self) -> list[str]:
        """One line per skipped file, for ``validate`` and the run's first lines."""
        return [f"skipped {name}: {why}" for name, why in self.skipped]


def list_input(inp: InputConfig) -> Listing:
    """The files of the table ``inp`` names. A URL naming one file is that file, whatever
    its name. In a folder (searched to any depth), a file whose path below the folder has
    a part starting with ``.`` or ``_`` is skipped (hidden: Spark's ``_SUCCESS``, ``.crc``
    files, ``.ipynb_checkpoints/``), as is a file whose name does not end as
    ``input.format``'s files do (``part-1.csv.bak``: read, it would repeat every row);
    both are named in :meth:`Listing.notes`, never skipped silently. No file to read
    raises :class:`InputError` naming what was skipped."""
    fs, path = filesystem.open_url(inp.url, inp.storage_options)
    with filesystem.storage_errors(inp.url, "read"):
        if fs.isfile(path):
            return Listing(fs, posixpath.dirname(path), [path], [])
        if not fs.isdir(path):
            raise FileNotFoundError(path)
        found = sorted(fs.find(path))
    base, endings = path.rstrip("/"), format_suffixes(inp.format)
    files, skipped = [], []
    for name in found:
        relative = filesystem.relative_name(name, base)
        hidden = [part for part in relative.split("/") if part.startswith((".", "_"))]
        if hidden:
            skipped.append((relative, f"{hidden[0]!r} starts with '.' or '_', which marks hidden files (Spark's _SUCCESS, .crc); rename it to read it"))
        elif not relative.lower().endswith(endings):
            skipped.append((relative, f"not a {inp.format} file by its name (input.format {inp.format} reads {', '.join(endings)}); rename it to read it"))
        else:
            files.append(name)
    if not files:
        listed = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise InputError(f"no prompt-table files at {inp.url!r}" + (f" (skipped {listed})" if listed else ""))
    return Listing(fs, base, files, skipped)


def read_input(inp: InputConfig, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Every row of the prompt table ``inp`` names, file by file, in this process.

    For checks that need the whole table before work starts (and for ``verify``); the
    job itself reads through Ray, file by file in parallel.
    """
    listing = list_input(inp)
    for path in listing.files:
        with filesystem.storage_errors(path, "read"), listing.fs.open(path, "rb") as f:
            try:
                yield from read_file(f, inp.format, listing.source(path), chunk_rows, inp.id_column)
            except InputError as exc:
                raise InputError(f"{inp.url}: {path}: {exc}") from None


def preflight(inp: InputConfig) -> list[str]:
    """Check the table as a whole before any work: its files exist and the first readable
    rows have the columns ``inp`` names. Raises :class:`InputError` saying which setting
    to change. Reads only the head of the files it opens (:func:`head`) and, for a
    Parquet table of several files, every footer (a pass-through column's one type):
    never the rows of a table of any size. Returns the lines naming the files not read
    (:meth:`Listing.notes`), for the caller to print first."""
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
    listing = list_input(inp)
    if inp.format == "parquet" and len(listing.files) > 1:
        _check_parquet_types(inp, listing)
    return listing.notes()


def _check_parquet_types(inp: InputConfig, listing: Listing) -> None:
    """A pass-through column of two types in two Parquet files, from their footers (read
    on a few threads): refused before any work, not at the first part holding both."""

    def schema(path: str) -> tuple[str, pa.Schema]:
        with filesystem.storage_errors(path, "read"), listing.fs.open(path, "rb") as f:
            try:
                found = pq.read_schema(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{inp.url}: {path}: not a readable Parquet file: {exc}") from None
        carried = passthrough_columns(inp, table_readers.parquet_columns(found))
        return listing.source(path), pa.schema([found.field(name) for name in carried])

    with ThreadPoolExecutor(8) as pool:
        check_column_types(list(pool.map(schema, listing.files)))


HEAD_BYTES = 1 << 20


def head(inp: InputConfig, max_rows: int = 64) -> pa.Table | None:
    """The first rows of the first file of ``inp`` that has any, or None when none has.

    Parquet reads its first row group; a text file its first :data:`HEAD_BYTES` bytes cut
    at a line end (the whole file when that does not parse: a quoted newline at the cut,
    or JSON, which has no lines). JSONL columns are those of the head's lines.
    """
    listing = list_input(inp)
    for path in listing.files:
        with filesystem.storage_errors(path, "read"), listing.fs.open(path, "rb") as f:
            try:
                chunk = next(_head_chunks(f, inp.format, listing.source(path), max_rows, inp.id_column), None)
            except InputError as exc:
                raise InputError(f"{inp.url}: {path}: {exc}") from None
        if chunk is not None:
            return chunk
    return None


def _head_chunks(f: BinaryIO, fmt: str, source: str, max_rows: int, id_column: Optional[str]) -> Iterator[pa.Table]:
    if fmt in ("parquet", "json"):
        yield from read_file(f, fmt, source, max_rows, id_column)
        return
    data = f.read(HEAD_BYTES + 1)
    if len(data) > HEAD_BYTES:
        try:
            chunks = list(read_file(io.BytesIO(data[: data.rfind(b"\n") + 1]), fmt, source, max_rows, id_column))
            if chunks:
                yield chunks[0]
                return
        except InputError:
            pass
        f.seek(0)
        data = f.read()
    yield from read_file(io.BytesIO(data), fmt, source, max_rows, id_column)


def count_rows(inp: InputConfig, max_text_bytes: int = 64 << 20) -> int | None:
    """The number of rows in the table ``inp`` names, or None where counting would mean
    reading a large table whole: Parquet is counted from its footers; text formats are
    read (and counted as the job reads them) only up to ``max_text_bytes`` in all."""
    listing = list_input(inp)
    fs, files = listing.fs, listing.files
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
    listing = list_input(inp)
    if inp.format == "parquet":
        return {listing.source(path): _footer_rows(listing.fs, path, inp.url) for path in listing.files}
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


def read_file(
    stream: BinaryIO, fmt: str, source: str, chunk_rows: int = CHUNK_ROWS, id_column: Optional[str] = None, row_groups: Optional[tuple[int, ...]] = None, first_row: int = 0
) -> Iterator[pa.Table]:
    """Yield the rows of one prompt-table file (of its ``row_groups`` when given, the
    first of them at file position ``first_row``) as Arrow tables of at most
    ``chunk_rows`` (:func:`.table_readers.read`; ``id_column``: the table's id column).

    ``source`` names the file in row identities; it should not depend on where the table
    is stored (a path relative to the input URL), so moving the table keeps identities.
    """
    yield from numbered(table_readers.read(stream, fmt, id_column, row_groups), source, chunk_rows, first_row)


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


def concat_rows(parts: list[pa.Table]) -> pa.Table:
    """Consecutive tables of rows (validated blocks, a part's slices) as one, column
    types promoted (an all-null column takes the others' type, int64 becomes double).
    Pass-through columns come from the input as they are, so two files (or two chunks
    of a JSON file) can give one column types that do not promote: that raises
    :class:`InputError` naming the column, both types and their files, not Arrow's error."""
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        sources = [", ".join(sorted(set(part.column(SOURCE).to_pylist()))) if SOURCE in part.column_names else "?" for part in parts]
        check_column_types([(where, part.schema) for where, part in zip(sources, parts)])
        raise


def check_column_types(schemas: list[tuple[str, pa.Schema]], columns: Optional[Iterable[str]] = None) -> None:
    """Raise :class:`InputError` for the first of ``columns`` (default: all) whose types in
    ``schemas`` (``(where, schema)`` pairs: a file, or the files of some rows) do not
    promote to one type."""
    wanted = None if columns is None else set(columns)
    seen: dict[str, tuple[pa.Field, str]] = {}
    for where, schema in schemas:
        for field in schema:
            if wanted is not None and field.name not in wanted:
                continue
            if field.name not in seen:
                seen[field.name] = (field, where)
                continue
            first, first_where = seen[field.name]
            try:
                promoted = pa.unify_schemas([pa.schema([first]), pa.schema([field])], promote_options="permissive").field(0)
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(
                    f"column {field.name!r} is {first.type} in {first_where} but {field.type} in {where}: a column "
                    "passed through to the output needs one type in every file; convert it in one of them (to text, "
                    "for instance: in JSON, quote its values) or remove it"
                ) from None
            seen[field.name] = (promoted, first_where)
