"""One schema per output: the union of every committed part's columns, promoted run by run.

Pass-through columns come from the prompt table, so runs into one output can differ: a
later table adds a column, drops one, or has one all empty (an Arrow ``null`` column).
Readers that take the schema of one file then drop columns (pyarrow.dataset and pandas
take the first file's, ``datasets`` took the card's, which came from the newest part).
So each run records the **unified schema** of ``images`` and ``errors`` in its manifest
(``schemas``): the previous run's, unified with the schemas of the parts it wrote, types
promoted the way Arrow's permissive unification does (``null`` to any type, ``int32`` to
``int64``...). The dataset card's features come from it, and it is published as an empty
Parquet file per kind, ``_schema/images.parquet`` and ``_schema/errors.parquet``, that
pandas, pyarrow and Ray read it from::

    schema = pyarrow.parquet.read_schema("output/_schema/images.parquet")
    pandas.read_parquet("output/images", schema=schema)

A column that does not unify (a pass-through column that was text in one run and a
number in the next) keeps the type it had first, and a warning names it: readers given the
schema must cast that column's other parts, which ``datasets`` does for number to text but
pyarrow does not.

Pure: reads Parquet footers only.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any, Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem

log = logging.getLogger(__name__)

SCHEMA_DIR = "_schema"
KINDS = ("images", "errors")


def encode(schema: pa.Schema) -> dict[str, Any]:
    """A schema as manifest data: readable columns, and the exact Arrow schema (IPC, base64)."""
    return {
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
        "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode(),
    }


def decode(data: dict[str, Any]) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow"])))


def unify(schemas: Iterable[Optional[pa.Schema]]) -> Optional[pa.Schema]:
    """The union of ``schemas`` in first-seen column order, types promoted; a column whose
    types cannot be unified keeps its first type. None when there is none."""
    result: Optional[pa.Schema] = None
    for schema in schemas:
        if schema is None:
            continue
        if result is None:
            result = schema
            continue
        try:
            result = pa.unify_schemas([result, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            fields = {f.name: f for f in result}
            for f in schema:
                if f.name not in fields:
                    fields[f.name] = f
                elif fields[f.name].type != f.type:
                    try:
                        fields[f.name] = pa.unify_schemas([pa.schema([fields[f.name]]), pa.schema([f])], promote_options="permissive").field(0)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                        log.warning("column %r is %s in one part and %s in another; the unified schema keeps %s", f.name, fields[f.name].type, f.type, fields[f.name].type)
            result = pa.schema(list(fields.values()), metadata=result.metadata)
    if result is not None and result.metadata is None:
        result = result.with_metadata({})
    return result


def _footer_schema(fs: fsspec.AbstractFileSystem, root: str, relative: str) -> Optional[pa.Schema]:
    """A part's schema from its footer; None for a part a manifest lists that is gone (a
    recovery removed it): the schema is of what readers find."""
    path = filesystem.join(root, relative)
    with filesystem.storage_errors(relative, "read"):
        try:
            with fs.open(path, "rb") as f:
                return pq.read_schema(f)
        except FileNotFoundError:
            return None


def promote(fs: fsspec.AbstractFileSystem, root: str, manifests: list[dict[str, Any]], new_parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The unified schemas (manifest data, by kind) after a run that wrote ``new_parts``
    into an output whose committed runs are ``manifests`` (oldest first). Reads the
    footers of the new parts, and of the parts of runs that recorded no schema (outputs
    written before this existed), once."""
    recorded = next((i for i in range(len(manifests) - 1, -1, -1) if manifests[i].get("schemas")), None)
    start = decode_all(manifests[recorded]["schemas"]) if recorded is not None else {}
    unrecorded = [p for m in manifests[(recorded + 1 if recorded is not None else 0) :] for p in m.get("parts", [])]
    out = {}
    for kind in KINDS:
        parts = [p["path"] for p in (*unrecorded, *new_parts) if p["path"].startswith(kind + "/")]
        unified = unify([start.get(kind), *(_footer_schema(fs, root, path) for path in parts)])
        if unified is not None:
            out[kind] = encode(unified)
    return out


def decode_all(schemas: dict[str, Any]) -> dict[str, pa.Schema]:
    return {kind: decode(data) for kind, data in (schemas or {}).items()}


def latest(manifests: list[dict[str, Any]]) -> dict[str, pa.Schema]:
    """The unified schemas the newest run recorded, by kind ({} before any did)."""
    for manifest in reversed(manifests):
        if manifest.get("schemas"):
            return decode_all(manifest["schemas"])
    return {}


def publish(fs: fsspec.AbstractFileSystem, root: str, schemas: dict[str, pa.Schema]) -> None:
    """Write each unified schema as an empty Parquet file under ``_schema/`` for readers
    (see the module docstring)."""
    for kind, schema in schemas.items():
        buffer = io.BytesIO()
        pq.write_table(schema.empty_table(), buffer)
        filesystem.atomic_write(fs, filesystem.join(root, SCHEMA_DIR, f"{kind}.parquet"), buffer.getvalue())

