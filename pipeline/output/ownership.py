"""Images in an output that no row of the current input owns.

A row's identity is its id (``input.id_column``), else its file name and position. Without
an id column, renaming the input file or converting it (CSV -> Parquet) gives every row a
new identity: the next run makes every image again, with new seeds, beside the old ones,
and the dataset doubles without any error. :func:`unowned_images` finds the images whose
identity no current row has, so ``imagegen validate`` and ``imagegen run`` can warn before
any work and ``imagegen verify --input`` can report them.

Costs one pass over the input's ids (or, without an id column, its row count per file:
Parquet from the footers) and one over the ``id``, ``source`` and ``row_index`` columns of
the committed image parts. Pure: no Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.spec import schema as S
from pipeline.spec.cells import RowError, id_text
from pipeline.spec.config import JobSpec
from pipeline.storage import filesystem, sink, tables

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
        return text + (
            " Without input.id_column a row is its file name and position: a renamed, moved or converted input file"
            " makes every row new, and a run makes all its images again with new seeds beside the old ones."
            " Set input.id_column to a column of stable ids."
        )


def unowned_images(spec: JobSpec, fs: fsspec.AbstractFileSystem, root: str) -> Unowned:
    """The committed images of the output at ``root`` whose identity no row of ``spec``'s
    input has (see the module docstring)."""
    found = Unowned()
    manifests = sink.read_manifests(fs, root)
    parts = [p["path"] for m in manifests for p in m["parts"] if p["path"].startswith(sink.IMAGES_DIR + "/")]
    if not parts:
        return found
    owns = _owner(spec)
    for relative in parts:
        try:
            with filesystem.storage_errors(relative, "read"), fs.open(filesystem.join(root, relative), "rb") as f:
                table = pq.read_table(f, columns=[S.ID, S.SOURCE, S.ROW_INDEX])
        except (StorageError, OSError, pa.ArrowException):
            continue  # a missing or unreadable part is verify's own finding, not an ownership one
        for image_id, source, row in zip(*(table.column(c).to_pylist() for c in (S.ID, S.SOURCE, S.ROW_INDEX))):
            if not owns(image_id, source, row):
                found.images += 1
                found.by_source[source] += 1
    return found


def _owner(spec: JobSpec):
    """``owns(id, source, row)``: whether a current input row has that image's identity."""
    inp = spec.input
    if inp.id_column:
        ids = set()
        for chunk in tables.read_input(inp):
            if inp.id_column in chunk.column_names:
                for value in chunk.column(inp.id_column).to_pylist():
                    try:
                        ids.add(id_text(value))
                    except RowError:
                        continue
        return lambda image_id, source, row: image_id in ids
    rows = tables.rows_per_file(inp)
    # An image made without an id column has the id `source#row`; one made with one does not.
    return lambda image_id, source, row: row < rows.get(source, 0) and image_id == f"{source}#{row}"
