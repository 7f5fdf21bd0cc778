"""Folding a run's commit records: block records -> compacted records of about
:data:`FOLD_IDS` request ids, and, at a run's end, the leftovers of writes Ray retried.

The job folds as its writes come back (:class:`~pipeline.batch.output_tasks.RecordFolder`), so
a long run's records stay few (a 100M-image output: ~100) and small, each fold reads only
the records it folds, and a crash leaves at most about one group of block records to read.
What counts as committed is decided by :mod:`.commit_protocol` alone; folding never changes it.

Pure: no Ray.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import fsspec
import numpy as np

from pipeline.storage import commit_protocol, filesystem, trash
from pipeline.storage.record_format import COMMITS_DIR, COMPACTED_PREFIX, SUFFIX, Record, encode_record, is_compacted
from pipeline.storage.skip_filter import EMPTY_KEYS, CommittedIds

# Request ids one compacted record holds at most (16 bytes each: 16 MB). The job folds its
# block records this many at a time as it goes, so folding costs the same at any table
# size and a long run's records stay few (a 100M-image output: ~100 records) and small.
FOLD_IDS = 1 << 20


class FoldGroups:
    """A run's block records gathered, in order, into groups of about :data:`FOLD_IDS`
    request ids: the unit :func:`compact` folds."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._ids = 0

    def add(self, names: list[str], ids: int) -> list[str]:
        """Add records holding ``ids`` request ids in all; returns a group once one is full
        (and starts the next), else an empty list."""
        self._names += names
        self._ids += ids
        return self.rest() if self._ids >= FOLD_IDS else []

    def rest(self) -> list[str]:
        """The records gathered and not yet returned in a group."""
        names, self._names, self._ids = self._names, [], 0
        return names


def compact(fs: fsspec.AbstractFileSystem, root: str, run_id: str, names: list[str]) -> Optional[Record]:
    """Fold the block records ``names`` of ``run_id`` (records its successful writes
    returned) into one compacted record, then remove them. Returns the compacted record,
    or None when there was nothing to fold. Reads only those records: the job folds
    :data:`FOLD_IDS` ids at a time, so the cost is bounded whatever the run's size. The
    leftovers of writes Ray retried go at the run's end (:func:`remove_leftovers`).

    Crash-safe in any order, and idempotent: the compacted record is named after its
    inputs (:func:`folded_name`) and written before anything is removed; a fold made again
    (Ray retried the task, a worker died part-way) finds it and only removes the inputs
    left, each only if the compacted record lists all its parts. So a retry never writes a
    second record over the same parts.
    """
    if not names:
        return None
    target = folded_name(run_id, names)
    existing, _ = commit_protocol.read_records_at(fs, root, [filesystem.join(root, target)]) if fs.exists(filesystem.join(root, target)) else ([], [])
    inputs = [filesystem.join(root, name) for name in names if name != target]
    kept, _ = commit_protocol.read_records_at(fs, root, [p for p in inputs if fs.exists(p)])
    kept = [r for r in kept if r.run_id == run_id and not r.compacted]
    if existing:
        merged = existing[0]
    elif kept:
        parts = {p.path: p for r in sorted(kept, key=Record.order) for p in r.parts}
        merged = Record(target, run_id, max(r.written_at for r in kept), list(parts.values()), _sum_counts(r.counts for r in kept))
        filesystem.atomic_write(fs, filesystem.join(root, merged.name), encode_record(merged))
    else:
        return None
    listed = {p.path for p in merged.parts}
    for record in kept:
        if all(p.path in listed for p in record.parts):
            filesystem.remove(fs, filesystem.join(root, record.name))  # redundant: the compacted record lists its parts
    return merged


def folded_name(run_id: str, names: list[str]) -> str:
    """The compacted record of the block records ``names``: named after them, so a fold
    made again writes (or finds) the same record."""
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
    return f"{COMMITS_DIR}/{run_id}/{COMPACTED_PREFIX}{digest}{SUFFIX}"


def remove_leftovers(fs: fsspec.AbstractFileSystem, root: str, run_id: str, kept: set[str]) -> list[str]:
    """At the end of a run whose records are folded: remove its block records that no
    successful write returned (``kept``: the names the writes returned) and whose request
    ids its compacted records hold (the first attempts of writes Ray retried), with their
    parts that no compacted record lists. Returns the records removed.

    Nothing is read when there are no leftovers (the usual case); otherwise the leftovers,
    then the run's compacted records one at a time, so memory is one compacted record's
    worth (:data:`FOLD_IDS` ids) whatever the run's size.
    """
    folder = filesystem.join(root, COMMITS_DIR, run_id)
    if not fs.isdir(folder):
        return []
    prefix = root.rstrip("/") + "/"
    listed = [p for p in sorted(fs.find(folder)) if p.endswith(SUFFIX)]
    relative = {p: p[len(prefix) :] if p.startswith(prefix) else p for p in listed}
    leftover_paths = [p for p in listed if relative[p] not in kept and not is_compacted(relative[p])]
    if not leftover_paths:
        return []
    leftovers, _ = commit_protocol.read_records_at(fs, root, leftover_paths)
    listed_parts: set[str] = set()
    overlapping: set[int] = set()
    for path in listed:
        if path in leftover_paths or relative[path] in kept:
            continue
        folded, _ = commit_protocol.read_records_at(fs, root, [path])
        for record in folded:
            listed_parts.update(p.path for p in record.parts)
            held = CommittedIds(np.concatenate([p.final for p in record.parts] or [EMPTY_KEYS]))
            overlapping.update(i for i, r in enumerate(leftovers) if any(held.contains(p.final).any() for p in r.parts))
    removed = []
    folder = trash.batch()
    for i in sorted(overlapping):  # the record first: a crash after it leaves orphans, never a record short of a part
        trash.set_aside(fs, root, leftovers[i].name, folder)
        removed.append(leftovers[i].name)
        for p in leftovers[i].parts:
            if p.path not in listed_parts:
                trash.set_aside(fs, root, p.path, folder)
    return removed


def _sum_counts(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"images": 0, "errors": 0, "input_rows": 0, "errors_by_stage": {}}
    for c in counts:
        for key in ("images", "errors", "input_rows"):
            total[key] += int(c.get(key, 0))
        for stage, n in c.get("errors_by_stage", {}).items():
            total["errors_by_stage"][stage] = total["errors_by_stage"].get(stage, 0) + n
    return total
