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

**A row no longer in the input.** With content identity, an edited row is a new row: the
error row of what it was (a fixed typo, a corrected seed) leaves ``errors/`` at the end of
the next run, which has counted every row of the table (``gone``). Images of such rows
stay (they are data; ``imagegen prune`` removes them).

**An image stands.** An error row of an input row that has a committed image, from any
run, earlier or later, also leaves ``errors/``: a row made once and rejected later (a
tightened limit, a failed retry under a changed spec) is in ``images/`` only. A row is
never in both (``imagegen verify`` checks it).

Rows rejected at read or validation are not made again while the input is unchanged, so
they stay live until the input row or the spec changes; rows failed in generation get a
fresh verdict from every run.

**When.** After a run has committed (its manifest written), :func:`supersede_errors`
checks the error rows of every committed run against the rows of the runs not yet
checked (this one, and any whose check a crash interrupted: their manifests lack
:data:`CHECKED`), so each run's parts are read once for this, by the run that made them.

**Crash safety.** A rewritten part is a new file (its name holds the digests of the
request ids it keeps and of its bytes, under the run that made the rows), committed by a
new commit record that lists it in place of the old part (:mod:`.commit_protocol`); then
the manifests that listed the old part are rewritten to list the new one; only then do
the old record and the old part go (into the trash, :mod:`.trash`). A crash between two
steps leaves either two records, between which
:func:`~pipeline.storage.commit_protocol.read_commits` gives each part to one, or a part
no record lists, which the next run sets aside; a run's manifest never lists a part its
records do not (so it is never read as a legacy claim); the check is then made again,
since the flag is set last.

Pure: no Ray. Reads a few small columns of the parts it checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.spec import schema as S
from pipeline.storage import commit_protocol, filesystem, part_files, record_format, trash

log = logging.getLogger(__name__)

# Set in a run's manifest once its rows have been checked against every earlier error row.
CHECKED = "errors_superseded"
KEY_COLUMNS = [S.REQUEST_ID, S.ID, S.SOURCE, S.ROW_INDEX, S.RUN_ID]
# What an error row's verdict is about: the whole row (rejected at read or validation), or
# one image of it (failed in generation or encoding: image `image_index`).
VERDICT_COLUMNS = [S.ERROR_TYPE, S.ERROR_STAGE, S.IMAGE_INDEX]
WHOLE_ROW_STAGES = (S.STAGE_READ, S.STAGE_VALIDATE)


def image_keys(table: pa.Table) -> set[str]:
    """What the images of ``table`` (``id``, ``image_index``) settle for good: their rows, and
    each image of them (:func:`standing_key`)."""
    ids, indexes = table.column(S.ID).to_pylist(), table.column(S.IMAGE_INDEX).to_pylist()
    return set(ids) | {f"{row_id}\x00{k}" for row_id, k in zip(ids, indexes)}


def standing_key(row_id: str, stage: str, image_index: int) -> str:
    """The key an image must hold for an error row to leave: its row's (a whole-row
    rejection), or that one image's (a failed image of a row whose other images were made)."""
    return row_id if stage in WHOLE_ROW_STAGES else f"{row_id}\x00{image_index}"


@dataclass
class Superseded:
    """What :func:`supersede_errors` removed: error rows, and the parts rewritten for it."""

    rows: int = 0
    parts: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # old part -> its rewrite's manifest entry (None: removed)


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


def superseded_mask(errors: pa.Table, later: dict[tuple, str], imaged: frozenset | set = frozenset(), gone: frozenset | set = frozenset()) -> list[bool]:
    """For each row of ``errors`` (with :data:`KEY_COLUMNS` and :data:`VERDICT_COLUMNS`):
    whether a run later than its own settled one of its keys; or an image stands for it
    (its :func:`standing_key` is in ``imaged``, from :func:`image_keys`: whichever verdict
    came later); or its row is ``gone`` from the input (ids). ``later`` maps key -> the
    latest run id that settled it."""
    columns = [errors.column(c).to_pylist() for c in (*KEY_COLUMNS, *VERDICT_COLUMNS)]
    mask = []
    for rid, row_id, source, row_index, run_id, error_type, stage, index in zip(*columns):
        own = error_type != S.ERROR_TYPE_DUPLICATE_ID and (standing_key(row_id, stage, index) in imaged or row_id in gone)
        mask.append(own or any(later.get(key, "") > run_id for key in _needs(rid, row_id, source, row_index, error_type)))
    return mask


def _positions(table: pa.Table) -> pa.ChunkedArray:
    """Each row's position (``source``, ``row_index``) as one comparable text value."""
    return pc.binary_join_element_wise(table.column(S.SOURCE), pc.cast(table.column(S.ROW_INDEX), pa.string()), "\x00")


def _read(fs: fsspec.AbstractFileSystem, root: str, relative: str, columns: list[str] | None = None) -> pa.Table:
    with filesystem.storage_errors(relative, "read"), fs.open(filesystem.join(root, relative), "rb") as f:
        return filesystem.read_parquet(f, columns=columns)


def supersede_errors(
    fs: fsspec.AbstractFileSystem,
    root: str,
    gone: Optional[Callable[[list[str]], list[bool]]] = None,
    check: Callable[[], None] = lambda: None,
) -> Superseded:
    """Remove the error rows that later runs superseded (see the module docstring) from the
    committed output at ``root``; mark every run checked. ``gone(ids)`` (content identity:
    the run's id registry, which has counted every row of the table) says which error
    rows' ids no row of the input has any more: those rows were edited or removed, and
    their error rows leave too. Call it after a run's manifest is written, holding the
    output's lock; ``check()`` runs before every rewrite and removal and raises if the
    lease was lost (:func:`~pipeline.storage.lock.check_lease`)."""
    manifests = commit_protocol.read_manifests(fs, root)
    unchecked = {m["run_id"] for m in manifests if not m.get(CHECKED)}
    done = Superseded()
    if not unchecked:
        return done
    errors_dir = filesystem.join(root, record_format.ERRORS_DIR)
    if not (fs.isdir(errors_dir) and fs.find(errors_dir)):
        # No error part at all (the usual large run): nothing can be superseded, and the
        # output's commit records (16 bytes an image, read and checked) need not be read.
        _mark_checked(fs, root)
        return done
    found = commit_protocol.read_commits(fs, root)
    error_parts = [part.path for record in found.records for part in record.parts if part.kind == record_format.ERRORS_DIR and part.rows]
    errors = [_read(fs, root, path, [*KEY_COLUMNS, *VERDICT_COLUMNS]) for path in error_parts]
    errors = pa.concat_tables(errors, promote_options="default") if errors else None
    later: dict[tuple, str] = {}
    imaged: set[str] = set()
    gone_ids: set[str] = set()
    if errors is not None and errors.num_rows:
        # The keys a later verdict could supersede an error row by come from the error rows
        # themselves (few); the later runs' rows are read as Arrow columns, and only those
        # holding such a key become Python objects: the driver holds nothing per image.
        duplicate = pc.fill_null(pc.equal(errors.column(S.ERROR_TYPE), S.ERROR_TYPE_DUPLICATE_ID), False)
        wanted_requests = pc.unique(errors.column(S.REQUEST_ID))
        wanted_rows = pc.unique(errors.filter(pc.invert(duplicate)).column(S.ID))
        wanted_positions = pc.unique(_positions(errors.filter(duplicate)))
        for record in found.records:
            if record.run_id not in unchecked:
                continue
            for part in record.parts:
                columns = KEY_COLUMNS + ([S.ERROR_TYPE] if part.kind == record_format.ERRORS_DIR else [])
                table = _read(fs, root, part.path, columns)
                hit = pc.or_(
                    pc.or_(pc.is_in(table.column(S.REQUEST_ID), wanted_requests), pc.is_in(table.column(S.ID), wanted_rows)),
                    pc.is_in(_positions(table), wanted_positions),
                )
                for key, run_id in offers(table.filter(pc.fill_null(hit, False))):
                    if later.get(key, "") < run_id:
                        later[key] = run_id
        imaged = _imaged(fs, root, found, errors.filter(pc.invert(duplicate)), unchecked)
        if gone is not None:
            ids = pc.unique(errors.filter(pc.invert(duplicate)).column(S.ID)).to_pylist()
            gone_ids = {row_id for row_id, away in zip(ids, gone(ids)) if away}
    if later or imaged or gone_ids:
        columns = [*KEY_COLUMNS, *VERDICT_COLUMNS]
        done = drop_rows(fs, root, found.records, record_format.ERRORS_DIR, columns, lambda keys: superseded_mask(keys, later, imaged, gone_ids), check)
    # Last: a crash before this leaves the runs unchecked, and the next run checks again.
    _mark_checked(fs, root)
    if done.rows:
        log.info("removed %d error row(s) that later runs superseded (%d part(s) rewritten)", done.rows, len(done.parts))
    return done


def _imaged(fs: fsspec.AbstractFileSystem, root: str, found: commit_protocol.Commits, errors: pa.Table, unchecked: set[str]) -> set[str]:
    """:func:`image_keys` of the images of any run whose ids new error rows (those of the
    ``unchecked`` runs) have: an image stands, so those error rows leave (see the README's
    "one verdict per row"). Reads the ``id`` and ``image_index`` columns of every image
    part, and only when a run left error rows (a run without any reads nothing here)."""
    fresh = pc.unique(errors.filter(pc.is_in(errors.column(S.RUN_ID), pa.array(sorted(unchecked), pa.string()))).column(S.ID))
    if not len(fresh):
        return set()
    held: set[str] = set()
    for record in found.records:
        for part in record.parts:
            if part.kind == record_format.IMAGES_DIR and part.rows:
                images = _read(fs, root, part.path, [S.ID, S.IMAGE_INDEX])
                held |= image_keys(images.filter(pc.fill_null(pc.is_in(images.column(S.ID), fresh), False)))
    return held


def _mark_checked(fs: fsspec.AbstractFileSystem, root: str) -> None:
    for manifest in commit_protocol.read_manifests(fs, root):
        if not manifest.get(CHECKED):
            _rewrite_manifest(fs, root, {**manifest, CHECKED: True})


def drop_rows(
    fs: fsspec.AbstractFileSystem,
    root: str,
    records: list[record_format.Record],
    kind: str,
    columns: list[str],
    drop: Callable[[pa.Table], list[bool]],
    check: Callable[[], None] = lambda: None,
) -> Superseded:
    """Remove from the committed ``kind`` parts (``images`` or ``errors``) of ``records``
    the rows ``drop`` marks (given each part's ``columns``): each part holding one is
    rewritten without them under a new commit record, then the manifests listing it are
    rewritten, and only then do the old records and parts go, into the trash (records
    first, so no record ever lists a part already gone). Used for superseded error rows and
    by ``imagegen prune`` (images no row owns). Call it holding the output's lock;
    ``check()`` runs before each rewrite and before the old files go (a lost lease raises
    there)."""
    done = Superseded()
    stale: list[str] = []
    for record in records:
        check()
        stale += _rewrite_record(fs, root, record, kind, columns, drop, done)
    check()
    if done.parts:
        for manifest in commit_protocol.read_manifests(fs, root):
            parts = manifest.get("parts", [])
            kept = [done.parts.get(part["path"], part) for part in parts if done.parts.get(part["path"], part) is not None]
            if kept != parts:
                _rewrite_manifest(fs, root, {**manifest, "parts": sorted(kept, key=lambda part: part["path"])})
    folder = trash.batch()
    for relative in stale:
        trash.set_aside(fs, root, relative, folder)
    return done


def _rewrite_record(
    fs: fsspec.AbstractFileSystem, root: str, record: record_format.Record, kind: str, columns: list[str], drop: Callable[[pa.Table], list[bool]], done: Superseded
) -> list[str]:
    """Rewrite ``record``'s ``kind`` parts without the rows ``drop`` marks, under a new commit
    record; returns what then goes (the old record, then its rewritten parts), for the
    caller to remove once the manifests list the new parts. Until then both records list
    the same other parts, and :func:`~pipeline.storage.commit_protocol.read_commits` gives
    each part to one of them."""
    parts, removed_by_stage, removed, changed = [], {}, 0, False
    for part in record.parts:
        if part.kind != kind:
            parts.append(part)
            continue
        mask = drop(_read(fs, root, part.path, columns))
        if not any(mask):
            parts.append(part)
            continue
        changed = True
        table = _read(fs, root, part.path)
        gone = table.filter(pa.array(mask))
        if kind == record_format.ERRORS_DIR:
            for stage in gone.column(S.ERROR_STAGE).to_pylist():
                removed_by_stage[stage] = removed_by_stage.get(stage, 0) + 1
        kept = table.filter(pc.invert(pa.array(mask)))
        done.rows += gone.num_rows
        removed += gone.num_rows
        if kept.num_rows:
            entry = part_files.write_part(fs, root, kind, record.run_id, kept)
            parts.append(entry)
            done.parts[part.path] = {"path": entry.path, "rows": entry.rows, "bytes": entry.bytes, "sha256": entry.sha256}
        else:
            done.parts[part.path] = None
    if not changed:
        return []
    if parts:
        counts = dict(record.counts)
        if counts and kind == record_format.IMAGES_DIR:
            counts["images"] = int(counts.get("images", 0)) - removed
        elif counts:
            counts["errors"] = int(counts.get("errors", 0)) - sum(removed_by_stage.values())
            by_stage = dict(counts.get("errors_by_stage", {}))
            for stage, n in removed_by_stage.items():
                by_stage[stage] = by_stage.get(stage, 0) - n
            counts["errors_by_stage"] = {s: n for s, n in by_stage.items() if n > 0}
        new = record_format.Record(record_format.record_name(record.run_id, parts, compacted=record.compacted), record.run_id, record.written_at, parts, counts)
        filesystem.atomic_write(fs, filesystem.join(root, new.name), record_format.encode_record(new))
    return [record.name, *record.replaces, *(path for path in done.parts if path in {p.path for p in record.parts})]


def _rewrite_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
    part_files.write_manifest(fs, root, manifest["run_id"], manifest)
