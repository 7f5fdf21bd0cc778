"""Which output folders are imagegen's, so that a run never removes or replaces a file it
did not write.

A run removes files (parts without a commit record, ``output.mode: overwrite``) and
replaces ``README.md`` (the dataset card). Those steps are safe only in a folder imagegen
made: a mistyped ``output.url`` pointing at a folder of holiday photos must not lose them.
So before any work (:func:`check_output`, read-only) a run and ``imagegen validate`` look
at the folder:

- absent or empty: a new output;
- holding :data:`MARKER_NAME` (written by the first run into it, :func:`mark_output`), or
  an output made before the marker existed (it has run manifests or commit records): ours;
- anything else: refused with :class:`~pipeline.errors.ForeignOutput`, naming what was found.

In an output of ours, ``images/`` and ``errors/`` may hold only files named as imagegen
names its parts (:data:`PART_NAME`): any other file there is refused the same way, since
the next run would remove it as a part without a record (and readers of the dataset would
read it). Other files beside the output's own folders are left alone. The dataset card
replaces ``README.md`` only when that file is a card (:func:`card_name`); else the card
is written to :data:`FALLBACK_CARD_NAME` and the run says so.

Pure: no Ray. Costs a listing of the output's top level and of ``images/``/``errors/``.
"""

from __future__ import annotations

import json
import re

import fsspec

from pipeline.errors import ForeignOutput
from pipeline.storage import filesystem
from pipeline.storage.lock import LOCK_NAME, SEQ_DIR
from pipeline.storage.record_format import COMMITS_DIR, ERRORS_DIR, IMAGES_DIR, RUNS_DIR

MARKER_NAME = "_imagegen.json"
CARD_NAME = "README.md"
FALLBACK_CARD_NAME = "IMAGEGEN_CARD.md"
# The first line of every card imagegen writes: what tells its README from a user's.
CARD_MARKER = "<!-- imagegen dataset card: rewritten after every run; edit the job spec, not this file -->"
# A part as part_files names it, or its hidden temporary twin left by a crash mid-write.
PART_NAME = re.compile(r"^\.?part-[A-Za-z0-9_-]+\.parquet(\.[0-9a-f]+\.tmp)?$")
_SHOWN = 5


def check_output(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Raise :class:`ForeignOutput` unless the folder at ``root`` is new, empty or an
    imagegen output whose ``images/`` and ``errors/`` hold only imagegen's parts (see the
    module docstring). Reads only; call it before the lock and before any work."""
    with filesystem.storage_errors(url, "read"):
        if not fs.isdir(root):
            return
        # The lock is the run's own, taken after this check once (validate takes none); a
        # temporary file of the marker's or the lock's own write is a first run killed mid-write.
        entries = {_base(p) for p in fs.ls(root, detail=False)} - {LOCK_NAME, SEQ_DIR}
        entries = {e for e in entries if not (filesystem.is_temporary(e) and e.startswith((f".{MARKER_NAME}.", f".{LOCK_NAME}.")))}
        if not entries:
            return
        if not _is_ours(fs, root, entries):
            raise ForeignOutput(
                f"{url} is not an imagegen output: it holds {_listed(sorted(entries))} and no {MARKER_NAME}. A run removes "
                "and replaces files in its output, so imagegen writes only into an empty folder or one it made. "
                "Check output.url; choose a new folder, or move those files away"
            )
        foreign = []
        for kind in (IMAGES_DIR, ERRORS_DIR):
            folder = filesystem.join(root, kind)
            if kind in entries and fs.isdir(folder):
                foreign += [f"{kind}/{_base(p)}" for p in sorted(fs.find(folder)) if not PART_NAME.match(_base(p)) or _base(_parent(p)) != kind]
        if foreign:
            raise ForeignOutput(
                f"{url} holds files imagegen did not write in its {IMAGES_DIR}/ and {ERRORS_DIR}/ folders: {_listed(foreign)}. "
                "A run would remove them as parts without a commit record (and every reader of the dataset reads them): "
                "move them out of the output"
            )


def mark_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Write the marker that makes the folder at ``root`` an imagegen output (idempotent).
    Call it after :func:`check_output`, holding the output's lock."""
    path = filesystem.join(root, MARKER_NAME)
    if not fs.exists(path):
        filesystem.atomic_write(fs, path, json.dumps({"imagegen_output": 1}).encode())


def is_card(text: str) -> bool:
    """Whether ``text`` is a dataset card imagegen wrote (with its marker line, or a card
    from before the marker: its front matter tags it ``imagegen``)."""
    return CARD_MARKER in text or (text.startswith("---\n") and "\n- imagegen\n" in text.split("\n---\n", 1)[0])


def card_name(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Where the dataset card goes: ``README.md`` unless a README imagegen did not write
    is there, which is left as it is (the card then goes to :data:`FALLBACK_CARD_NAME`)."""
    path = filesystem.join(root, CARD_NAME)
    if not fs.exists(path):
        return CARD_NAME
    return CARD_NAME if is_card(filesystem.read_bytes(fs, path).decode("utf-8", "replace")) else FALLBACK_CARD_NAME


def card_warning(fs: fsspec.AbstractFileSystem, root: str, url: str) -> list[str]:
    """The warning, if any, that the output's README is not imagegen's and stays as it is."""
    with filesystem.storage_errors(url, "read"):
        if card_name(fs, root) == CARD_NAME:
            return []
    return [f"{url}/{CARD_NAME} was not written by imagegen: it is left as it is, and the dataset card goes to {FALLBACK_CARD_NAME}"]


def _is_ours(fs: fsspec.AbstractFileSystem, root: str, entries: set[str]) -> bool:
    if MARKER_NAME in entries:
        return True
    # An output from before the marker: its run manifests or commit records say it is ours.
    return bool(entries & {RUNS_DIR, COMMITS_DIR})


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
