"""``imagegen inspect``: what an output holds, on one screen.

Runs (from the manifests) with their counts, totals, the images table's schema, the
size on disk, a few rows (prompt, seed, size, sha256 prefix), and exact and near
duplicates among the images (:mod:`pipeline.output.duplicates`). Named
``inspect_output`` because a module named ``inspect`` would shadow the standard library's.

Pure: reads the manifests, one part's schema and the first rows of one part through
:mod:`pipeline.storage.filesystem`; never starts Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.duplicates import DEFAULT_DISTANCE, Duplicates, find_duplicates, format_duplicates
from pipeline.spec import schema as S
from pipeline.storage import filesystem, sink

_ROW_COLUMNS = [S.PROMPT, S.SEED, S.WIDTH, S.HEIGHT, S.SHA256]


@dataclass
class Inspection:
    """An output at a glance. ``images``/``errors`` count the rows of committed parts."""

    url: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    parts: int = 0
    size_bytes: int = 0
    schema: Optional[pa.Schema] = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    duplicates: Optional[Duplicates] = None


def inspect_output(url: str, storage_options: dict | None = None, rows: int = 5, near_distance: int = DEFAULT_DISTANCE) -> Inspection:
    """Read what the output at ``url`` holds; ``rows`` sample rows from its newest images part;
    duplicates (perceptual hashes within ``near_distance`` bits count as near duplicates).
    An output with no committed run gives an empty :class:`Inspection`, not an error."""
    fs, root = filesystem.open_url(url, storage_options)
    found = Inspection(url)
    with filesystem.storage_errors(url, "read"):
        if not fs.exists(root):
            raise FileNotFoundError(root)
        manifests = sink.read_manifests(fs, root)
        found.size_bytes = int(fs.du(root, total=True))
        found.schema = sink.newest_part_schema(fs, root, manifests, sink.IMAGES_DIR)
        for m in manifests:
            found.runs.append({"run_id": m["run_id"], "finished_at": m.get("finished_at"), **m["counts"]})
            for part in m["parts"]:
                found.parts += 1
                if part["path"].startswith(sink.IMAGES_DIR + "/"):
                    found.images += part["rows"]
                else:
                    found.errors += part["rows"]
        newest = next((p["path"] for m in reversed(manifests) for p in m["parts"] if p["path"].startswith(sink.IMAGES_DIR + "/")), None)
        if newest is not None and rows > 0:
            with fs.open(filesystem.join(root, newest), "rb") as f:
                found.rows = pq.ParquetFile(f).read_row_group(0, columns=_ROW_COLUMNS).slice(0, rows).to_pylist()
        if manifests:
            found.duplicates = find_duplicates(fs, root, manifests, near_distance)
    return found


def format_inspection(found: Inspection) -> str:
    """The lines ``imagegen inspect`` prints."""
    lines = [f"output     {found.url}"]
    if not found.runs:
        lines.append("no committed run yet (no _runs/*.json)")
        return "\n".join(lines)
    lines += [
        f"runs       {len(found.runs)}",
        f"images     {found.images}",
        f"errors     {found.errors}",
        f"parts      {found.parts}",
        f"on disk    {_size(found.size_bytes)}",
        "",
        "run                         finished (UTC)        input rows   images   errors",
    ]
    for run in found.runs:
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run["finished_at"])) if run.get("finished_at") else "?"
        lines.append(f"{run['run_id']:<27} {finished:<21} {run['input_rows']:>10} {run['images']:>8} {run['errors']:>8}")
    if found.schema is not None:
        lines += ["", "images schema:"]
        lines += [f"  {f.name}: {'image {bytes, path}' if f.name == S.IMAGE else f.type}" for f in found.schema]
    if found.rows:
        lines += ["", "first rows of the newest images part:"]
        for row in found.rows:
            prompt = row[S.PROMPT] if len(row[S.PROMPT]) <= 60 else row[S.PROMPT][:57] + "..."
            lines.append(f"  {row[S.SHA256][:12]}  seed {row[S.SEED]:<20} {row[S.WIDTH]}x{row[S.HEIGHT]:<5} {prompt}")
    if found.duplicates is not None:
        lines += format_duplicates(found.duplicates)
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
