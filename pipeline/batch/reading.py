"""The read side of the batch job: one Ray task per read unit turns raw rows into
validated request blocks, sorted for the engine and cut to the engine actors' block size.

A read task (:func:`read_blocks`) is a streaming generator: it yields each block as soon
as it is cut, and Ray pauses it once :data:`READ_AHEAD_BLOCKS` of its blocks wait
unconsumed, so a fast read never piles validated rows up ahead of slow engines (the
driver takes blocks only as actors free up, see :mod:`pipeline.batch.dispatch`).

Validation runs in the read task, so bad rows never reach a GPU; each chunk of a file
(:data:`~pipeline.storage.tables.CHUNK_ROWS` rows) is sorted by model, adapter and bucket
(:func:`~pipeline.spec.batching.order_for_engine`) before it is cut into blocks. Blocks never
span read units, so the blocks, and so the diffusers calls, do not depend on how many
units run at once.

Duplicate ids: with ``input.id_column`` set, each task registers its unit's id hashes
with one :class:`IdRegistry` actor, in unit order (a batch of rows at a time), and learns
which of its rows repeat an earlier row's id (:mod:`pipeline.spec.seen_ids`); the driver
never reads the table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Iterator, Optional

import pyarrow as pa
import ray

from pipeline.batch import progress
from pipeline.batch.connect import on_driver_node
from pipeline.spec.batching import order_for_engine
from pipeline.spec.config import JobSpec
from pipeline.spec.seen_ids import SeenIds, id_batches
from pipeline.spec.validate import Validator
from pipeline.storage.units import ReadUnit, read_unit

log = logging.getLogger(__name__)

# Blocks a read task may yield ahead of the driver taking them (Ray's generator backpressure).
READ_AHEAD_BLOCKS = 4


class IdRegistry:
    """The ids the job has seen, and the first row of each (see :mod:`pipeline.spec.seen_ids`).

    Units register in unit order (``seq``), whatever order their tasks run in: a task
    waits until every earlier unit has registered its last batch, so "the first row with
    an id" is the first in table order. A unit registers in batches (a big text file is
    read as a stream), ``last`` on its final one. A retried task registers its unit again
    and gets the same answers. An asyncio actor: waiting registrations do not hold its thread.
    """

    def __init__(self) -> None:
        self._seen = SeenIds()
        self._next = 0
        self._turn: Optional[asyncio.Condition] = None

    async def register(self, seq: int, ids: tuple, last: bool = True) -> dict[str, str]:
        if self._turn is None:
            self._turn = asyncio.Condition()
        async with self._turn:
            await self._turn.wait_for(lambda: seq <= self._next)
            repeats = self._seen.register(*ids)
            if last and seq == self._next:
                self._next += 1
                self._turn.notify_all()
        return repeats


def start_registry() -> Any:
    """The job's id registry actor (no CPU reserved: it answers a call per batch of a read
    unit), on the driver's node: the ids seen so far must not be lost with a worker."""
    return ray.remote(num_cpus=0, max_concurrency=1000)(IdRegistry).options(scheduling_strategy=on_driver_node()).remote()


def cut(chunks: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one fewer) from consecutive ``chunks``."""
    carry: list[pa.Table] = []
    held = 0
    for chunk in chunks:
        carry.append(chunk)
        held += chunk.num_rows
        while held >= rows:
            table = pa.concat_tables(carry, promote_options="permissive").combine_chunks()
            yield table.slice(0, rows)
            rest = table.slice(rows)
            carry, held = [rest], rest.num_rows
    if held:
        yield pa.concat_tables(carry, promote_options="permissive").combine_chunks()


def validated_blocks(spec: JobSpec, unit: ReadUnit, validator: Validator, block_rows: int, registry: Any, counter: Any) -> Iterator[pa.Table]:
    """The body of a read task: ``unit``'s rows validated, sorted per chunk and cut into
    blocks of ``block_rows`` requests (rows skipped as already committed are reported to
    ``counter``, which may be None). The unit is read as a stream (a text file of any
    size in bounded memory); its ids are registered a batch at a time (:func:`id_batches`)."""

    def register(ids: tuple, last: bool) -> dict[str, str]:
        return ray.get(registry.register.remote(unit.seq, ids, last))

    def requests() -> Iterator[pa.Table]:
        id_column = spec.input.id_column if registry is not None else None
        for chunks, repeats in id_batches(read_unit(spec.input, unit), id_column, register):
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
