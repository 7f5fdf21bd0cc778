"""Writing the dataset: Parquet parts made visible atomically, each block committed by a
record as soon as it lands, a run manifest written at the end.

Layout of an output (one dataset, many runs)::

    <output>/images/part-<run>-<ids>-<bytes>.parquet   one row per image
    <output>/errors/part-<run>-<ids>-<bytes>.parquet   one row per rejected/failed request
    <output>/_commits/<run-id>/<...>.commit            what is committed (see :mod:`.commit_protocol`)
    <output>/_runs/<run-id>.json                        the run's manifest: "running" from its
                                                        start, "complete" at its end

A block's parts are written first, then its commit record: a part counts from the moment
its record exists, whether or not the run ever finishes. A part's name holds digests of
its request ids and of its bytes, so a write repeated with the same block rewrites the same
file, and one with another composition adds a file whose record :mod:`.commit_protocol` resolves.
Pure: no Ray import; the output writer in :mod:`pipeline.batch.output_tasks` calls these functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.spec import schema as S
from pipeline.storage import commit_protocol, filesystem, ownership_marker, record_format, skip_filter, trash
from pipeline.storage.commit_protocol import read_manifests, write_manifest
from pipeline.storage.record_format import COMMITS_DIR, ERRORS_DIR, IMAGES_DIR, RUNS_DIR

_RAW_FIELDS = (S.PROMPT, S.NEGATIVE_PROMPT, S.SEED, S.WIDTH, S.HEIGHT, S.STEPS, S.GUIDANCE_SCALE)


def new_run_id() -> str:
    """Unique across concurrent runs, readable (its start time); the lock numbers it
    (:func:`~pipeline.storage.lock.numbered_run_id`), and that number orders runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class WriteReport:
    """What one write task committed: its parts, their commit records and the counts the
    run manifest sums."""

    parts: list[dict[str, Any]] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    input_rows: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)

    def add(self, other: "WriteReport") -> None:
        self.parts.extend(other.parts)
        self.records.extend(other.records)
        self.images += other.images
        self.errors += other.errors
        self.input_rows += other.input_rows
        for stage, n in other.errors_by_stage.items():
            self.errors_by_stage[stage] = self.errors_by_stage.get(stage, 0) + n


def passthrough_fields(table: pa.Table) -> list[pa.Field]:
    return [f for f in table.schema if f.name not in S.RESERVED_NAMES]


def split(table: pa.Table, run_id: str) -> tuple[pa.Table, pa.Table]:
    """The stream's rows -> (images table, errors table) in their explicit schemas."""
    failed = pc.is_valid(table.column(S.ERROR_STAGE))
    ok_rows = table.filter(pc.invert(failed))
    bad_rows = table.filter(failed)
    carried = passthrough_fields(table)
    images_schema = S.images_schema(carried)
    ok_rows = ok_rows.append_column(S.RUN_ID, pa.array([run_id] * ok_rows.num_rows, pa.string()))
    images = ok_rows.select(images_schema.names).cast(images_schema)
    return images, _errors_table(bad_rows, carried, run_id)


def _errors_table(rows: pa.Table, carried: list[pa.Field], run_id: str) -> pa.Table:
    """Error rows keep the raw input row; rows that failed after validation rebuild it
    from their parameters and pass-through columns."""
    raws = rows.column(S.RAW).to_pylist()
    if any(raw is None for raw in raws):
        names = [*_RAW_FIELDS, *(f.name for f in carried)]
        records = rows.select(names).to_pylist()
        raws = [raw if raw is not None else json.dumps(rec, ensure_ascii=False, default=str, sort_keys=True) for raw, rec in zip(raws, records)]
    rows = rows.set_column(rows.schema.get_field_index(S.RAW), S.RAW, pa.array(raws, pa.string()))
    rows = rows.append_column(S.RUN_ID, pa.array([run_id] * rows.num_rows, pa.string()))
    return rows.select(S.ERRORS_SCHEMA.names).cast(S.ERRORS_SCHEMA)


def part_name(run_id: str, table: pa.Table, data: bytes) -> str:
    """Digests of the part's request ids and of its bytes: the same block with the same
    bytes gets the same name (an idempotent rewrite); anything else a name of its own."""
    ids = hashlib.sha256("\n".join(table.column(S.REQUEST_ID).to_pylist()).encode()).hexdigest()[:16]
    return f"part-{run_id}-{ids}-{hashlib.sha256(data).hexdigest()[:8]}.parquet"


def write_part(fs: fsspec.AbstractFileSystem, root: str, kind: str, run_id: str, table: pa.Table) -> record_format.PartEntry:
    """Serialize ``table`` to Parquet and make it visible at once under ``root/kind/``;
    return its entry for the commit record."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    relative = f"{kind}/{part_name(run_id, table, data)}"
    filesystem.atomic_write(fs, filesystem.join(root, relative), data)
    return record_format.part_entry(relative, data, table)


def write_block(fs: fsspec.AbstractFileSystem, root: str, run_id: str, table: pa.Table) -> WriteReport:
    """Commit one block of the stream: its images part and its errors part, then their
    commit record. A crash before the record leaves parts the next run removes; after it,
    parts the next run adopts."""
    images, errors = split(table, run_id)
    report = WriteReport(images=images.num_rows, errors=errors.num_rows)
    report.input_rows = sum(
        pc.sum(pc.equal(t.column(S.IMAGE_INDEX), 0)).as_py() or 0 for t in (images, errors) if t.num_rows
    )
    for stage in errors.column(S.ERROR_STAGE).to_pylist():
        report.errors_by_stage[stage] = report.errors_by_stage.get(stage, 0) + 1
    entries = [write_part(fs, root, kind, run_id, part) for kind, part in ((IMAGES_DIR, images), (ERRORS_DIR, errors)) if part.num_rows]
    if entries:
        counts = {"images": report.images, "errors": report.errors, "input_rows": report.input_rows, "errors_by_stage": report.errors_by_stage}
        record = record_format.write_record(fs, root, run_id, entries, counts)
        report.records.append(record.name)
    report.parts = [{"path": p.path, "rows": p.rows, "bytes": p.bytes, "sha256": p.sha256} for p in entries]
    return report


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("imagegen", "ray", "diffusers", "transformers", "torch", "pyarrow", "s3fs", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def start_manifest(run_id: str, started_at: float, spec: dict[str, Any], spec_fingerprint: str) -> dict[str, Any]:
    """The manifest a run writes before its first part: says which run and spec made the
    parts that follow, should the run never finish (see :func:`adopt_interrupted`)."""
    return {
        "run_id": run_id,
        "status": "running",
        "started_at": started_at,
        "spec": spec,
        "spec_fingerprint": spec_fingerprint,
        "counts": {"input_rows": 0, "images": 0, "errors": 0, "errors_by_stage": {}},
        "parts": [],
    }


def interrupted_runs(manifests: list[dict[str, Any]], found: commit_protocol.Commits) -> list[str]:
    """Runs whose committed parts a new run adopts: runs with accepted commit records that
    never completed, unless a later run that did complete already adopted them."""
    by_id = {m.get("run_id"): m for m in manifests}
    complete = {run for run, m in by_id.items() if m.get("status") == "complete"}
    # A run that stopped before committing anything still says "running": close it too.
    started = {run for run, m in by_id.items() if m.get("status") == "running"}
    return sorted(
        run
        for run in set(found.runs()) | started
        if run not in complete and by_id.get(run, {}).get("adopted_by") not in complete
    )


def adopt_interrupted(fs: fsspec.AbstractFileSystem, root: str, found: commit_protocol.Commits, runs: list[str], adopted_by: str) -> None:
    """Rewrite the manifests of interrupted ``runs``: status ``interrupted``, their counts and
    parts from their commit records, and the run adopting them. Readers of manifests (the
    dataset card, ``imagegen report``) then see the parts those runs committed."""
    manifests = {m.get("run_id"): m for m in read_manifests(fs, root)}
    per_run = found.runs()
    parts: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for record in found.records:
        for part in record.parts:
            if part.path not in seen:
                seen.add(part.path)
                parts.setdefault(record.run_id, []).append({"path": part.path, "rows": part.rows, "bytes": part.bytes, "sha256": part.sha256})
    for run in runs:
        done = per_run.get(run) or commit_protocol.RunCommits(run)
        manifest = manifests.get(run) or {"run_id": run, "started_at": done.first_written_at, "spec": {}}
        manifest.update(
            status="interrupted",
            interrupted_after=done.last_written_at,
            adopted_by=adopted_by,
            counts={"input_rows": done.input_rows, "images": done.images, "errors": done.errors, "errors_by_stage": done.errors_by_stage},
            parts=sorted(parts.get(run, []), key=lambda p: p["path"]),
        )
        write_manifest(fs, root, run, manifest)


@dataclass
class Committed:
    """What earlier runs committed into an output: their run ids, and the request ids a new
    run must not make again (images, and rows rejected before generation: the same input
    gets the same verdict; rows that failed in generation are retried), held compactly."""

    runs: list[str] = field(default_factory=list)
    request_ids: skip_filter.CommittedIds = field(default_factory=skip_filter.CommittedIds)


def read_committed(fs: fsspec.AbstractFileSystem, root: str) -> Committed:
    """A read-only view of :func:`~pipeline.storage.commit_protocol.read_commits` for planners."""
    found = commit_protocol.read_commits(fs, root)
    runs = sorted({m["run_id"] for m in read_manifests(fs, root)} | set(found.runs()))
    return Committed(runs, found.skip_filter(release=True).committed)


def newest_part_schema(fs: fsspec.AbstractFileSystem, root: str, manifests: list[dict[str, Any]], kind: str) -> pa.Schema | None:
    """The schema of the newest committed part of ``kind`` (images or errors), or None."""
    for manifest in reversed(manifests):
        for part in manifest.get("parts", []):
            if part["path"].startswith(kind + "/"):
                with filesystem.storage_errors(part["path"], "read"), fs.open(filesystem.join(root, part["path"]), "rb") as f:
                    return pq.read_schema(f)
    return None


def clear_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """``output.mode: overwrite``: remove what this package writes, nothing else. The caller
    has checked the folder is an imagegen output whose ``images/`` and ``errors/`` hold only
    its parts (:func:`~pipeline.storage.ownership_marker.check_output`); a README it did
    not write stays."""
    for name in (IMAGES_DIR, ERRORS_DIR, COMMITS_DIR, RUNS_DIR, trash.TRASH_DIR):
        path = filesystem.join(root, name)
        if fs.exists(path):
            filesystem.remove(fs, path, recursive=True)
    for name in (ownership_marker.CARD_NAME, ownership_marker.FALLBACK_CARD_NAME):
        path = filesystem.join(root, name)
        if fs.exists(path) and ownership_marker.is_card(filesystem.read_bytes(fs, path).decode("utf-8", "replace")):
            filesystem.remove(fs, path)
