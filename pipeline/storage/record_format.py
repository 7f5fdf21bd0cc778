"""The commit record's format: one file per committed block (or per run, compacted).

A record is a header line (JSON: run id, time, the parts with path, rows, bytes and
sha256, the block's counts) and the parts' request ids as raw 16-byte keys (see
:func:`~pipeline.storage.skip_filter.id_keys`: the whole id, not a hash of it), the whole
guarded by a sha256. The ids stay out of the JSON: reading the records of a 10M-image
output is reading ~160 MB of keys, not parsing 10M strings. Records of the first format
(``IGCOMMIT1``) held 8-byte hashes instead: they decode with ``outdated`` set and their
ids unknown; :mod:`pipeline.storage.commit_protocol` reads those from the parts and
rewrites the record. What records mean together
(adoption, conflicts, repair) is :mod:`pipeline.storage.commit_protocol`. Pure: no Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.spec import schema as S
from pipeline.storage import filesystem
from pipeline.storage.skip_filter import EMPTY_KEYS, KEY, id_keys

COMMITS_DIR = "_commits"
IMAGES_DIR = "images"
ERRORS_DIR = "errors"
RUNS_DIR = "_runs"
SUFFIX = ".commit"
_MAGIC = b"IGCOMMIT2 "
_MAGIC_V1 = b"IGCOMMIT1 "  # 8-byte hashes of the ids: read, never written
COMPACTED_PREFIX = "compacted-"
# Error stages whose verdict is final (the same input gets the same verdict): their ids are
# skipped by a rerun. Rows that failed in generation or encoding are tried again.
FINAL_ERROR_STAGES = (S.STAGE_READ, S.STAGE_VALIDATE)



@dataclass
class PartEntry:
    """One Parquet part as its commit record describes it. ``final``: the keys of the ids a
    rerun skips (images; rows rejected at read or validation); ``retry``: of error rows a
    rerun tries again (failed in generation or encoding). Both ``S16`` arrays, possibly
    read-only views of the record's bytes."""

    path: str  # relative to the output root: images/part-....parquet
    rows: int
    bytes: int
    sha256: str
    final: np.ndarray
    retry: np.ndarray

    @property
    def kind(self) -> str:
        return self.path.split("/", 1)[0]

    def header(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256, "final": len(self.final), "retry": len(self.retry)}


@dataclass
class Record:
    """One commit record: a block's parts (or, compacted, many blocks' of one run), and their counts."""

    name: str  # relative to the output root: _commits/<run>/<...>.commit
    run_id: str
    written_at: float
    parts: list[PartEntry]
    counts: dict[str, Any] = field(default_factory=dict)  # images, errors, input_rows, errors_by_stage
    legacy: bool = False  # read from a manifest of an output older than commit records
    replaces: list[str] = field(default_factory=list)  # records this one stands for (a reduced record: not stored)
    outdated: bool = False  # read in the first format (8-byte hashes): its keys are not known yet

    @property
    def compacted(self) -> bool:
        return is_compacted(self.name) or self.legacy

    def order(self) -> tuple:
        return (self.run_id, not self.compacted, self.name)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


def part_entry(path: str, data: bytes, table: pa.Table) -> PartEntry:
    """The entry of a part just serialised to ``data`` from ``table`` (images or errors)."""
    return PartEntry(path, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), *_keys(table))


def with_ids(part: PartEntry, table: pa.Table) -> PartEntry:
    """``part`` with its keys taken from ``table`` (its own request ids, and error stages for
    an error part), as :func:`part_entry` takes them: how a record of the first format
    gets its keys."""
    return PartEntry(part.path, part.rows, part.bytes, part.sha256, *_keys(table))


def _keys(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A part's ``(final, retry)`` keys from its rows' request ids (and error stages)."""
    if S.ERROR_STAGE in table.column_names and table.num_rows:
        final_rows = pc.is_in(table.column(S.ERROR_STAGE), pa.array(FINAL_ERROR_STAGES))
        return id_keys(table.filter(final_rows).column(S.REQUEST_ID)), id_keys(table.filter(pc.invert(final_rows)).column(S.REQUEST_ID))
    return id_keys(table.column(S.REQUEST_ID)), EMPTY_KEYS


def encode_record(record: Record) -> bytes:
    header = {"run_id": record.run_id, "written_at": record.written_at, "parts": [p.header() for p in record.parts], "counts": record.counts}
    if record.outdated:
        raise ValueError(f"{record.name} is of the first record format: its parts' keys must be read before it is written again")
    ids = b"".join(np.ascontiguousarray(a, dtype=KEY).tobytes() for p in record.parts for a in (p.final, p.retry))
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + ids
    return _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


class CorruptRecord(ValueError):
    """A commit record that cannot be read: truncated, or its digest does not match."""


def decode_record(name: str, data: bytes) -> Record:
    """The record in ``data``; one of the first format has ``outdated`` set and empty keys."""
    magic = next((m for m in (_MAGIC, _MAGIC_V1) if data.startswith(m)), None)
    if magic is None:
        raise CorruptRecord("not a commit record (no header)")
    width = 16 if magic == _MAGIC else 8
    # Offsets into ``data``, never slices of it: the keys stay a view of the bytes read
    # (a 1M-id record is 16 MB, and a resume holds every record at once).
    body_at = data.find(b"\n", len(magic)) + 1
    ids_at = data.find(b"\n", body_at) + 1
    if not body_at or hashlib.sha256(memoryview(data)[body_at:]).hexdigest().encode() != data[len(magic) : body_at - 1]:
        raise CorruptRecord("its digest does not match its content (truncated or damaged)")
    if not ids_at:
        raise CorruptRecord("its header has no end")
    try:
        header = json.loads(data[body_at : ids_at - 1])
        size = len(data) - ids_at
        if size % width:
            raise CorruptRecord(f"its ids are {size} bytes, not a whole number of {width}-byte ids")
        keys = np.frombuffer(data, dtype=KEY, offset=ids_at) if width == 16 else None
        parts, at = [], 0
        for p in header["parts"]:
            if keys is None:
                final = retry = EMPTY_KEYS
            else:
                final, retry = keys[at : at + p["final"]], keys[at + p["final"] : at + p["final"] + p["retry"]]
            at += p["final"] + p["retry"]
            parts.append(PartEntry(p["path"], int(p["rows"]), int(p["bytes"]), p["sha256"], final, retry))
        if at != size // width:
            raise CorruptRecord(f"it holds {size // width} request ids, its header {at}")
        return Record(name, header["run_id"], float(header["written_at"]), parts, header.get("counts", {}), outdated=keys is None)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"its header cannot be read ({exc})") from None


def is_compacted(name: str) -> bool:
    """Whether the record called ``name`` holds folded block records (a run's, or some of them)."""
    return name.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)


def record_name(run_id: str, parts: list[PartEntry], compacted: bool = False) -> str:
    """Named after its parts (their paths carry the ids' and the bytes' digests): a write
    repeated with the same block and bytes rewrites the same record."""
    digest = hashlib.sha256("\n".join(p.path for p in parts).encode()).hexdigest()[:16]
    return f"{COMMITS_DIR}/{run_id}/{COMPACTED_PREFIX if compacted else ''}{digest}{SUFFIX}"


def write_record(fs: fsspec.AbstractFileSystem, root: str, run_id: str, parts: list[PartEntry], counts: dict[str, Any]) -> Record:
    """Commit ``parts`` (already written in full): write their record atomically. From
    this moment they are durable and a later run adopts them."""
    record = Record(record_name(run_id, parts), run_id, time.time(), parts, counts)
    filesystem.atomic_write(fs, filesystem.join(root, record.name), encode_record(record))
    return record
