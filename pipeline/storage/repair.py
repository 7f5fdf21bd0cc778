"""Making an output's files what :func:`~pipeline.storage.commit_protocol.read_commits`
decided, before a run: the one step of the commit protocol that changes files.

It writes the records of legacy outputs, the reduced records and the records of the first
format, then moves orphan parts, then the records not accepted, into the trash
(:mod:`.trash`; deleted after ``output.retention_hours``), and removes temporary files a
crash left. Each step is safe to stop after: what is written first is what the next read
accepts. Only a run holding the output's lock calls it. Pure: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.storage import filesystem, trash
from pipeline.storage.commit_protocol import Commits, read_manifests, write_manifest
from pipeline.storage.record_format import encode_record


@dataclass
class Recovery:
    """What :func:`repair` did to an output before a run: for the summary and the manifest."""

    removed_parts: list[str] = field(default_factory=list)
    dropped_records: list[tuple[str, str]] = field(default_factory=list)
    damaged_parts: list[tuple[str, str]] = field(default_factory=list)
    rows_made_again: int = 0
    superseded_records: list[str] = field(default_factory=list)
    migrated_runs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed_parts": self.removed_parts,
            "dropped_records": [{"record": n, "reason": why} for n, why in self.dropped_records],
            "damaged_parts": [{"part": n, "reason": why} for n, why in self.damaged_parts],
            "rows_made_again": self.rows_made_again,
            "superseded_records": self.superseded_records,
            "migrated_runs": self.migrated_runs,
        }

    def __bool__(self) -> bool:
        return bool(self.removed_parts or self.dropped_records or self.damaged_parts or self.superseded_records)


def _unlist(fs: fsspec.AbstractFileSystem, root: str, paths: set[str]) -> None:
    """Rewrite the manifests that list any of ``paths`` without them."""
    for manifest in read_manifests(fs, root) if paths else []:
        parts = manifest.get("parts", [])
        kept = [p for p in parts if p.get("path") not in paths]
        if len(kept) != len(parts):
            write_manifest(fs, root, manifest["run_id"], {**manifest, "parts": kept})


def repair(fs: fsspec.AbstractFileSystem, root: str, commits: Commits) -> Recovery:
    """Make the output's files what ``commits`` decided: write the records of legacy
    outputs and the reduced records, then move orphan parts, then the records not accepted,
    into the trash (:mod:`.trash`; deleted after the retention period). Each step is safe
    to stop after: what is written first is what the next read accepts. Only a run holding
    the output's lock may call it (it would move the parts of a run in flight)."""
    recovery = Recovery(
        dropped_records=list(commits.dropped),
        damaged_parts=list(commits.damaged),
        rows_made_again=commits.dropped_rows,
        superseded_records=list(commits.superseded),
    )
    for record in [*commits.legacy, *(r for r in commits.reduced if not r.legacy), *commits.outdated]:
        filesystem.atomic_write(fs, filesystem.join(root, record.name), encode_record(record))
        if record.legacy:
            record.legacy = False
            recovery.migrated_runs.append(record.run_id)
    # The manifests stop listing what goes before it goes: none ever names a missing part.
    _unlist(fs, root, set(commits.orphans))
    folder = trash.batch()
    for path in commits.orphans:
        trash.set_aside(fs, root, path, folder)
    replaced = [name for r in commits.records for name in r.replaces]
    for name in [*(n for n, _ in commits.dropped), *commits.superseded, *commits.redundant, *replaced]:
        trash.set_aside(fs, root, name, folder)
    for path in commits.stray:  # temporary files of writes a crash interrupted: never a commit
        filesystem.remove(fs, filesystem.join(root, path))
    recovery.removed_parts = list(commits.orphans)
    return recovery
