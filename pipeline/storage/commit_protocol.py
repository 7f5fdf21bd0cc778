"""Commit records: what makes a part of an output durable, and what a rerun adopts.

Every block the job writes becomes its Parquet part(s) first, then one small commit
record under ``<output>/_commits/<run-id>/``. A part counts (is committed) exactly when
an accepted record lists it with its size; so a driver killed at any moment loses at most
the blocks in flight, and the next run into the output adopts everything else.

A record is one small file (its format: :mod:`.record_format`) listing a block's parts
and their request ids as whole 16-byte keys (:mod:`.skip_filter`). As a run goes, the job
folds its block records about 1M ids at a time into compacted records, so records stay
few and small at any size; at its end the leftovers of writes Ray retried go (:mod:`.fold`).

Reading (:func:`read_commits`) decides, deterministically and without writing:

- a record that cannot be read (truncated, digest mismatch) is *dropped*;
- a part that is missing, or whose size differs from its record's (a truncated Parquet
  file), is *damaged*: it costs its own rows (made again), never its record's other parts;
- records are taken in order (run id, which sorts by the run's sequence number; compacted records
  first; then name), and **a part belongs to one accepted record**: the first that lists
  it. A later record listing it keeps only its other parts (it is *reduced*, and
  rewritten so by :func:`~pipeline.storage.repair.repair`); one left with none is *redundant* (a fold or rewrite
  a crash or a retry interrupted) or, when its own parts were damaged, dropped;
- a record holding a request id an earlier accepted record already holds is
  *superseded* whole (a write Ray retried with another block composition): the first
  one wins, so no request id is counted twice (decided on full ids: :mod:`.record_conflicts`);
- a part file no accepted record lists is an *orphan* (a part written just before a
  crash, or the parts of dropped and superseded records).

:func:`~pipeline.storage.repair.repair` then makes the files match: it writes the
reduced records, then moves orphans and the records not accepted into the trash
(:mod:`.trash`), whence they are deleted after ``output.retention_hours``: a check never
deletes. Only a run holding the output's lock calls it. The sha256 of a part's bytes is
checked by ``imagegen verify`` (which reads every part anyway), not at adoption: reading
every byte of a large output before a rerun would cost as much as the rerun saves;
adoption checks presence and size, which is what a crash damages.

Pure: no Ray. Outputs written before commit records existed are read through their run
manifests (each listed part's ids are read once); :func:`~pipeline.storage.repair.repair` writes their records.
Records of the first format (8-byte hashes of the ids) get their keys from their parts
the same way, and :func:`~pipeline.storage.repair.repair` rewrites them in the current one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.errors import StorageError
from pipeline.spec import schema as S
from pipeline.storage import filesystem, record_conflicts
from pipeline.storage.dataset_schema import SCHEMA_DIR
from pipeline.storage.record_format import (
    COMMITS_DIR,
    ERRORS_DIR,
    IMAGES_DIR,
    RUNS_DIR,
    SUFFIX,
    CorruptRecord,
    PartEntry,
    Record,
    decode_record,
    part_entry,
    record_name,
    with_ids,
)
from pipeline.storage.skip_filter import EMPTY_KEYS, KEY, CommittedIds, SkipFilter, gathered, key_prefixes, sorted_unique_of


# -- reading ------------------------------------------------------------------------------


@dataclass
class RunCommits:
    """What one run has committed, summed from its accepted records."""

    run_id: str
    images: int = 0
    errors: int = 0
    input_rows: int = 0
    parts: int = 0
    records: int = 0
    first_written_at: Optional[float] = None
    last_written_at: Optional[float] = None
    errors_by_stage: dict[str, int] = field(default_factory=dict)


@dataclass
class Commits:
    """An output's commit state as :func:`read_commits` decided it (see the module docstring)."""

    records: list[Record] = field(default_factory=list)  # accepted, in order
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (record, reason)
    dropped_rows: int = 0  # rows of damaged parts and of the parts of dropped records: made again
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (part, why): its rows are made again
    reduced: list[Record] = field(default_factory=list)  # accepted, rewritten by repair without the parts they lose
    replaced: dict[str, list[str]] = field(default_factory=dict)  # reduced record -> the records it stands for
    superseded: list[str] = field(default_factory=list)
    redundant: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # temporary files left by writes a crash interrupted
    present: dict[str, int] = field(default_factory=dict)  # part files on disk -> size
    outdated: list[Record] = field(default_factory=list)  # accepted, of the first format: rewritten by repair

    @property
    def parts(self) -> dict[str, PartEntry]:
        """The committed parts by path (each once)."""
        return {p.path: p for r in self.records for p in r.parts}

    def ids(self) -> CommittedIds:
        """The ids a rerun skips: images and final error rows of the accepted records."""
        return self.skip_filter().committed

    def skip_filter(self, interrupted: Iterable[str] = (), release: bool = False) -> SkipFilter:
        """What a rerun skips (:meth:`ids`), and which skips adopt the ``interrupted`` runs' images.

        The keys are copied record by record into one array, sorted in place (accepted
        records never share a part, so each key is taken once). With ``release``, each
        record's keys are let go once copied (the records are left without ids: for the
        last use of a :class:`Commits`), so the resume's peak is the records' 16 bytes an
        id turning into the filter's 16, plus 8 an adoptable id, not the two side by side."""
        wanted = set(interrupted)
        adopted = [p for r in self.records if r.run_id in wanted for p in r.parts]
        adoptable = gathered((key_prefixes(p.final) for p in adopted), sum(len(p.final) for p in adopted), np.dtype(np.uint64))
        keys = gathered(self._finals(release), sum(len(p.final) for r in self.records for p in r.parts), KEY)
        return SkipFilter(CommittedIds(sorted_unique_of(keys, in_place=True), sorted_unique=True), sorted_unique_of(adoptable, in_place=True))

    def _finals(self, release: bool) -> Iterator[np.ndarray]:
        """Each accepted part's final keys; with ``release``, each record's keys are dropped
        once yielded, and the memory they held handed back every :data:`_TRIM_BYTES`."""
        freed = 0
        for r in self.records:
            for p in r.parts:
                yield p.final
            if release:
                for p in r.parts:
                    freed += p.final.nbytes + p.retry.nbytes
                    p.final = p.retry = EMPTY_KEYS
                if freed >= _TRIM_BYTES:
                    _return_freed_memory()
                    freed = 0

    def runs(self) -> dict[str, RunCommits]:
        """Per run, what its accepted records hold (runs in id order)."""
        out: dict[str, RunCommits] = {}
        seen: set[str] = set()
        for r in self.records:
            run = out.setdefault(r.run_id, RunCommits(r.run_id))
            run.records += 1
            run.first_written_at = min(run.first_written_at or r.written_at, r.written_at)
            run.last_written_at = max(run.last_written_at or r.written_at, r.written_at)
            fresh = [p for p in r.parts if p.path not in seen]
            seen.update(p.path for p in fresh)
            if len(fresh) == len(r.parts) and r.counts:
                run.input_rows += int(r.counts.get("input_rows", 0))
                for stage, n in r.counts.get("errors_by_stage", {}).items():
                    run.errors_by_stage[stage] = run.errors_by_stage.get(stage, 0) + n
            for p in fresh:
                run.parts += 1
                if p.kind == IMAGES_DIR:
                    run.images += p.rows
                else:
                    run.errors += p.rows
        return dict(sorted(out.items()))

    @property
    def legacy(self) -> list[Record]:
        return [r for r in self.records if r.legacy]


# Released record keys handed back to the OS this many bytes at a time (see _return_freed_memory).
_TRIM_BYTES = 64 << 20


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Block records are small files, read into small buffers on the heap: freeing them leaves
    holes that glibc keeps, so without this the released keys of an output of block
    records would sit beside the filter's (measured: 32.5 bytes an image at the peak
    instead of 24.7 for 10M ids in 2000 records)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_commits(fs: fsspec.AbstractFileSystem, root: str) -> Commits:
    """Read the commit records and part files of the output at ``root`` and decide what is
    committed (see the module docstring). Reads only; :func:`~pipeline.storage.repair.repair` applies the decision."""
    commits = Commits(present=_present_parts(fs, root))
    records, unreadable, commits.stray = _read_records(fs, root, filesystem.join(root, COMMITS_DIR))
    outdated = {r.name for r in records if r.outdated}
    unkeyed = _key_outdated(fs, root, records, commits.present)
    commits.stray += _temporary_files(fs, root, commits.present)
    commits.dropped += unreadable
    covered = {p.path for r in records for p in r.parts}
    recorded_runs = {name.split("/")[1] for name in [*(r.name for r in records), *(n for n, _ in unreadable)] if name.count("/") >= 2}
    records += _legacy_records(fs, root, covered, commits.present, recorded_runs)
    records.sort(key=Record.order)

    candidates: list[Record] = []
    taken: set[str] = set()
    names = {r.name for r in records if not r.legacy}  # record files present
    for record in records:
        if record.name in commits.replaced:
            continue  # written by a repair a crash interrupted: its reduced candidate stands for it
        healthy, damage = [], []
        for p in record.parts:
            if p.path in taken:
                continue  # the part belongs to an earlier record
            problem = _part_problem(p, commits.present) or unkeyed.get(p.path)
            if problem:
                damage.append(problem)
                commits.damaged.append((p.path, f"{problem} (in {record.name})"))
                commits.dropped_rows += p.rows
                taken.add(p.path)  # one verdict per part
            else:
                healthy.append(p)
        if not healthy:
            if damage:
                commits.dropped.append((record.name, "; ".join(damage)))
            else:
                commits.redundant.append(record.name)
            continue
        if len(healthy) < len(record.parts):
            record = _reduced(record, healthy)
            commits.replaced[record.name] = record.replaces
            if record.name not in names:
                commits.reduced.append(record)
        candidates.append(record)
        taken.update(p.path for p in record.parts)

    losers = record_conflicts.superseded(candidates)
    commits.records = [r for i, r in enumerate(candidates) if i not in losers]
    commits.superseded = [n for i in sorted(losers) for n in [*candidates[i].replaces, candidates[i].name] if n in names]
    kept = {id(r) for r in commits.records}  # by identity: records hold arrays, == is ambiguous
    commits.reduced = [r for r in commits.reduced if id(r) in kept]
    commits.outdated = [r for r in commits.records if r.name in outdated and r.name not in commits.replaced]
    accepted = {p.path for r in commits.records for p in r.parts}
    commits.orphans = sorted(path for path in commits.present if path not in accepted)
    return commits


def _temporary_files(fs: fsspec.AbstractFileSystem, root: str, present: dict[str, int]) -> list[str]:
    """Temporary files of atomic writes a crash interrupted (local disks only: object
    stores write at once): among the parts, beside the manifests, the schemas and the card."""
    if not filesystem.is_local(fs):
        return []
    found = [path for path in present if filesystem.is_temporary(path)]
    for path in present.copy():
        if filesystem.is_temporary(path):
            del present[path]
    prefix = root.rstrip("/") + "/"
    for folder in (root, filesystem.join(root, RUNS_DIR), filesystem.join(root, SCHEMA_DIR)):
        if fs.isdir(folder):
            found += [p[len(prefix) :] for p in fs.ls(folder, detail=False) if filesystem.is_temporary(p) and p.startswith(prefix)]
    return sorted(found)


def _present_parts(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    present: dict[str, int] = {}
    for kind in (IMAGES_DIR, ERRORS_DIR):
        folder = filesystem.join(root, kind)
        if fs.isdir(folder):
            for path, info in fs.find(folder, detail=True).items():
                present[f"{kind}/{path.rsplit('/', 1)[-1]}"] = int(info.get("size") or 0)
    return present


def _read_records(fs: fsspec.AbstractFileSystem, root: str, folder: str) -> tuple[list[Record], list[tuple[str, str]], list[str]]:
    """The records under ``folder``, the ones that do not read (name, why), and other files."""
    if not fs.isdir(folder):
        return [], [], []
    prefix = root.rstrip("/") + "/"
    found = sorted(fs.find(folder))
    stray = [p[len(prefix) :] if p.startswith(prefix) else p for p in found if not p.endswith(SUFFIX)]
    records, bad = read_records_at(fs, root, [p for p in found if p.endswith(SUFFIX)])
    return records, bad, stray


def read_records_at(fs: fsspec.AbstractFileSystem, root: str, paths: list[str]) -> tuple[list[Record], list[tuple[str, str]]]:
    """The records at ``paths`` (read concurrently), and the ones that do not read (name, why)."""
    prefix = root.rstrip("/") + "/"
    contents = fs.cat(paths, on_error="return") if paths else {}
    records, bad = [], []
    for path in paths:
        name = path[len(prefix) :] if path.startswith(prefix) else path
        data = contents.get(path)
        if data is None:  # some filesystems key the answer by the path as given
            data = next((v for k, v in contents.items() if k.endswith(name)), None)
        try:
            if isinstance(data, Exception) or data is None:
                raise CorruptRecord(f"it cannot be read ({data})")
            records.append(decode_record(name, data))
        except CorruptRecord as exc:
            bad.append((name, str(exc)))
    return records, bad


def _part_problem(p: PartEntry, present: dict[str, int]) -> Optional[str]:
    size = present.get(p.path)
    if size is None:
        return f"its part {p.path} is missing"
    if size != p.bytes:
        return f"its part {p.path} has {size} bytes, the record says {p.bytes} (truncated or replaced)"
    return None


def _reduced(record: Record, parts: list[PartEntry]) -> Record:
    """``record`` keeping only ``parts``, under the name those parts give it: the repair
    that writes it and a repair made again after a crash write the same record."""
    counts = {
        "images": sum(p.rows for p in parts if p.kind == IMAGES_DIR),
        "errors": sum(p.rows for p in parts if p.kind == ERRORS_DIR),
    }
    reduced = Record(record_name(record.run_id, parts, compacted=record.compacted), record.run_id, record.written_at, parts, counts, legacy=record.legacy)
    reduced.replaces = [record.name]
    return reduced


def _key_outdated(fs: fsspec.AbstractFileSystem, root: str, records: list[Record], present: dict[str, int]) -> dict[str, str]:
    """Give the records of the first format their keys, read from their parts (as
    :func:`_legacy_records` reads a manifest's); returns the parts that do not read
    (path -> why), which cost their own rows. A part already missing or of another size
    is left to the size check."""
    unkeyed: dict[str, str] = {}
    for record in records:
        if not record.outdated:
            continue
        keyed = []
        for p in record.parts:
            if present.get(p.path) == p.bytes:
                try:
                    p = with_ids(p, _id_table(fs, root, p.path)[1])
                except (StorageError, OSError, pa.ArrowException) as exc:
                    unkeyed[p.path] = f"its part {p.path} does not read ({type(exc).__name__})"
            keyed.append(p)
        record.parts, record.outdated = keyed, False
    return unkeyed


def _id_table(fs: fsspec.AbstractFileSystem, root: str, path: str) -> tuple[bytes, pa.Table]:
    """A part's bytes, and its request ids with, for an error part, its rows' stages (what
    its keys are made of)."""
    data = filesystem.read_bytes(fs, filesystem.join(root, path))
    return data, filesystem.read_parquet(data, columns=[S.REQUEST_ID, *([S.ERROR_STAGE] if path.startswith(ERRORS_DIR) else [])])


def _legacy_records(fs: fsspec.AbstractFileSystem, root: str, covered: set[str], present: dict[str, int], recorded_runs: set[str]) -> list[Record]:
    """Records for the parts that run manifests of an output older than commit records
    list and no record covers: each such part's ids are read once (see :func:`~pipeline.storage.repair.repair`).

    Only runs with no commit record at all are read so: a run that has records committed
    through them alone, and a part its manifest still lists but no record does (a rewrite
    or repair a crash interrupted) is an orphan, never a second claim. A listed part that
    is damaged (its size is not the manifest's, or it does not read) is left out: it costs
    its own rows."""
    records = []
    for manifest in read_manifests(fs, root):
        if manifest.get("run_id") in recorded_runs:
            continue
        listed = [p for p in manifest.get("parts", []) if p["path"] not in covered and present.get(p["path"]) == p.get("bytes", present.get(p["path"]))]
        if not listed:
            continue
        parts = []
        for p in listed:
            try:
                data, table = _id_table(fs, root, p["path"])
            except (StorageError, OSError, pa.ArrowException):
                continue
            parts.append(part_entry(p["path"], data, table))
        if not parts:
            continue
        counts = {k: v for k, v in manifest.get("counts", {}).items() if k in ("images", "errors", "input_rows", "errors_by_stage")}
        run_id = manifest["run_id"]
        name = record_name(run_id, parts, compacted=True)
        records.append(Record(name, run_id, float(manifest.get("finished_at") or 0.0), parts, counts, legacy=True))
    return records


def read_manifests(fs: fsspec.AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    """The run manifests in ``root``, oldest first (run ids sort by sequence number, see :mod:`.lock`); unreadable ones skipped."""
    runs_dir = filesystem.join(root, RUNS_DIR)
    if not fs.isdir(runs_dir):
        return []
    manifests = []
    for path in sorted(p for p in fs.find(runs_dir) if p.endswith(".json")):
        try:
            manifests.append(json.loads(filesystem.read_bytes(fs, path)))
        except ValueError:
            continue
    return manifests


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, run_id: str, manifest: dict[str, Any]) -> str:
    """Write (or replace) the run's manifest: what the run was and did. What is committed
    is decided by the commit records alone, never by a manifest."""
    path = filesystem.join(root, RUNS_DIR, f"{run_id}.json")
    filesystem.atomic_write(fs, path, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return path
