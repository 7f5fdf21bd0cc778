"""The commit record's format: one file per committed block (or per run, compacted).

A record is a header line (JSON: run id, time, the parts with path, rows, bytes and
sha256, the block's counts) and the 8-byte hashes of the parts' request ids (see
:func:`~pipeline.storage.skip_filter.id_hashes`) as raw little-endian uint64, the whole
guarded by a sha256. The ids stay out of the JSON: reading the records of a 10M-image
output is reading ~80 MB of numbers, not parsing 10M strings. What records mean together
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
from pipeline.storage.skip_filter import id_hashes

COMMITS_DIR = "_commits"
IMAGES_DIR = "images"
ERRORS_DIR = "errors"
RUNS_DIR = "_runs"
SUFFIX = ".commit"
_MAGIC = b"IGCOMMIT1 "
COMPACTED_PREFIX = "compacted-"
# Error stages whose verdict is final (the same input gets the same verdict): their ids are
# skipped by a rerun. Rows that failed in generation or encoding are tried again.
FINAL_ERROR_STAGES = (S.STAGE_READ, S.STAGE_VALIDATE)



@dataclass
class PartEntry:
    """One Parquet part as its commit record describes it. ``final``: hashes of the ids a
    rerun skips (images; rows rejected at read or validation); ``retry``: of error rows a
    rerun tries again (failed in generation or encoding)."""

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
    if S.ERROR_STAGE in table.column_names and table.num_rows:
        final_rows = pc.is_in(table.column(S.ERROR_STAGE), pa.array(FINAL_ERROR_STAGES))
        final = id_hashes(table.filter(final_rows).column(S.REQUEST_ID))
        retry = id_hashes(table.filter(pc.invert(final_rows)).column(S.REQUEST_ID))
    else:
        final, retry = id_hashes(table.column(S.REQUEST_ID)), np.empty(0, np.uint64)
    return PartEntry(path, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), final, retry)


def encode_record(record: Record) -> bytes:
    header = {"run_id": record.run_id, "written_at": record.written_at, "parts": [p.header() for p in record.parts], "counts": record.counts}
    ids = b"".join(np.ascontiguousarray(a, dtype="<u8").tobytes() for p in record.parts for a in (p.final, p.retry))
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + ids
    return _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


class CorruptRecord(ValueError):
    """A commit record that cannot be read: truncated, or its digest does not match."""


def decode_record(name: str, data: bytes) -> Record:
    if not data.startswith(_MAGIC):
        raise CorruptRecord("not a commit record (no header)")
    digest, _, body = data[len(_MAGIC) :].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CorruptRecord("its digest does not match its content (truncated or damaged)")
    line, _, ids = body.partition(b"\n")
    try:
        header = json.loads(line)
        hashes = np.frombuffer(ids, dtype="<u8")
        parts, at = [], 0
        for p in header["parts"]:
            final, retry = hashes[at : at + p["final"]], hashes[at + p["final"] : at + p["final"] + p["retry"]]
            at += p["final"] + p["retry"]
            parts.append(PartEntry(p["path"], int(p["rows"]), int(p["bytes"]), p["sha256"], final, retry))
        if at != len(hashes):
            raise CorruptRecord(f"it holds {len(hashes)} request ids, its header {at}")
        return Record(name, header["run_id"], float(header["written_at"]), parts, header.get("counts", {}))
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
