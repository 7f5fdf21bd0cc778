"""Request ids held compactly and exactly: 16-byte keys in a sorted array.

A request id is 32 hex digits (the first 128 bits of a sha256:
:func:`pipeline.spec.validate.request_id`); :func:`id_keys` turns ids into those 16 bytes,
vectorised, as a numpy ``S16`` array (no Python object per id), so the key *is* the id:
every decision made on keys is made on the full id. :class:`CommittedIds` is a set of keys
with a vectorised :meth:`~CommittedIds.contains`; :class:`SkipFilter` is what a run skips,
and which of those skips are adoptions. Pure: numpy, pyarrow and the spec layer;
:mod:`pipeline.batch.shared_skip_filter` shares a filter with Ray tasks through the object store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline.spec.duplicate_ids import DIGEST

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i


KEY = DIGEST  # a request id's 128 bits, big-endian: sorts as the hex text does
EMPTY_KEYS = np.empty(0, KEY)


def id_keys(ids: Any) -> np.ndarray:
    """Request ids -> their 16-byte keys (an ``S16`` array), vectorised; keys pass through.

    A request id of 32 hex digits is its own key (the digits as bytes: two ids share a key
    only if they are the same id). Any other string (an id from elsewhere) gets a 16-byte
    blake2b of its whole text, as duplicate ids and ownership do (odds of a shared key
    ~n**2/2**129). numpy keeps ``S16`` values whole in comparisons and sorts; only
    converting one to Python ``bytes`` drops trailing zero bytes.
    """
    if isinstance(ids, np.ndarray) and ids.dtype == KEY:
        return ids
    array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.string())
    if array.type != pa.string():
        array = array.cast(pa.string())
    n = len(array)
    if n == 0:
        return EMPTY_KEYS.copy()
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[array.offset : array.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    hexed = (np.diff(offsets) == 32) & np.asarray(array.is_valid())
    out = np.zeros((n, 16), np.uint8)
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
        out[rows] = (digits[:, 0::2] << 4) | digits[:, 1::2]
    for i in np.flatnonzero(~hexed):
        value = array[int(i)].as_py() or ""
        out[i] = np.frombuffer(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest(), np.uint8)
    return out.view(KEY).ravel()


def key_prefixes(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key as a uint64 (a copy: 8 bytes a key). A filter only:
    equal prefixes say where to look, never that two ids are one."""
    keys = id_keys(keys)
    return keys.view(np.uint8).reshape(len(keys), 16)[:, :8].copy().view(">u8").ravel().astype(np.uint64)


def sorted_unique_of(values: np.ndarray, in_place: bool = False) -> np.ndarray:
    """``np.unique`` by one sort (numpy 2's ``np.unique`` hashes instead, ~40x slower on
    10M uint64): keys or prefixes. ``in_place`` sorts ``values`` itself (one copy less:
    the skip filter's peak), for a caller that owns it and no longer needs its order."""
    ordered = values if in_place else np.sort(values)
    if in_place:
        ordered.sort()
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered if keep.all() else ordered[keep]


def gathered(arrays: Iterable[np.ndarray], total: int, dtype: np.dtype) -> np.ndarray:
    """``arrays`` (``total`` values in all) copied into one new array, each taken as it comes:
    a caller that yields arrays it then lets go of holds one copy at a time, not two."""
    out = np.empty(total, dtype)
    at = 0
    for a in arrays:
        out[at : at + len(a)] = a
        at += len(a)
    if at != total:
        raise ValueError(f"gathered {at} values where {total} were announced")
    return out


class CommittedIds:
    """A set of request ids held as their sorted 16-byte keys (16 bytes an id, no Python
    object per id). :meth:`contains` is a vectorised ``np.searchsorted`` on whole keys.

    The array may be a read-only view (Ray's object store hands numpy arrays out
    zero-copy); nothing here writes to it.
    """

    def __init__(self, keys: Optional[np.ndarray] = None, *, sorted_unique: bool = False):
        keys = EMPTY_KEYS if keys is None else id_keys(keys)
        self.keys = keys if sorted_unique else sorted_unique_of(keys)

    @classmethod
    def from_ids(cls, ids: Iterable[str] | pa.Array) -> "CommittedIds":
        return cls(id_keys(ids))

    def contains(self, ids: pa.Array | pa.ChunkedArray | np.ndarray | list[str]) -> np.ndarray:
        """A bool array: for each id (strings, or keys from :func:`id_keys`), whether it is held."""
        k = id_keys(ids)
        if not len(self.keys) or not len(k):
            return np.zeros(len(k), dtype=bool)
        # Sorted needles walk the array in order (10x faster than random ones on 10M ids).
        order = np.argsort(k, kind="stable")
        needles = k[order]
        at = np.minimum(np.searchsorted(self.keys, needles), len(self.keys) - 1)
        held = np.empty(len(k), dtype=bool)
        held[order] = self.keys[at] == needles
        return held

    def __contains__(self, request_id: str) -> bool:
        return bool(self.contains([request_id])[0])

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes)


@dataclass
class SkipFilter:
    """What a run skips: ``committed`` (every committed final id, whole), and ``adoptable``:
    the sorted 8-byte prefixes (:func:`key_prefixes`) of those committed by interrupted
    runs. A skip is decided on ``committed`` alone; ``adoptable`` only counts how many skips
    are adoptions, for the run's summary (a shared prefix can miscount one, never skip
    one), at 8 bytes an id where every id may be adoptable (a resume after a crash). The
    Validator calls :meth:`contains`; the job's read tasks count :meth:`adopted` among the
    ids it skipped."""

    committed: CommittedIds = field(default_factory=CommittedIds)
    adoptable: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))

    def contains(self, ids: Any) -> np.ndarray:
        return self.committed.contains(ids)

    def adopted(self, ids: Any) -> int:
        if not len(self.adoptable):
            return 0
        prefixes = np.sort(key_prefixes(ids))
        at = np.minimum(np.searchsorted(self.adoptable, prefixes), len(self.adoptable) - 1)
        return int((self.adoptable[at] == prefixes).sum())

    def __len__(self) -> int:
        return len(self.committed)
