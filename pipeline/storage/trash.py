"""Deferred deletion: files no commit record accepts are moved aside, and deleted only
after a retention period (as Delta Lake's VACUUM and Iceberg's orphan cleanup do).

A check that finds a part damaged, a record unreadable or a file left by a crash never
deletes anything: what it would remove goes under ``<output>/_trash/<when>/`` (its path
below the output kept), so a wrong verdict (a bug, a listing that lied, a clock gone
wrong) costs a move back, never the images. Runs purge what has waited longer than
``output.retention_hours`` when they start (holding the output's lock); ``imagegen
vacuum`` purges now; ``imagegen verify`` and ``inspect`` show what waits. Readers never
see the trash: its name starts with ``_``, which Parquet readers (pyarrow, pandas,
DuckDB, ``datasets``) skip.

Pure: no Ray.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from typing import Optional

import fsspec

from pipeline.storage import filesystem

TRASH_DIR = "_trash"
_STAMP = "%Y%m%dT%H%M%SZ"


def batch(now: Optional[float] = None) -> str:
    """The trash folder for files set aside at ``now`` (one per repair or rewrite)."""
    return f"{TRASH_DIR}/{time.strftime(_STAMP, time.gmtime(time.time() if now is None else now))}"


def set_aside(fs: fsspec.AbstractFileSystem, root: str, relative: str, folder: str) -> None:
    """Move ``relative`` (a path below the output) into the trash ``folder`` (see
    :func:`batch`); gone already is fine (a step made again after a crash)."""
    filesystem.move(fs, filesystem.join(root, relative), filesystem.join(root, folder, relative))


@dataclass
class Waiting:
    """What waits in an output's trash: files, their bytes, and the oldest batch's time."""

    files: list[str] = field(default_factory=list)  # relative to the output root
    bytes: int = 0
    oldest: Optional[float] = None
    _when: dict[str, float] = field(default_factory=dict, repr=False)

    def older_than(self, seconds: float, now: Optional[float] = None) -> list[str]:
        """The files set aside more than ``seconds`` ago."""
        limit = (time.time() if now is None else now) - seconds
        return [f for f in self.files if self._when[f] <= limit]


def waiting(fs: fsspec.AbstractFileSystem, root: str) -> Waiting:
    """What waits in the trash of the output at ``root`` (one listing)."""
    found = Waiting()
    folder = filesystem.join(root, TRASH_DIR)
    if not fs.isdir(folder):
        return found
    prefix = root.rstrip("/") + "/"
    for path, info in sorted(fs.find(folder, detail=True).items()):
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        stamp = relative.split("/")[1]
        try:
            when = float(calendar.timegm(time.strptime(stamp, _STAMP)))
        except ValueError:  # not a batch of ours: purged with the rest
            when = 0.0
        found.files.append(relative)
        found._when[relative] = when
        found.bytes += int(info.get("size") or 0)
        found.oldest = when if found.oldest is None else min(found.oldest, when)
    return found


def purge(fs: fsspec.AbstractFileSystem, root: str, older_than_s: float = 0.0, dry_run: bool = False) -> list[str]:
    """Delete what has waited in the trash more than ``older_than_s`` seconds (all of it by
    default); with ``dry_run`` only say what. Returns the files (relative to ``root``)."""
    gone = waiting(fs, root).older_than(older_than_s)
    if not dry_run:
        for relative in gone:
            filesystem.remove(fs, filesystem.join(root, relative))
    return gone
