"""Images in an output that no row of the current input owns.

A row's identity is its id (``input.id_column``), else its content and occurrence
(:mod:`pipeline.spec.occurrences`), or with ``input.identity: position`` its file name and
position. A row edited or removed leaves its images owned by no row; with position
identity, renaming the input file or converting it (CSV -> Parquet) gives every row a new
identity: the next run makes every image again, with new seeds, beside the old ones. :func:`unowned_images` finds the images whose
identity no current row has, so ``imagegen validate`` and ``imagegen run`` can warn before
any work and ``imagegen verify --input`` can report them; ``imagegen prune`` removes them
(:func:`prune`, with ``--dry-run`` first).

Costs one pass over the input's ids, held as 16-byte digests of their text (or, without an id column, its
row count per file: Parquet from the footers), and one over the ``id``, ``source`` and
``row_index`` columns of the committed image parts, compared as Arrow columns: nothing per
image is kept. Pure: no Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import StorageError
from pipeline.spec import duplicate_ids, schema as S
from pipeline.spec.cells import RowError, id_text
from pipeline.spec.config import InputConfig, JobSpec
from pipeline.spec.occurrences import numbered
from pipeline.output import card
from pipeline.storage import commit_protocol, filesystem, lock, ownership_marker, part_files, record_format, supersede, tables

_SHOWN = 5


@dataclass
class Unowned:
    """Images no current input row owns: how many, and how many per source file they came from."""

    images: int = 0
    by_source: Counter = field(default_factory=Counter)

    def message(self, spec: JobSpec) -> str:
        """What a user reads: how many, from where, and what to do."""
        sources = ", ".join(f"{source} ({n})" for source, n in self.by_source.most_common(_SHOWN))
        more = f" and {len(self.by_source) - _SHOWN} more" if len(self.by_source) > _SHOWN else ""
        text = f"{spec.output.url} holds {self.images} image(s) that no row of the current input owns (made from {sources}{more})."
        if spec.input.id_column:
            return text + f" Their ids are not in column {spec.input.id_column!r} of {spec.input.url}: rows removed, or ids changed."
        if spec.input.identity == "content":
            return text + (
                " A row without input.id_column is its prompt and parameter cells and its occurrence among identical rows:"
                " those rows were edited or removed. `imagegen prune SPEC --dry-run` lists them; without --dry-run it removes them."
            )
        return text + (
            " Without input.id_column a row is its file name and position: a renamed, moved or converted input file"
            " makes every row new, and a run makes all its images again with new seeds beside the old ones."
            " Set input.id_column to a column of stable ids."
        )


def ownership_warnings(spec: JobSpec) -> list[str]:
    """What ``imagegen run`` and ``validate`` warn, if anything, about images in ``spec``'s
    output that no row of its input owns. One pass over the input's ids and the output's
    images: the job runs it as a task beside the work, never on the driver before it."""
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    unowned = unowned_images(spec, fs, root)
    return [unowned.message(spec)] if unowned.images else []


def unowned_images(spec: JobSpec, fs: fsspec.AbstractFileSystem, root: str) -> Unowned:
    """The committed images of the output at ``root`` whose identity no row of ``spec``'s
    input has (see the module docstring)."""
    found = Unowned()
    manifests = commit_protocol.read_manifests(fs, root)
    parts = [p["path"] for m in manifests for p in m["parts"] if p["path"].startswith(record_format.IMAGES_DIR + "/")]
    if not parts:
        return found
    owned = _owner(spec)
    for relative in parts:
        try:
            with filesystem.storage_errors(relative, "read"), fs.open(filesystem.join(root, relative), "rb") as f:
                table = filesystem.read_parquet(f, columns=[S.ID, S.SOURCE, S.ROW_INDEX])
        except (StorageError, OSError, pa.ArrowException):
            continue  # a missing or unreadable part is verify's own finding, not an ownership one
        stray = table.filter(pa.array(~owned(table)))
        if stray.num_rows:
            found.images += stray.num_rows
            for item in pc.value_counts(stray.column(S.SOURCE)).to_pylist():
                found.by_source[item["values"]] += item["counts"]
    return found


def prune(spec: JobSpec, dry_run: bool = False) -> Unowned:
    """``imagegen prune``: the images of ``spec``'s output that no row of its input owns
    (see :func:`unowned_images`), removed unless ``dry_run``. Holds the output's lock; each
    part holding one is rewritten without it under a new commit record (the way
    superseded error rows leave, :func:`~pipeline.storage.supersede.drop_rows`), so a crash
    at any step leaves the output consistent, then the card is rewritten. Never touches a
    folder imagegen did not make (:func:`~pipeline.storage.ownership_marker.check_output`)."""
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    ownership_marker.check_output(fs, root, spec.output.url)
    if dry_run:
        return unowned_images(spec, fs, root)
    held = lock.OutputLock.acquire(fs, root, part_files.new_run_id(), spec.output.url, lease_s=spec.output.lock_lease_s)
    try:
        owned = _owner(spec)
        found = Unowned()

        def stray(images: pa.Table) -> list[bool]:
            mask = ~owned(images)
            for item in pc.value_counts(images.column(S.SOURCE).filter(pa.array(mask))).to_pylist():
                found.by_source[item["values"]] += item["counts"]
            return mask.tolist()

        with filesystem.storage_errors(spec.output.url, "write"):
            commits = commit_protocol.read_commits(fs, root)
            found.images = supersede.drop_rows(fs, root, commits.records, record_format.IMAGES_DIR, [S.ID, S.SOURCE, S.ROW_INDEX], stray).rows
            if found.images:
                card.write_card(fs, root)
        held.raise_if_lost()
        return found
    finally:
        held.release()


def _input_ids(inp: InputConfig) -> Iterator[str]:
    """Every current input row's id text: its id column's value, or (content identity)
    the validator's ``<content digest>#<occurrence>``."""
    if not inp.id_column:
        for chunk in numbered(tables.read_input(inp), inp):
            yield from pc.binary_join_element_wise(chunk.column(S.INPUT_CONTENT), pc.cast(chunk.column(S.INPUT_OCCURRENCE), pa.string()), "#").to_pylist()
        return
    for chunk in tables.read_input(inp):
        if inp.id_column in chunk.column_names:
            for value in chunk.column(inp.id_column).to_pylist():
                try:
                    text = id_text(value)
                except RowError:
                    continue
                if text is not None:
                    yield text


def _owner(spec: JobSpec) -> Callable[[pa.Table], np.ndarray]:
    """``owned(images)``: for each image row (``id``, ``source``, ``row_index``), whether a
    current input row has its identity. Vectorised, and compact: the input's ids are held
    as 16-byte digests of their whole text (:func:`~pipeline.spec.duplicate_ids.id_hash`),
    not as strings, and not as the skip filter's request-id keys (which read an id of 32
    hex digits as its own 16 bytes: an input id is any text)."""
    inp = spec.input
    if inp.id_column or inp.identity == "content":
        digests = [duplicate_ids.id_hash(text) for text in _input_ids(inp)]
        ids = np.unique(np.array(digests, duplicate_ids.DIGEST))

        def owned_ids(images: pa.Table) -> np.ndarray:
            wanted = np.array([duplicate_ids.id_hash(x or "") for x in images.column(S.ID).to_pylist()], ids.dtype)
            if not len(ids):
                return np.zeros(len(wanted), bool)
            return ids[np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)] == wanted

        return owned_ids
    rows = tables.rows_per_file(inp)

    def owned(images: pa.Table) -> np.ndarray:
        # An image made without an id column has the id `source#row`; one made with one does not.
        source, row = images.column(S.SOURCE), images.column(S.ROW_INDEX)
        sources = pc.unique(source)
        limit = pc.take(pa.array([rows.get(s, 0) for s in sources.to_pylist()], pa.int64()), pc.index_in(source, sources))
        named = pc.equal(images.column(S.ID), pc.binary_join_element_wise(source, pc.cast(row, pa.string()), "#"))
        return pc.fill_null(pc.and_(pc.less(row, limit), named), False).to_numpy(zero_copy_only=False)

    return owned
