"""``imagegen verify``: check an output against the dataset contract.

Checks, each a list of violations in the report:

- every commit record reads and every part it lists is there at its recorded size
  (:mod:`pipeline.storage.commit_protocol`); no record is superseded by another holding the same
  request ids (left by a retried write until the next run removes it);
- every part in ``images/`` and ``errors/`` has a commit record (no uncommitted parts: an
  interrupted run leaves those until the next run into the output removes them), its
  bytes match the record's sha256, and it is readable Parquet;
- every manifest parses and every part a finished run's manifest lists exists;
- no request id appears twice among the images;
- every request and input row is in exactly one place: no error row that a later run's
  image or error row for the same request or input row superseded, and no error row of
  an input row that has an image, whichever came first (see
  :mod:`pipeline.storage.supersede`), no request id both an image and an error row, and
  none twice among the errors;
- every image's ``sha256`` matches its bytes;
- with the job spec: every input row is accounted for, in the images (each of its images)
  or in the errors, as the spec's validator decides the row's request ids today; and every
  image belongs to a row of the current input (:mod:`.ownership`: a renamed or converted
  input without an id column would otherwise double the dataset unnoticed).

Pure: reads through :mod:`pipeline.storage.filesystem`, never starts Ray. It reads every part, so it
costs about one pass over the dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.engine.resolve_catalog import build_catalog, place, recorded_models
from pipeline.output.ownership import unowned_images
from pipeline.spec import schema as S
from pipeline.spec.config import JobSpec
from pipeline.spec.duplicate_ids import find_duplicate_ids
from pipeline.spec.occurrences import numbered
from pipeline.spec.validate import Validator
from pipeline.storage import commit_protocol, filesystem, record_format, skip_filter, supersede, tables, trash

_MAX_LISTED = 10


@dataclass
class VerifyReport:
    runs: int = 0
    parts: int = 0
    images: int = 0
    errors: int = 0
    input_rows: Optional[int] = None
    violations: list[str] = field(default_factory=list)
    trash_files: int = 0  # set aside, waiting out output.retention_hours (not a violation)
    trash_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, problem: str, examples: list[str]) -> None:
        if examples:
            shown = ", ".join(examples[:_MAX_LISTED]) + (f" (+{len(examples) - _MAX_LISTED} more)" if len(examples) > _MAX_LISTED else "")
            self.violations.append(f"{problem}: {shown}")

    def format(self) -> str:
        lines = [
            f"runs {self.runs}, parts {self.parts}, images {self.images}, errors {self.errors}"
            + (f", input rows {self.input_rows}" if self.input_rows is not None else ""),
            "OK: the output keeps the contract" if self.ok else f"FAILED: {len(self.violations)} violation(s)",
        ]
        lines += [f"  - {v}" for v in self.violations]
        if self.trash_files:
            lines.append(
                f"waiting    {self.trash_files} file(s), {self.trash_bytes} bytes set aside in {trash.TRASH_DIR}/ "
                "(deleted after output.retention_hours; `imagegen vacuum` deletes them now)"
            )
        return "\n".join(lines)


def verify(url: str, storage_options: dict | None = None, spec: JobSpec | None = None) -> VerifyReport:
    """Check the output at ``url`` (see module docstring); never raises for a violation."""
    fs, root = filesystem.open_url(url, storage_options)
    report = VerifyReport()
    found = commit_protocol.read_commits(fs, root)
    listed: set[str] = set()
    run_ids = set(found.runs())
    broken_manifests = []
    runs_dir = filesystem.join(root, record_format.RUNS_DIR)
    for path in sorted(fs.find(runs_dir)) if fs.isdir(runs_dir) else []:
        if filesystem.is_temporary(path):
            continue  # a write a crash interrupted: never read as a manifest (the next run removes it)
        try:
            manifest = json.loads(filesystem.read_bytes(fs, path))
            listed.update(part["path"] for part in manifest["parts"])
            run_ids.add(manifest["run_id"])
        except (ValueError, KeyError, TypeError):
            broken_manifests.append(path.rsplit("/", 1)[-1])
    report.runs = len(run_ids)
    waiting = trash.waiting(fs, root)
    report.trash_files, report.trash_bytes = len(waiting.files), waiting.bytes
    report.add("manifests that cannot be read", broken_manifests)
    report.add("commit records dropped (unreadable, or every part of theirs missing or truncated)", [f"{name} ({why})" for name, why in found.dropped])
    report.add("committed parts missing or truncated (the next run makes their rows again)", [f"{path} ({why})" for path, why in found.damaged])
    report.add("commit records superseded by an earlier one holding the same request ids (the next run removes them)", found.superseded)
    report.add("parts without a commit record (left by an interrupted run; the next run into this output sets them aside)", found.orphans)

    present = set(found.present)
    report.parts = len(present)
    report.add("parts listed by a manifest but missing", sorted(listed - present))

    committed = found.parts
    image_keys, image_ids = [], []
    error_ids: set[str] = set()
    keys: dict[str, list[pa.Table]] = {record_format.IMAGES_DIR: [], record_format.ERRORS_DIR: []}
    unreadable, bad_digests, bad_parts = [], [], []
    # Every part present, committed or not: readers (pandas, datasets, DuckDB) see them all.
    for relative in sorted(present):
        try:
            data = filesystem.read_bytes(fs, filesystem.join(root, relative))
            entry = committed.get(relative)
            if entry is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
                bad_parts.append(relative)
            table = filesystem.read_parquet(data)
        except Exception as exc:  # noqa: BLE001 - any unreadable part is a finding, not a crash
            unreadable.append(f"{relative} ({type(exc).__name__})")
            continue
        kind = relative.split("/", 1)[0]
        keys[kind].append(table.select([c for c in (*supersede.KEY_COLUMNS, *supersede.VERDICT_COLUMNS) if c in table.column_names]))
        if kind == record_format.IMAGES_DIR:
            report.images += table.num_rows
            ids = table.column(S.REQUEST_ID)
            image_ids.append(ids)
            image_keys.append(skip_filter.id_keys(ids))
            for rid, image, digest in zip(*(table.column(c).to_pylist() for c in (S.REQUEST_ID, S.IMAGE, S.SHA256))):
                if image is None or hashlib.sha256(image["bytes"]).hexdigest() != digest:
                    bad_digests.append(rid)
        else:
            report.errors += table.num_rows
            error_ids.update(table.column(S.REQUEST_ID).to_pylist())
    report.add("unreadable parts", unreadable)
    report.add("parts whose bytes do not match their commit record's sha256", bad_parts)
    report.add("request ids with more than one image", _repeated(image_keys, image_ids))
    report.add("images whose sha256 does not match their bytes", bad_digests)
    _in_two_places(keys, report)

    if spec is not None:
        made = {rid for ids in image_ids for rid in ids.to_pylist()}
        imaged = set().union(*(supersede.image_keys(t) for t in keys[record_format.IMAGES_DIR]))
        missing = _unaccounted(spec, made | error_ids, imaged, report)
        report.add("input rows with no image and no error row", missing)
        _report_unowned(spec, fs, root, report)
    return report


def _repeated(keys: list[np.ndarray], ids: list[pa.ChunkedArray]) -> list[str]:
    """Request ids held by more than one image row (found by key, named by id)."""
    if not keys:
        return []
    every = np.concatenate(keys)
    ordered = np.sort(every)  # one sort: numpy 2's np.unique hashes, far slower at millions of ids
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(twice):
        return []
    held = np.isin(every, twice)
    names = pa.chunked_array([c for a in ids for c in a.chunks], pa.string()).filter(pa.array(held))
    return sorted(set(names.to_pylist()))


def _in_two_places(keys: dict[str, list[pa.Table]], report: VerifyReport) -> None:
    """Exactly one place per request and input row: error rows a later verdict superseded
    but that are still there, request ids both images and errors, error rows twice."""
    later: dict[tuple, str] = {}
    for table in (*keys[record_format.IMAGES_DIR], *keys[record_format.ERRORS_DIR]):
        for key, run_id in supersede.offers(table):
            if later.get(key, "") < run_id:
                later[key] = run_id
    errors = [t for t in keys[record_format.ERRORS_DIR] if t.num_rows]
    # One verdict per row: an input row with an image has no error row, whichever came later.
    imaged = set().union(*(supersede.image_keys(t) for t in keys[record_format.IMAGES_DIR])) if errors else set()
    stale, error_ids = [], Counter()
    for table in errors:
        for row, superseded in zip(table.select([S.ID, S.REQUEST_ID]).to_pylist(), supersede.superseded_mask(table, later, imaged)):
            error_ids[row[S.REQUEST_ID]] += 1
            if superseded:
                stale.append(row[S.ID])
    image_ids = {rid for t in keys[record_format.IMAGES_DIR] for rid in t.column(S.REQUEST_ID).to_pylist()}
    report.add("input rows both in the images and in the errors (an error row of a row with an image, or that a later run superseded)", stale)
    report.add("request ids both an image and an error row", sorted(set(error_ids) & image_ids))
    report.add("request ids with more than one error row", sorted(r for r, n in error_ids.items() if n > 1))



def _unaccounted(spec: JobSpec, committed: set[str], imaged: set[str], report: VerifyReport) -> list[str]:
    duplicates = find_duplicate_ids(tables.read_input(spec.input), spec.input.id_column) if spec.input.id_column else {}
    # device: auto is taken as the output's latest run ran it (no actors here to decide).
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    validator = Validator(spec, place(build_catalog(spec), None, recorded_models(commit_protocol.read_manifests(fs, root))), duplicates=duplicates)
    missing, rows = [], 0
    for chunk in numbered(tables.read_input(spec.input), spec.input):
        for raw in chunk.to_pylist():
            rows += 1
            requests = validator.validate_row(raw)
            if any(r[S.REQUEST_ID] not in committed for r in requests):
                if requests[0].get(S.ERROR_STAGE) and requests[0][S.ERROR_TYPE] != S.ERROR_TYPE_DUPLICATE_ID and requests[0][S.ID] in imaged:
                    continue  # rejected today, made before: its image stands (one verdict per row)
                missing.append(requests[0][S.ID])
    report.input_rows = rows
    return missing


def _report_unowned(spec: JobSpec, fs, root: str, report: VerifyReport) -> None:
    """Images no current input row owns are a violation: a renamed or converted input
    without an id column doubles the dataset while every input row is still accounted for."""
    unowned = unowned_images(spec, fs, root)
    if unowned.images:
        report.violations.append(unowned.message(spec))
