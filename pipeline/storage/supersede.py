"""Error rows superseded by a later verdict on the same request or input row.

A row that failed in generation is tried again by the next run, and a changed spec (or a
fixed input row) can make a rejected row valid. The new verdict lands in ``images/`` (or
again in ``errors/``); the old error row must then leave ``errors/``, or the row is in
two places: the card counts it twice, and every reader of ``errors/`` (pandas, DuckDB,
``datasets``) sees a failure that is no longer true. Readers get this right with no code
of their own only if the superseded rows are gone from the files, so they are removed:
each error part holding one is rewritten without it.

**Superseded.** An error row of run *k* is superseded when a later run committed:

- an image or an error row with the same ``request_id`` (the request was tried again), or
- an image or an error row of the same input row: the same ``id`` (the row's identity:
  its id column value, else ``source#row``). A row rejected because its id repeats an
  earlier row's (``error_type`` ``DuplicateId``) has that other row's id, so it is
  matched by its position (``source``, ``row_index``) instead, and it offers nothing by id.

Rows rejected at read or validation are not made again while the input is unchanged, so
they stay live until the input row or the spec changes; rows failed in generation get a
fresh verdict from every run.

**When.** After a run has committed (its manifest written), :func:`supersede_errors`
checks the error rows of every committed run against the rows of the runs not yet
checked (this one, and any whose check a crash interrupted: their manifests lack
:data:`CHECKED`), so each run's parts are read once for this, by the run that made them.

**Crash safety.** A rewritten part is a new file (its name is the digest of the request
ids it keeps, under the run that made the rows); the manifest that listed the old part is
rewritten to list the new one; then the old file is removed. A crash between two steps
leaves a part no manifest lists, which the next run removes (an old part whose rows are
all still listed elsewhere, or a new one never listed); the check is then made again,
since the flag is set last.

Pure: no Ray. Reads a few small columns of the parts it checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.spec import schema as S
from pipeline.storage import filesystem, sink

log = logging.getLogger(__name__)

# Set in a run's manifest once its rows have been checked against every earlier error row.
CHECKED = "errors_superseded"
KEY_COLUMNS = [S.REQUEST_ID, S.ID, S.SOURCE, S.ROW_INDEX, S.RUN_ID]


@dataclass
class Superseded:
    """What :func:`supersede_errors` removed: error rows, and the parts rewritten for it."""

    rows: int = 0
    parts: dict[str, str | None] = field(default_factory=dict)  # old part -> its rewrite (None: removed)


def offers(table: pa.Table) -> Iterable[tuple[tuple, str]]:
    """(key, run id) for each key a row of ``table`` (images or errors) settles."""
    types = table.column(S.ERROR_TYPE).to_pylist() if S.ERROR_TYPE in table.column_names else [None] * table.num_rows
    columns = [table.column(c).to_pylist() for c in KEY_COLUMNS]
    for (rid, row_id, source, row_index, run_id), error_type in zip(zip(*columns), types):
        yield ("request", rid), run_id
        yield ("position", source, row_index), run_id
        if error_type != S.ERROR_TYPE_DUPLICATE_ID:
            yield ("row", row_id), run_id


def _needs(rid: str, row_id: str, source: str, row_index: int, error_type: str) -> list[tuple]:
    """The keys whose later verdict supersedes an error row."""
    row = ("position", source, row_index) if error_type == S.ERROR_TYPE_DUPLICATE_ID else ("row", row_id)
    return [("request", rid), row]


def superseded_mask(errors: pa.Table, later: dict[tuple, str]) -> list[bool]:
    """For each row of ``errors`` (with the key columns and ``error_type``): whether a run
    later than its own settled one of its keys. ``later`` maps key -> the latest run id
    that settled it."""
    columns = [errors.column(c).to_pylist() for c in (*KEY_COLUMNS, S.ERROR_TYPE)]
    mask = []
    for rid, row_id, source, row_index, run_id, error_type in zip(*columns):
        mask.append(any(later.get(key, "") > run_id for key in _needs(rid, row_id, source, row_index, error_type)))
    return mask


def _read(fs: fsspec.AbstractFileSystem, root: str, relative: str, columns: list[str] | None = None) -> pa.Table:
    with filesystem.storage_errors(relative, "read"), fs.open(filesystem.join(root, relative), "rb") as f:
        return pq.read_table(f, columns=columns)


def supersede_errors(fs: fsspec.AbstractFileSystem, root: str) -> Superseded:
    """Remove the error rows that later runs superseded (see the module docstring) from the
    committed output at ``root``; mark every run checked. Call it after a run's manifest is
    written, holding the output's lock."""
    manifests = sink.read_manifests(fs, root)
    unchecked = [m for m in manifests if not m.get(CHECKED)]
    done = Superseded()
    if not unchecked:
        return done
    # The latest run that settled each key, from the rows of the runs not checked yet.
    later: dict[tuple, str] = {}
    for manifest in unchecked:
        for part in manifest["parts"]:
            kind = part["path"].split("/", 1)[0]
            columns = KEY_COLUMNS + ([S.ERROR_TYPE] if kind == sink.ERRORS_DIR else [])
            for key, run_id in offers(_read(fs, root, part["path"], columns)):
                if later.get(key, "") < run_id:
                    later[key] = run_id
    for manifest in manifests:
        rewritten = []
        for part in manifest["parts"]:
            if not part["path"].startswith(sink.ERRORS_DIR + "/"):
                rewritten.append(part)
                continue
            keys = _read(fs, root, part["path"], [*KEY_COLUMNS, S.ERROR_TYPE])
            mask = superseded_mask(keys, later)
            if not any(mask):
                rewritten.append(part)
                continue
            kept = _read(fs, root, part["path"]).filter(pc.invert(pa.array(mask)))
            done.rows += len(mask) - kept.num_rows
            if kept.num_rows:
                entry = sink.write_part(fs, root, sink.ERRORS_DIR, manifest["run_id"], kept)
                rewritten.append(entry)
                done.parts[part["path"]] = entry["path"]
            else:
                done.parts[part["path"]] = None
        if len(rewritten) != len(manifest["parts"]) or any(a is not b for a, b in zip(rewritten, manifest["parts"])):
            _rewrite_manifest(fs, root, {**manifest, "parts": sorted(rewritten, key=lambda p: p["path"])})
    for old in done.parts:
        try:
            fs.rm(filesystem.join(root, old))
        except FileNotFoundError:
            pass
    # Last: a crash before this leaves the runs unchecked, and the next run checks again.
    for manifest in sink.read_manifests(fs, root):
        if not manifest.get(CHECKED):
            _rewrite_manifest(fs, root, {**manifest, CHECKED: True})
    if done.rows:
        log.info("removed %d error row(s) that later runs superseded (%d part(s) rewritten)", done.rows, len(done.parts))
    return done


def _rewrite_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
    sink.write_manifest(fs, root, manifest["run_id"], manifest)
