"""Request ids held compactly: 8-byte hashes in a sorted uint64 array.

:func:`id_hashes` turns request ids into uint64 hashes, vectorised; :class:`CommittedIds`
is a set of them (8 bytes an id, no Python object per id) with a vectorised
:meth:`~CommittedIds.contains`; :class:`SkipFilter` is what a run skips, and which of those
skips are adoptions. Pure: numpy and pyarrow only; :mod:`pipeline.batch.shared_skip_filter` shares a filter
with Ray tasks through the object store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i


def id_hashes(ids: Any) -> np.ndarray:
    """Request ids -> their 8-byte hashes (uint64), vectorised.

    A request id is the first 32 hex digits of a sha256 (:func:`pipeline.spec.validate.request_id`),
    so its first 16 digits already are a uniform 64-bit hash: they are parsed, not hashed
    again. Any other string gets an 8-byte blake2b. Two different ids share a hash with odds
    of about n_new * n_committed / 2**64 (5e-4 for 10^8 against 10^8), in which case the new
    one would be skipped as made; ``imagegen verify`` with the spec finds such a row.
    """
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint64:
        return ids
    array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.string())
    if array.type != pa.string():
        array = array.cast(pa.string())
    n = len(array)
    if n == 0:
        return np.empty(0, np.uint64)
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[array.offset : array.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    hexed = (np.diff(offsets) == 32) & np.asarray(array.is_valid())
    out = np.zeros(n, np.uint64)
    rows = np.flatnonzero(hexed)
    if rows.size == n and offsets[-1] - offsets[0] == 32 * n:  # the usual case: every id is 32 digits
        digits = _HEX[data[offsets[0] : offsets[-1]].reshape(n, 32)]
    elif rows.size:
        digits = _HEX[data[offsets[rows, None] + np.arange(32)]]
    if rows.size:
        clean = digits.max(axis=1) < 16
        if not clean.all():
            hexed[rows[~clean]] = False
            rows, digits = rows[clean], digits[clean]
        pairs = (digits[:, 0:16:2] << 4) | digits[:, 1:16:2]  # the first 8 bytes of the digest
        out[rows] = np.ascontiguousarray(pairs).view(">u8").ravel().astype(np.uint64)
    for i in np.flatnonzero(~hexed):
        value = array[int(i)].as_py() or ""
        out[i] = int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")
    return out


def sorted_unique_of(hashes: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort: numpy 2's ``np.unique`` hashes instead, ~40x slower on 10M uint64."""
    ordered = np.sort(hashes)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered if keep.all() else ordered[keep]


class CommittedIds:
    """A set of request ids held as a sorted uint64 array of their hashes (8 bytes an id,
    no Python object per id). :meth:`contains` is a vectorised ``np.searchsorted``.

    The array may be a read-only view (Ray's object store hands numpy arrays out
    zero-copy); nothing here writes to it.
    """

    def __init__(self, hashes: Optional[np.ndarray] = None, *, sorted_unique: bool = False):
        hashes = np.empty(0, np.uint64) if hashes is None else np.asarray(hashes, dtype=np.uint64)
        self.hashes = hashes if sorted_unique else sorted_unique_of(hashes)

    @classmethod
    def from_ids(cls, ids: Iterable[str] | pa.Array) -> "CommittedIds":
        return cls(id_hashes(ids))

    def contains(self, ids: pa.Array | pa.ChunkedArray | np.ndarray | list[str]) -> np.ndarray:
        """A bool array: for each id (strings, or hashes from :func:`id_hashes`), whether it is held."""
        h = id_hashes(ids)
        if not len(self.hashes) or not len(h):
            return np.zeros(len(h), dtype=bool)
        # Sorted needles walk the array in order (10x faster than random ones on 10M ids).
        order = np.argsort(h, kind="stable")
        needles = h[order]
        at = np.minimum(np.searchsorted(self.hashes, needles), len(self.hashes) - 1)
        held = np.empty(len(h), dtype=bool)
        held[order] = self.hashes[at] == needles
        return held

    def __contains__(self, request_id: str) -> bool:
        return bool(self.contains([request_id])[0])

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes)


@dataclass
class SkipFilter:
    """What a run skips: ``committed`` (every committed final id), and among them those
    ``adoptable`` (committed by interrupted runs: a skip of one of those is an adoption,
    counted in the run's summary). The Validator calls :meth:`contains`; the job's read
    tasks count :meth:`adopted` among the ids it skipped."""

    committed: CommittedIds = field(default_factory=CommittedIds)
    adoptable: CommittedIds = field(default_factory=CommittedIds)

    def contains(self, ids: Any) -> np.ndarray:
        return self.committed.contains(ids)

    def adopted(self, ids: Any) -> int:
        return int(self.adoptable.contains(ids).sum()) if len(self.adoptable) else 0

    def __len__(self) -> int:
        return len(self.committed)
