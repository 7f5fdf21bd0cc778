"""Writing the dataset: Parquet parts made visible atomically, a run manifest written last.

Layout of an output (one dataset, many runs)::

    <output>/images/part-<run>-<digest>.parquet   one row per image
    <output>/errors/part-<run>-<digest>.parquet   one row per rejected/failed request
    <output>/_runs/<run-id>.json                  the manifest: written last, means done

A part's name is a digest of the request ids it holds, so a write that Ray retries
rewrites the same file instead of adding a duplicate. Pure: no Ray import; the Ray
datasink in :mod:`pipeline.job.run` calls these functions.
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
from pipeline.storage import filesystem

IMAGES_DIR = "images"
ERRORS_DIR = "errors"
RUNS_DIR = "_runs"
_RAW_FIELDS = (S.PROMPT, S.NEGATIVE_PROMPT, S.SEED, S.WIDTH, S.HEIGHT, S.STEPS, S.GUIDANCE_SCALE)


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class WriteReport:
    """What one write task committed: its parts and the counts the run manifest sums."""

    parts: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    input_rows: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)

    def add(self, other: "WriteReport") -> None:
        self.parts.extend(other.parts)
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


def part_name(run_id: str, table: pa.Table) -> str:
    digest = hashlib.sha256("\n".join(table.column(S.REQUEST_ID).to_pylist()).encode()).hexdigest()[:16]
    return f"part-{run_id}-{digest}.parquet"


def write_part(fs: fsspec.AbstractFileSystem, root: str, kind: str, run_id: str, table: pa.Table) -> dict[str, Any]:
    """Serialize ``table`` to Parquet and make it visible at once under ``root/kind/``."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    relative = f"{kind}/{part_name(run_id, table)}"
    filesystem.atomic_write(fs, filesystem.join(root, relative), data)
    return {"path": relative, "rows": table.num_rows, "bytes": len(data)}


def write_block(fs: fsspec.AbstractFileSystem, root: str, run_id: str, table: pa.Table) -> WriteReport:
    """Commit one block of the stream: its images part and its errors part."""
    images, errors = split(table, run_id)
    report = WriteReport(images=images.num_rows, errors=errors.num_rows)
    report.input_rows = sum(
        pc.sum(pc.equal(t.column(S.IMAGE_INDEX), 0)).as_py() or 0 for t in (images, errors) if t.num_rows
    )
    for stage in errors.column(S.ERROR_STAGE).to_pylist():
        report.errors_by_stage[stage] = report.errors_by_stage.get(stage, 0) + 1
    for kind, part in ((IMAGES_DIR, images), (ERRORS_DIR, errors)):
        if part.num_rows:
            report.parts.append(write_part(fs, root, kind, run_id, part))
    return report


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("imagegen", "ray", "diffusers", "transformers", "torch", "pyarrow", "s3fs", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, run_id: str, manifest: dict[str, Any]) -> str:
    """Write the run's manifest last: its presence is what says the run committed."""
    path = filesystem.join(root, RUNS_DIR, f"{run_id}.json")
    filesystem.atomic_write(fs, path, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return path


@dataclass
class Committed:
    """What earlier runs committed into an output: their manifests' parts and the request
    ids a new run must not make again (images, and rows rejected before generation:
    the same input gets the same verdict). Rows that failed in generation are retried."""

    runs: list[str] = field(default_factory=list)
    parts: set[str] = field(default_factory=set)
    request_ids: set[str] = field(default_factory=set)


def read_manifests(fs: fsspec.AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    """The manifests of the runs committed into ``root``, oldest first (run ids sort by start)."""
    runs_dir = filesystem.join(root, RUNS_DIR)
    if not fs.isdir(runs_dir):
        return []
    paths = sorted(p for p in fs.find(runs_dir) if p.endswith(".json"))
    return [json.loads(filesystem.read_bytes(fs, path)) for path in paths]


def newest_part_schema(fs: fsspec.AbstractFileSystem, root: str, manifests: list[dict[str, Any]], kind: str) -> pa.Schema | None:
    """The schema of the newest committed part of ``kind`` (images or errors), or None."""
    for manifest in reversed(manifests):
        for part in manifest["parts"]:
            if part["path"].startswith(kind + "/"):
                with filesystem.storage_errors(part["path"], "read"), fs.open(filesystem.join(root, part["path"]), "rb") as f:
                    return pq.read_schema(f)
    return None


def read_committed(fs: fsspec.AbstractFileSystem, root: str) -> Committed:
    committed = Committed()
    for manifest in read_manifests(fs, root):
        committed.runs.append(manifest["run_id"])
        for part in manifest["parts"]:
            committed.parts.add(part["path"])
            with fs.open(filesystem.join(root, part["path"]), "rb") as f:
                table = pq.read_table(f, columns=[S.REQUEST_ID, *([S.ERROR_STAGE] if part["path"].startswith(ERRORS_DIR) else [])])
            if S.ERROR_STAGE in table.column_names:
                final = pc.is_in(table.column(S.ERROR_STAGE), pa.array([S.STAGE_READ, S.STAGE_VALIDATE]))
                table = table.filter(final)
            committed.request_ids.update(table.column(S.REQUEST_ID).to_pylist())
    return committed


def remove_uncommitted(fs: fsspec.AbstractFileSystem, root: str, committed: Committed) -> list[str]:
    """Delete parts no manifest lists: left by a run that died before committing. Their
    rows are made again by this run, so keeping them would duplicate those rows."""
    removed = []
    for kind in (IMAGES_DIR, ERRORS_DIR):
        folder = filesystem.join(root, kind)
        if not fs.isdir(folder):
            continue
        for path in fs.find(folder):
            relative = f"{kind}/{path.rsplit('/', 1)[-1]}"
            if relative not in committed.parts:
                fs.rm(path)
                removed.append(relative)
    return removed


def clear_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """``output.mode: overwrite``: remove what this package writes, nothing else."""
    for name in (IMAGES_DIR, ERRORS_DIR, RUNS_DIR, "README.md"):
        path = filesystem.join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
