"""Duplicate ids at any table size: a compact record of the ids seen so far -> their first row.

A row whose id repeats an earlier row's id is rejected, naming the earlier row (see
:class:`~pipeline.spec.validate.Validator`). "Earlier" is table order: files in listing
order, rows in file order. The job reads the table as a sequence of read units (groups
of Parquet row groups, or whole files) on the cluster; each unit registers its ids with one
:class:`SeenIds` in unit order and learns which of its rows repeat an earlier id. The
record keeps no Python object per id: 16-byte digests of the whole id text in sorted
numpy arrays beside the first row's position (about 28 bytes an id: 2.8 GB for 100M ids).

Trade-off: ids are compared by a 128-bit digest (as request ids are themselves), so two
different ids are taken for one with odds of about n^2 / 2^129 (1.5e-23 for 100M distinct
ids); an 8-byte hash (3e-4 at 100M) would reject a good row as a repeat.

Pure: numpy only; the job puts one in a Ray actor (:mod:`pipeline.batch.reading`).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.spec import schema as S
from pipeline.spec.cells import RowError, id_text


DIGEST_BYTES = 16
# A 128-bit digest as numpy holds it: fixed-width bytes, compared and sorted whole, no
# Python object per value. Ids, content keys and request-id keys all use it.
DIGEST = np.dtype(f"S{DIGEST_BYTES}")


def id_hash(text: str) -> bytes:
    """A stable 128-bit digest of an id's whole text (the same in every process and run).
    Module-level, called through the module, so that tests can replace it to craft collisions."""
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def unit_ids(chunks: Iterable[pa.Table], id_column: str) -> "UnitIds":
    """The ids of one read unit's raw rows, in table order: ``(sources, hashes, source
    index, row)``, one entry per row with a non-empty id; ``sources`` names the files."""
    sources: list[str] = []
    index: dict[str, int] = {}
    hashes: list[bytes] = []
    where: list[int] = []
    rows: list[int] = []
    for chunk in chunks:
        if id_column not in chunk.column_names:
            continue
        columns = (chunk.column(c).to_pylist() for c in (id_column, S.INPUT_SOURCE, S.INPUT_ROW))
        for value, source, row in zip(*columns):
            try:
                text = id_text(value)  # the id text the Validator names a row by
            except RowError:
                continue  # a bad id is rejected on its own, never as a repeat
            if text is None:
                continue
            if source not in index:
                index[source] = len(sources)
                sources.append(source)
            hashes.append(id_hash(text))
            where.append(index[source])
            rows.append(row)
    return sources, np.array(hashes, DIGEST), np.array(where, np.int32), np.array(rows, np.int64)


# Rows of a read unit registered at once: a Parquet unit's worth (see
# pipeline.storage.units.UNIT_ROWS), so a Parquet unit registers once and a big text
# file, read as a stream, in pieces of bounded size.
REGISTER_ROWS = 65_536

UnitIds = tuple[list[str], np.ndarray, np.ndarray, np.ndarray]


def id_batches(
    chunks: Iterable[pa.Table],
    id_column: Optional[str],
    register: Callable[[UnitIds, bool], dict[str, str]],
    batch_rows: int = REGISTER_ROWS,
) -> Iterator[tuple[list[pa.Table], dict[str, str]]]:
    """One read unit's raw ``chunks`` in batches of about ``batch_rows`` rows, each with
    ``{position: first position}`` for its rows whose id an earlier row had.

    ``register(ids, last)`` (a :class:`SeenIds`, or the job's registry actor, which makes
    units register in table order) is called once per batch, in order, ``last`` on the
    unit's last batch; a unit without rows registers nothing but its end. With an id
    column, the batch after the current one is read before the current one is registered:
    the next unit waits for this one's ``last``, and so can start once this unit is read,
    not once its blocks are consumed (two batches are held; the first rows come a batch
    later). Without an id column nothing is registered and chunks are not held back.
    """
    batches = _batched(chunks, batch_rows)
    if not id_column:
        yield from ((batch, {}) for batch in batches)
        return
    batch = next(batches, None)
    if batch is None:
        register(unit_ids([], id_column), True)
    while batch is not None:
        following = next(batches, None)
        yield batch, register(unit_ids(batch, id_column), following is None)
        batch = following


def _batched(chunks: Iterable[pa.Table], rows: int) -> Iterator[list[pa.Table]]:
    batch: list[pa.Table] = []
    held = 0
    for chunk in chunks:
        batch.append(chunk)
        held += chunk.num_rows
        if held >= rows:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


class SeenIds:
    """Id digests seen so far -> the position (file, row) of the first row that had each.

    Kept as a few sorted levels (log-structured: a new unit's ids make a level, and levels
    of like size merge), so adding n ids costs O(n log n) over a job and a lookup one binary
    search per level.
    """

    def __init__(self) -> None:
        self._sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self._levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (hashes sorted, source, row)

    def __len__(self) -> int:
        return sum(len(level[0]) for level in self._levels)

    def register(self, sources: Sequence[str], hashes: np.ndarray, where: np.ndarray, rows: np.ndarray) -> dict[str, str]:
        """Add one unit's ids (as :func:`unit_ids` gives them, in table order) and return
        ``{position: first position}`` (``source#row``) for its rows whose id an earlier
        row had. Registering the same unit again (a retried read) gives the same answer."""
        if not len(hashes):
            return {}
        local = np.array([self._source_id(s) for s in sources], np.int32)
        where = local[where]
        unique, first_in_unit = np.unique(hashes, return_index=True)
        found, first_source, first_row = self._lookup(unique)
        # A hash seen in an earlier unit keeps that first row; a new one's first row is its first here.
        first_source = np.where(found, first_source, where[first_in_unit])
        first_row = np.where(found, first_row, rows[first_in_unit])
        slot = np.searchsorted(unique, hashes)
        repeat = (first_source[slot] != where) | (first_row[slot] != rows)
        repeats = {
            f"{self._sources[s]}#{r}": f"{self._sources[fs]}#{fr}"
            for s, r, fs, fr in zip(where[repeat], rows[repeat], first_source[slot][repeat], first_row[slot][repeat])
        }
        new = ~found
        if new.any():
            self._add(unique[new], first_source[new], first_row[new])
        return repeats

    def _source_id(self, source: str) -> int:
        if source not in self._source_index:
            self._source_index[source] = len(self._sources)
            self._sources.append(source)
        return self._source_index[source]

    def _lookup(self, unique: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = np.zeros(len(unique), bool)
        source = np.zeros(len(unique), np.int32)
        row = np.zeros(len(unique), np.int64)
        for hashes, sources, rows in self._levels:
            at = np.minimum(np.searchsorted(hashes, unique), len(hashes) - 1)
            hit = hashes[at] == unique
            found |= hit
            source[hit], row[hit] = sources[at[hit]], rows[at[hit]]
        return found, source, row

    def _add(self, hashes: np.ndarray, sources: np.ndarray, rows: np.ndarray) -> None:
        self._levels.append((hashes, sources, rows))  # np.unique gave them sorted
        while len(self._levels) > 1 and len(self._levels[-2][0]) <= 2 * len(self._levels[-1][0]):
            (h1, s1, r1), (h2, s2, r2) = self._levels.pop(), self._levels.pop()
            h, s, r = np.concatenate([h2, h1]), np.concatenate([s2, s1]), np.concatenate([r2, r1])
            order = np.argsort(h, kind="stable")
            self._levels.append((h[order], s[order], r[order]))


def find_duplicate_ids(chunks: Iterable[pa.Table], id_column: str) -> dict[str, str]:
    """Positions (``source#row``) of rows whose id an earlier row already has -> that
    earlier row's position, over ``chunks`` in table order, in this process (for checks
    that read the table themselves, such as ``verify --input``)."""
    return SeenIds().register(*unit_ids(chunks, id_column))
