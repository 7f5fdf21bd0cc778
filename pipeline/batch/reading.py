"""The read side of the batch job: one Ray task per read unit turns raw rows into
validated request blocks, sorted for the engine and cut to the engine actors' block size.

A read task (:func:`read_blocks`) is a streaming generator: it yields each block as soon
as it is cut, and Ray pauses it once :data:`READ_AHEAD_BLOCKS` of its blocks wait
unconsumed, so a fast read never piles validated rows up ahead of slow engines (the
driver takes blocks only as actors free up, see :mod:`pipeline.batch.dispatch`).

Validation runs in the read task, so bad rows never reach a GPU; each chunk of a file
(:data:`~pipeline.storage.tables.CHUNK_ROWS` rows) is sorted by model, adapter and bucket
(:func:`~pipeline.spec.bucketing.order_for_engine`) before it is cut into blocks. Blocks never
span read units, so the blocks, and so the diffusers calls, do not depend on how many
units run at once.

Duplicate ids: with ``input.id_column`` set, each task registers its unit's id hashes
with one :class:`~pipeline.batch.id_registry.IdRegistry` actor, in unit order (a batch of rows at a time), and learns
which of its rows repeat an earlier row's id (:mod:`pipeline.spec.duplicate_ids`); the driver
never reads the table. Content identity (no id column, ``input.identity: content``) asks
the same actor, in the same unit order, for each row's occurrence among identical rows
(:mod:`pipeline.spec.occurrences`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray

from pipeline.batch import progress
from pipeline.spec.bucketing import order_for_engine
from pipeline.spec.config import JobSpec
from pipeline.spec.occurrences import identified_batches
from pipeline.spec.validate import Validator
from pipeline.storage.tables import concat_rows
from pipeline.storage.units import ReadUnit, read_unit

log = logging.getLogger(__name__)

# Blocks a read task may yield ahead of the driver taking them (Ray's generator backpressure).
READ_AHEAD_BLOCKS = 4


def cut(chunks: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one fewer) from consecutive ``chunks``."""
    carry: list[pa.Table] = []
    held = 0
    for chunk in chunks:
        carry.append(chunk)
        held += chunk.num_rows
        while held >= rows:
            table = concat_rows(carry).combine_chunks()
            yield table.slice(0, rows)
            rest = table.slice(rows)
            carry, held = [rest], rest.num_rows
    if held:
        yield concat_rows(carry).combine_chunks()


def validated_blocks(spec: JobSpec, unit: ReadUnit, validator: Validator, block_rows: int, registry: Any, counter: Any) -> Iterator[pa.Table]:
    """The body of a read task: ``unit``'s rows validated, sorted per chunk and cut into
    blocks of ``block_rows`` requests (rows skipped as already committed are reported to
    ``counter``, which may be None). The unit is read as a stream (a text file of any
    size in bounded memory); its ids are registered a batch at a time (:func:`id_batches`)."""

    def register(ids: tuple, last: bool) -> dict[str, str]:
        return ray.get(registry.register.remote(unit.seq, ids, last))

    batches = itertools.count()

    def number(keys: np.ndarray, last: bool) -> np.ndarray:
        return ray.get(registry.number.remote(unit.seq, next(batches), keys, last))

    def requests() -> Iterator[pa.Table]:
        for chunks, repeats in identified_batches(read_unit(spec.input, unit), spec.input, register, number):
            checker = dataclasses.replace(validator, duplicates=repeats) if repeats else validator
            while chunks:
                chunk = chunks.pop(0)  # let each raw chunk go once validated
                table, skipped_ids = checker.validate_table_skipping(chunk)
                if counter is not None:
                    # Skipped requests adopted from an interrupted run are counted apart.
                    adopted = checker.skip.adopted(skipped_ids) if checker.skip is not None and len(skipped_ids) else 0
                    counter.add.remote(skipped=progress.skipped(chunk, table), adopted=adopted)
                if table.num_rows:
                    yield order_for_engine(table)

    yield from cut(requests(), block_rows)
    if counter is not None:
        # Calls from one caller run in order: once this answers, the counter holds every
        # skip this task reported, before the driver sees the task end (a rerun that skips
        # everything ends right after its reads, and its last progress line must count them).
        ray.get(counter.snapshot.remote())


@ray.remote
def read_blocks(spec: JobSpec, unit: ReadUnit, validator: Validator, block_rows: int, registry: Any, counter: Any) -> Iterator[pa.Table]:
    """A read task: :func:`validated_blocks` as a Ray streaming generator."""
    yield from validated_blocks(spec, unit, validator, block_rows, registry, counter)


def start_read(spec: JobSpec, unit: ReadUnit, validator: Any, block_rows: int, registry: Any, counter: Any):
    """Launch the read task of ``unit``; returns its stream of block refs (an
    ``ObjectRefGenerator``). ``validator`` may be an object ref, shared by every task."""
    return read_blocks.options(
        num_cpus=spec.runtime.task_cpus,
        num_returns="streaming",
        _generator_backpressure_num_objects=READ_AHEAD_BLOCKS,
    ).remote(spec, unit, validator, block_rows, registry, counter)
