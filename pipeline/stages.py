"""The per-batch work of the generate and encode stages, on Arrow tables. Pure: the Ray
wiring in :mod:`pipeline.batch` (and the Serve deployment) call these.

Every function takes the stream's table and returns it with its own columns added.
Rows already carrying an error pass through untouched, and a failure here marks rows,
never raises: in Ray Data one exception would abort the whole job.
"""

from __future__ import annotations

import traceback

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.encode import encode_image, sha256_hex
from pipeline.engine import GenerationRequest, GenerationResult
from pipeline.model_cache import ModelCache

_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def _set(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    array = pa.array(values, type_)
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)


def _mark_failed(errors: dict[int, tuple[str, str]], stage: str, table: pa.Table) -> pa.Table:
    if not errors:
        return table
    columns = {name: table.column(name).to_pylist() for name in (S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE)}
    for i, (error_type, message) in errors.items():
        columns[S.ERROR_STAGE][i] = stage
        columns[S.ERROR_TYPE][i] = error_type
        columns[S.ERROR_MESSAGE][i] = message
    for name, values in columns.items():
        table = _set(table, name, values, pa.string())
    return table


_REQUEST_COLUMNS = (
    S.PROMPT,
    S.NEGATIVE_PROMPT,
    S.SEED,
    S.WIDTH,
    S.HEIGHT,
    S.STEPS,
    S.GUIDANCE_SCALE,
    S.MAX_SEQUENCE_LENGTH,
    S.LORA_DIGEST,
    S.LORA_SCALE,
    S.MODEL,
    S.ERROR_STAGE,
)


def to_generation_requests(table: pa.Table) -> tuple[list[int], list[GenerationRequest], list[str]]:
    """The rows still to generate (no error so far), their engine requests, and the name
    of the model each is for."""
    rows = table.select(list(_REQUEST_COLUMNS)).to_pylist()
    pending = [i for i, row in enumerate(rows) if row[S.ERROR_STAGE] is None]
    requests = [
        GenerationRequest(
            prompt=rows[i][S.PROMPT],
            negative_prompt=rows[i][S.NEGATIVE_PROMPT] or "",
            seed=rows[i][S.SEED],
            width=rows[i][S.WIDTH],
            height=rows[i][S.HEIGHT],
            steps=rows[i][S.STEPS],
            guidance_scale=rows[i][S.GUIDANCE_SCALE],
            max_sequence_length=rows[i][S.MAX_SEQUENCE_LENGTH],
            lora=rows[i][S.LORA_DIGEST],
            lora_scale=rows[i][S.LORA_SCALE] if rows[i][S.LORA_SCALE] is not None else 1.0,
        )
        for i in pending
    ]
    return pending, requests, [rows[i][S.MODEL] for i in pending]


def _failure(exc: Exception) -> tuple[str, str]:
    return type(exc).__name__, "".join(traceback.format_exception_only(type(exc), exc)).strip()


def generate_table(models: ModelCache, table: pa.Table, actor_id: str, node_id: str) -> pa.Table:
    """Run each row's model over a batch, one model at a time (in first-seen order, so an
    actor switches models at most once per model per batch); add pixels, timings and
    placement columns. A model that cannot be loaded fails its rows, not the batch."""
    n = table.num_rows
    pixels: list = [None] * n
    seconds: list = [None] * n
    tokens: list = [None] * n
    truncated: list = [None] * n
    errors: dict[int, tuple[str, str]] = {}
    pending, requests, names = to_generation_requests(table)
    by_model: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        by_model.setdefault(name, []).append(position)
    done: list[tuple[int, GenerationResult]] = []
    for name, positions in by_model.items():
        try:
            results = models.get(name).generate([requests[p] for p in positions])
        except Exception as exc:  # noqa: BLE001 - a load failure or engine bug fails rows, not the job
            errors.update({pending[p]: _failure(exc) for p in positions})
            continue
        done.extend((pending[p], result) for p, result in zip(positions, results))
    for i, result in done:
        seconds[i] = result.seconds
        tokens[i], truncated[i] = result.prompt_tokens, result.prompt_truncated
        if result.ok:
            pixels[i] = result.pixels.tobytes()
        else:
            errors[i] = (result.error_type or "Error", result.error_message or "")
    table = _mark_failed(errors, S.STAGE_GENERATE, table)
    for name, values, type_ in (
        (S.PIXELS, pixels, pa.binary()),
        (S.GENERATION_SECONDS, seconds, pa.float64()),
        (S.PROMPT_TOKENS, tokens, pa.int32()),
        (S.PROMPT_TRUNCATED, truncated, pa.bool_()),
        (S.ACTOR_ID, [actor_id] * n, pa.string()),
        (S.NODE_ID, [node_id] * n, pa.string()),
    ):
        table = _set(table, name, values, type_)
    return table


def encode_table(table: pa.Table, fmt: str, quality: int) -> pa.Table:
    """Encode each row's pixels; add the image struct, format and digest; drop the pixels."""
    rows = table.select([S.REQUEST_ID, S.PIXELS, S.WIDTH, S.HEIGHT]).to_pylist()
    images: list = [None] * len(rows)
    digests: list = [None] * len(rows)
    errors: dict[int, tuple[str, str]] = {}
    for i, row in enumerate(rows):
        if row[S.PIXELS] is None:
            continue
        try:
            array = np.frombuffer(row[S.PIXELS], np.uint8).reshape(row[S.HEIGHT], row[S.WIDTH], 3)
            data = encode_image(array, fmt, quality)
        except Exception as exc:  # noqa: BLE001
            errors[i] = (type(exc).__name__, str(exc))
            continue
        images[i] = {"bytes": data, "path": f"{row[S.REQUEST_ID]}.{_EXTENSIONS[fmt]}"}
        digests[i] = sha256_hex(data)
    table = _mark_failed(errors, S.STAGE_ENCODE, table)
    table = _set(table, S.IMAGE, images, S.IMAGE_TYPE)
    table = _set(table, S.IMAGE_FORMAT, [fmt if d else None for d in digests], pa.string())
    table = _set(table, S.SHA256, digests, pa.string())
    return table.drop_columns([S.PIXELS])
