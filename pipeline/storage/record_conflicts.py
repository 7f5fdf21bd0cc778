"""Which of an output's commit records a request id conflict retires, decided on full ids.

Records are taken in order (:mod:`pipeline.storage.commit_protocol`); one holding a request
id an earlier accepted record holds is superseded whole (a write Ray retried with another
block composition). Records hold 8-byte hashes of their ids: a repeated hash only points at
the records involved, whose parts are then read for the full request ids, so two ids that
share a hash cost a read, never a record. Pure: no Ray.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.spec import schema as S
from pipeline.storage import filesystem
from pipeline.storage.record_format import ERRORS_DIR, FINAL_ERROR_STAGES, PartEntry, Record
from pipeline.storage.skip_filter import id_hashes


def superseded(candidates: list[Record], sorted_finals: list[Optional[np.ndarray]], read_ids: Callable[[PartEntry], tuple[list[str], np.ndarray]]) -> set[int]:
    """Indices of candidates that hold a request id an earlier kept candidate holds.

    One sort of all final ids (and one of the retry ids, which repeat only within a run)
    finds whether any 8-byte hash repeats at all; only then are the owners of the repeats
    looked up, and those few records resolved one by one, in order, on their full request
    ids read from their parts (``read_ids``): two ids that share a hash cost a read, never
    a record. When no final id repeats, their sorted array is left in
    ``sorted_finals[0]``: the skip filter, at no extra cost.
    """
    seen: set[str] = set()
    finals: list[tuple[int, np.ndarray]] = []
    retries: list[tuple[int, np.ndarray]] = []
    for i, r in enumerate(candidates):
        for p in r.parts:
            if p.path not in seen:
                seen.add(p.path)
                finals.append((i, p.final))
                if len(p.retry):
                    # A retry id repeats harmlessly across runs (each run tried it once):
                    # salt it with the run so only repeats within one run collide.
                    retries.append((i, p.retry ^ run_salt(r.run_id)))
    involved: set[int] = set()
    repeats = {}
    for name, group in (("final", finals), ("retry", retries)):
        if not group:
            continue
        ordered = np.sort(np.concatenate([a for _, a in group]))
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if group is finals and not len(repeated):
            sorted_finals[0] = ordered  # no repeats: already the skip filter's array
        if not len(repeated):
            continue
        repeats[name] = repeated
        for i, a in group:
            if np.isin(a, repeated).any():
                involved.add(i)
    losers: set[int] = set()
    held: set[tuple] = set()
    for i in sorted(involved):
        mine = exact_keys(candidates[i], repeats, read_ids)
        if mine & held:
            losers.add(i)
        else:
            held |= mine
    return losers


def run_salt(run_id: str) -> np.uint64:
    return np.uint64(int(hashlib.blake2b(run_id.encode(), digest_size=8).hexdigest(), 16))


def exact_keys(record: Record, repeats: dict[str, np.ndarray], read_ids: Callable[[PartEntry], tuple[list[str], np.ndarray]]) -> set[tuple]:
    """The full request ids of ``record`` whose hash repeats in another record: finals as
    ``(id,)``, retries as ``(run, id)``. Only parts holding such a hash are read."""
    final, retry, salt = repeats.get("final", np.empty(0, np.uint64)), repeats.get("retry", np.empty(0, np.uint64)), run_salt(record.run_id)
    keys: set[tuple] = set()
    for p in record.parts:
        if not (np.isin(p.final, final).any() or np.isin(p.retry ^ salt, retry).any()):
            continue
        ids, is_final = read_ids(p)
        hashes = id_hashes(pa.array(ids, pa.string()))
        wanted = np.where(is_final, np.isin(hashes, final), np.isin(hashes ^ salt, retry))
        keys |= {(rid,) if fin else (record.run_id, rid) for rid, fin, w in zip(ids, is_final, wanted) if w}
    return keys


def part_ids(fs: fsspec.AbstractFileSystem, root: str, part: PartEntry) -> tuple[list[str], np.ndarray]:
    """A part's full request ids, and which of them are final (images; rows rejected at
    read or validation), as its record's ``final`` and ``retry`` hashes split them."""
    columns = [S.REQUEST_ID, *([S.ERROR_STAGE] if part.kind == ERRORS_DIR else [])]
    with filesystem.storage_errors(part.path, "read"), fs.open(filesystem.join(root, part.path), "rb") as f:
        table = pq.read_table(f, columns=columns)
    ids = table.column(S.REQUEST_ID).to_pylist()
    if part.kind != ERRORS_DIR:
        return ids, np.ones(len(ids), bool)
    return ids, pc.is_in(table.column(S.ERROR_STAGE), pa.array(FINAL_ERROR_STAGES)).to_numpy(zero_copy_only=False)
