"""The per-batch work of the generate and encode stages, on Arrow tables. Pure: the Ray
wiring in :mod:`pipeline.batch.run` (and the Serve deployment) call these.

Every function takes the stream's table and returns it with its own columns added.
Rows already carrying an error pass through untouched, and a failure here marks rows,
never raises: in Ray Data one exception would abort the whole job.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.engine.image_encoding import encode_image, sha256_hex
from pipeline.engine.perceptual_hash import phash64
from pipeline.engine.resident_models import ModelCache
from pipeline.engine.requests import GenerationRequest
from pipeline.spec import schema as S
from pipeline.spec.bucketing import group_by_bucket

log = logging.getLogger(__name__)

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


@dataclass
class BlockTimes:
    """Where an engine actor's time on one block went: ``engine`` seconds in diffusers
    calls (model loads included), ``encode_wait`` seconds spent after the last call
    waiting for encodings still running. Encoding overlaps the calls, so the engine sits
    idle only for the latter. ``scoring`` is the seconds the CLIP scorer ran (on the
    encoder's threads, overlapping the calls too); zero without a scorer."""

    engine: float = 0.0
    encode_wait: float = 0.0
    scoring: float = 0.0


def generate_table(
    models: ModelCache, table: pa.Table, actor_id: str, node_id: str, encoder: ImageEncoder, times: Optional[BlockTimes] = None
) -> pa.Table:
    """Generate and encode a block: the engine actor's whole job.

    Rows go to their model one model at a time (first-seen order: the block arrives sorted,
    so an actor switches models at most once per model per block), in diffusers calls of
    at most the engine's :meth:`~pipeline.engine.engine.Engine.call_size`. Each call's images are
    handed to ``encoder``'s threads as soon as the call returns, so PNG compression runs
    while the next call computes (PIL and zlib release the GIL) and raw pixels never
    travel through the object store. A model that cannot load fails its rows, not the
    block; a failed encoding fails its row at the encode stage. With a scorer, each call's
    images are scored on the same threads (:class:`ImageEncoder`); a scorer that fails
    leaves its call's scores null (and says why in the log), never the images.
    """
    n = table.num_rows
    seconds: list = [None] * n
    tokens: list = [None] * n
    truncated: list = [None] * n
    schedulers = table.column(S.SCHEDULER).to_pylist()
    nsfw: list = [None] * n
    errors: dict[int, tuple[str, str]] = {}
    encodings: dict[int, Future] = {}
    scorings: list[tuple[list[int], Future]] = []
    times = times if times is not None else BlockTimes()
    pending, requests, names = to_generation_requests(table)
    by_model: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        by_model.setdefault(name, []).append(position)
    for name, positions in by_model.items():
        started = time.perf_counter()
        try:
            engine = models.get(name)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its rows, not the job
            errors.update({pending[p]: _failure(exc) for p in positions})
            continue
        finally:
            times.engine += time.perf_counter() - started
        for call in _calls(engine, [requests[p] for p in positions]):
            chunk = [positions[c] for c in call]
            started = time.perf_counter()
            try:
                results = engine.generate([requests[p] for p in chunk])
            except Exception as exc:  # noqa: BLE001 - an engine bug still fails rows, not the job
                errors.update({pending[p]: _failure(exc) for p in chunk})
                continue
            finally:
                times.engine += time.perf_counter() - started
            made = []
            for p, result in zip(chunk, results):
                i = pending[p]
                seconds[i] = result.seconds
                tokens[i], truncated[i], nsfw[i] = result.prompt_tokens, result.prompt_truncated, result.nsfw_detected
                schedulers[i] = engine.scheduler_name
                wrong_size = _size_mismatch(requests[p], result.pixels) if result.ok else None
                if wrong_size:
                    errors[i] = ("SizeMismatch", wrong_size)
                elif result.ok:
                    encodings[i] = encoder.submit(result.pixels)
                    made.append((i, result.pixels, requests[p].prompt))
                else:
                    errors[i] = (result.error_type or "Error", result.error_message or "")
            if made and encoder.scorer is not None:
                scorings.append(([i for i, _, _ in made], encoder.score([px for _, px, _ in made], [pr for _, _, pr in made])))
    table = _mark_failed(errors, S.STAGE_GENERATE, table)
    started = time.perf_counter()
    table = _add_images(table, encodings, encoder.format)
    table = _add_scores(table, scorings, encoder.scorer.fingerprint if encoder.scorer else None, times)
    times.encode_wait += time.perf_counter() - started
    for column, values, type_ in (
        (S.GENERATION_SECONDS, seconds, pa.float64()),
        (S.PROMPT_TOKENS, tokens, pa.int32()),
        (S.PROMPT_TRUNCATED, truncated, pa.bool_()),
        (S.SCHEDULER, schedulers, pa.string()),
        (S.NSFW_DETECTED, nsfw, pa.bool_()),
        (S.ACTOR_ID, [actor_id] * n, pa.string()),
        (S.NODE_ID, [node_id] * n, pa.string()),
    ):
        table = _set(table, column, values, type_)
    return table


def _size_mismatch(request: GenerationRequest, pixels: np.ndarray) -> Optional[str]:
    """Why an image does not have the size its row records, or None. Validation holds
    each family to its size multiple; this catches any model that still resizes (FLUX
    rounds a size off its multiple down with only a warning)."""
    height, width = pixels.shape[:2]
    if (width, height) == (request.width, request.height):
        return None
    return (
        f"the model made a {width}x{height} image for a {request.width}x{request.height} request; "
        "the image was not stored. Use a width and height the model takes as they are"
    )


def _calls(engine, requests: list[GenerationRequest]) -> list[list[int]]:
    """Indices of ``requests`` in the diffusers calls the engine will make of them."""
    calls = []
    for group in group_by_bucket(requests):
        size = engine.call_size(requests[group[0]])
        calls.extend(group[start : start + size] for start in range(0, len(group), size))
    return calls


class ImageEncoder:
    """Encodes images on a small thread pool: ``submit(pixels)`` returns a future of
    ``(bytes, sha256, phash)``. One per engine actor (or Serve replica), for its lifetime.

    With a ``scorer`` (:class:`pipeline.engine.clip_scorer.ClipScorer`), ``score(images,
    prompts)`` returns a future of the call's :class:`~pipeline.engine.clip_scorer.Scores`,
    computed on the same threads: like encoding, it runs while the next diffusers call
    does, and the block waits for it only at its end."""

    def __init__(self, fmt: str, quality: int, threads: int = 2, scorer=None):
        self.format = fmt
        self.quality = quality
        self.scorer = scorer
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")

    def submit(self, pixels: np.ndarray) -> Future:
        return self._pool.submit(self._encode, pixels)

    def score(self, images: list[np.ndarray], prompts: list[str]) -> Future:
        return self._pool.submit(self.scorer.score, images, prompts)

    def _encode(self, pixels: np.ndarray) -> tuple[bytes, str, int]:
        data = encode_image(pixels, self.format, self.quality)
        return data, sha256_hex(data), phash64(pixels)


def _add_images(table: pa.Table, encodings: dict[int, Future], fmt: str) -> pa.Table:
    """Wait for the block's encodings; add the image struct, format and digest columns."""
    images: list = [None] * table.num_rows
    digests: list = [None] * table.num_rows
    hashes: list = [None] * table.num_rows
    errors: dict[int, tuple[str, str]] = {}
    request_ids = table.column(S.REQUEST_ID).to_pylist()
    for i, future in encodings.items():
        try:
            data, digests[i], hashes[i] = future.result()
        except Exception as exc:  # noqa: BLE001
            errors[i] = (type(exc).__name__, str(exc))
            continue
        images[i] = {"bytes": data, "path": f"{request_ids[i]}.{_EXTENSIONS[fmt]}"}
    table = _mark_failed(errors, S.STAGE_ENCODE, table)
    table = _set(table, S.IMAGE, images, S.IMAGE_TYPE)
    table = _set(table, S.IMAGE_FORMAT, [fmt if d else None for d in digests], pa.string())
    table = _set(table, S.PHASH, hashes, pa.uint64())
    return _set(table, S.SHA256, digests, pa.string())


def _add_scores(table: pa.Table, scorings: list[tuple[list[int], Future]], fingerprint: Optional[str], times: BlockTimes) -> pa.Table:
    """Wait for the block's scores; add the CLIP columns (null where not scored)."""
    n = table.num_rows
    scores: list = [None] * n
    cut: list = [None] * n
    scorer: list = [None] * n
    for rows, future in scorings:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - a scorer failure leaves scores null, never loses the images
            log.warning("the CLIP scorer failed on a call of %d images (%s: %s); their clip_score stays null", len(rows), type(exc).__name__, exc)
            continue
        times.scoring += result.seconds
        for i, value, truncated in zip(rows, result.clip_scores, result.prompt_truncated):
            scores[i], cut[i], scorer[i] = value, truncated, fingerprint
    table = _set(table, S.CLIP_SCORE, scores, pa.float64())
    table = _set(table, S.CLIP_PROMPT_TRUNCATED, cut, pa.bool_())
    return _set(table, S.CLIP_SCORER, scorer, pa.string())
