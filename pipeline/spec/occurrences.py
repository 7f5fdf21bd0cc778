"""Content identity: a row without an id column is its content and its occurrence.

With ``input.identity: content`` (the default) and no ``input.id_column``, a row's
identity is a digest of what it asks for (its prompt and every parameter cell:
:func:`content_digest`) and its occurrence among identical rows in table order (the n-th
row with that content is ``#n``). Inserting, removing or reordering other rows, renaming
the file, splitting it or converting it to another format changes no other row's
identity. Identical rows differ only by their occurrence, so an inserted copy of a row
is a new row, and removing one copy leaves the last one's images unowned.

**Content.** The cells of the prompt column and of each parameter column the spec reads
(:data:`~pipeline.spec.config.ROW_PARAMETERS`, under their parameter names, so a renamed
column mapped by ``input.columns`` keeps identities), as read, before defaults: a spec's
defaults and limits change request ids, not identities. Each cell is canonical whatever
the format: an empty cell (null, blank text) is absent, so a column added empty changes
nothing; a whole number is the same as int, float or text (``64``, ``64.0``, ``"64"``);
other text is kept exactly. Pass-through columns are not content: editing one re-makes
nothing (the output keeps the values from when the row was made).

**Occurrence.** Needs a table-wide count in table order. The job reads units in parallel,
so each read task sends its rows' content keys (the whole 16-byte digests: two contents
never share a count) to the job's id registry actor (:mod:`pipeline.batch.id_registry`),
which answers in unit order, as it does for duplicate ids; readers in one process use an
:class:`Occurrences` of their own. Memory: 24 bytes per distinct content (key and
count), in the actor, never on the driver.

Pure: numpy and pyarrow only.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.spec import cells
from pipeline.spec.config import ROW_PARAMETERS, InputConfig
from pipeline.spec.duplicate_ids import DIGEST, REGISTER_ROWS, id_batches
from pipeline.spec.schema import INPUT_CONTENT, INPUT_OCCURRENCE


def canonical(value: Any) -> Any:
    """One cell's value as the same JSON value in every format (see the module docstring);
    None for an empty cell."""
    if cells.missing(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text) if any(c.isdigit() for c in text) else None
        except ValueError:
            number = None
        return value if number is None else canonical(number)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value) and value.is_integer() and abs(value) < cells.EXACT_FLOAT:
            return int(value)
        return repr(value)
    return str(value)


def content_columns(inp: InputConfig) -> dict[str, str]:
    """The columns a row's content is made of: parameter name -> column name."""
    return {"prompt": inp.prompt_column, **{p: inp.column_for(p) for p in ROW_PARAMETERS}}


def content_digest(raw: dict[str, Any], inp: InputConfig) -> str:
    """The digest (32 hex digits, 128 bits) of a raw row's content: its prompt and parameter cells."""
    return _digest({name: raw.get(column) for name, column in content_columns(inp).items()})


def table_digests(table: pa.Table, inp: InputConfig) -> list[str]:
    """:func:`content_digest` of each row of ``table``, reading only its content columns."""
    present = {name: column for name, column in content_columns(inp).items() if column in table.column_names}
    values = [table.column(column).to_pylist() for column in present.values()]
    return [_digest(dict(zip(present, row))) for row in zip(*values)] if present else [_digest({})] * table.num_rows


def _digest(cells_by_name: dict[str, Any]) -> str:
    content = {name: canonical(value) for name, value in cells_by_name.items()}
    text = json.dumps({k: v for k, v in content.items() if v is not None}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def content_keys(digests: list[str]) -> np.ndarray:
    """The keys the occurrence count goes by: each digest's 16 bytes (a :data:`DIGEST` array)."""
    return np.frombuffer(bytes.fromhex("".join(digests)), DIGEST) if digests else np.empty(0, DIGEST)


class Occurrences:
    """Content keys seen so far -> how many rows had each: :meth:`number` gives each new
    row its occurrence. Sorted levels (as :class:`~pipeline.spec.duplicate_ids.SeenIds`),
    counts updated in place: adding n keys costs O(n log n) over a job."""

    def __init__(self) -> None:
        self._levels: list[tuple[np.ndarray, np.ndarray]] = []  # (keys sorted, counts)

    def number(self, keys: np.ndarray) -> np.ndarray:
        """Each key's occurrence (0 for the first row with it, in the order given), counting
        every key registered before. Not idempotent: the registry calls it once per batch."""
        keys = np.asarray(keys, DIGEST)
        if not len(keys):
            return np.zeros(0, np.int64)
        unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        before = np.zeros(len(unique), np.int64)
        found = np.zeros(len(unique), bool)
        for level_keys, level_counts in self._levels:
            at = np.minimum(np.searchsorted(level_keys, unique), len(level_keys) - 1)
            hit = level_keys[at] == unique
            before[hit] = level_counts[at[hit]]
            level_counts[at[hit]] += counts[hit]
            found |= hit
        # Rank of each row among the rows of its key in this batch, in order.
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(len(keys), np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(starts, counts)
        if (~found).any():
            self._add(unique[~found], counts[~found].astype(np.int64))
        return before[inverse] + rank

    def present(self, ids: list[str]) -> list[bool]:
        """For each content id (``<digest>#<n>``, as the validator names a row): whether the
        rows numbered so far include it (its content counted more than ``n`` times). Ids of
        another form (an id column's, a position) are taken as present."""
        parsed = [_parse(i) for i in ids]
        keys = content_keys([p[0] if p else "0" * 32 for p in parsed])
        counts = np.zeros(len(ids), np.int64)
        for level_keys, level_counts in self._levels:
            at = np.minimum(np.searchsorted(level_keys, keys), len(level_keys) - 1)
            hit = level_keys[at] == keys
            counts[hit] = level_counts[at[hit]]
        return [p is None or bool(count > p[1]) for p, count in zip(parsed, counts)]

    def _add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._levels.append((keys, counts))
        while len(self._levels) > 1 and len(self._levels[-2][0]) <= 2 * len(self._levels[-1][0]):
            (k1, c1), (k2, c2) = self._levels.pop(), self._levels.pop()
            k, c = np.concatenate([k2, k1]), np.concatenate([c2, c1])
            order = np.argsort(k, kind="stable")
            self._levels.append((k[order], c[order]))


def _parse(row_id: str) -> tuple[str, int] | None:
    digest, _, n = row_id.partition("#")
    if len(digest) != 32 or not n.isdigit():
        return None
    try:
        bytes.fromhex(digest)
    except ValueError:
        return None
    return digest, int(n)


def numbered_batches(
    chunks: Iterable[pa.Table],
    inp: InputConfig,
    number: Callable[[np.ndarray, bool], np.ndarray],
    batch_rows: int = REGISTER_ROWS,
) -> Iterator[list[pa.Table]]:
    """One read unit's raw ``chunks`` in batches of about ``batch_rows`` rows, each chunk
    given :data:`~pipeline.spec.schema.INPUT_CONTENT` (its rows' digests) and
    :data:`~pipeline.spec.schema.INPUT_OCCURRENCE`. ``number(keys, last)`` (an
    :class:`Occurrences`' ``number``, or the job's registry actor, which answers units in
    table order) is called once per batch, in order, ``last`` on the unit's last; as in
    :func:`~pipeline.spec.duplicate_ids.id_batches`, the next batch is read before the
    current one is numbered, so the next unit's task can go on once this one is read."""
    batch, held = [], 0
    pending: list[pa.Table] | None = None

    def finish(tables: list[pa.Table], last: bool) -> list[pa.Table]:
        digests = [table_digests(t, inp) for t in tables]
        keys = content_keys([d for ds in digests for d in ds])
        occurrence = np.asarray(number(keys, last), np.int64)
        out, at = [], 0
        for t, ds in zip(tables, digests):
            t = t.append_column(INPUT_CONTENT, pa.array(ds, pa.string()))
            out.append(t.append_column(INPUT_OCCURRENCE, pa.array(occurrence[at : at + len(ds)], pa.int64())))
            at += len(ds)
        return out

    for chunk in chunks:
        batch.append(chunk)
        held += chunk.num_rows
        if held >= batch_rows:
            if pending is not None:
                yield finish(pending, False)
            pending, batch, held = batch, [], 0
    if batch:
        if pending is not None:
            yield finish(pending, False)
        pending = batch
    yield finish(pending or [], True)


def numbered(chunks: Iterable[pa.Table], inp: InputConfig) -> Iterator[pa.Table]:
    """A whole table's ``chunks`` (in table order), numbered in this process where rows are
    identified by content (for checks that read the table themselves: verify, inspect)."""
    if inp.id_column or inp.identity != "content":
        yield from chunks
        return
    counter = Occurrences()
    for batch in numbered_batches(chunks, inp, lambda keys, last: counter.number(keys)):
        yield from batch


def needs_registry(inp: InputConfig) -> bool:
    """Whether reading ``inp`` needs the table-wide count in table order (duplicate ids or occurrences)."""
    return bool(inp.id_column) or inp.identity == "content"


def identified_batches(
    chunks: Iterable[pa.Table],
    inp: InputConfig,
    register: Callable[[Any, bool], dict[str, str]],
    number: Callable[[np.ndarray, bool], np.ndarray],
) -> Iterator[tuple[list[pa.Table], dict[str, str]]]:
    """One read unit's raw ``chunks`` in batches ready to validate, each with its rows'
    repeated ids: by id column (:func:`~pipeline.spec.duplicate_ids.id_batches` through
    ``register``), numbered by content (:func:`numbered_batches` through ``number``), or
    as they are (position identity)."""
    if not inp.id_column and inp.identity == "content":
        yield from ((batch, {}) for batch in numbered_batches(chunks, inp, number))
    else:
        yield from id_batches(chunks, inp.id_column, register)
