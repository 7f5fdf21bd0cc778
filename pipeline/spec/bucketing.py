"""Bucketing: which requests can share one diffusers call.

A diffusers call takes one size, step count and guidance scale for the whole batch, so
a batch of mixed rows is split into uniform groups. Groups keep first-seen order, so the
same batch always splits the same way (and, on CPU, produces the same pixels).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, Optional, Sequence, Union

# The parameters one diffusers call shares. The model and scheduler are fixed per engine;
# one adapter setting (LoRA and its scale) holds for a whole call.
BUCKET_FIELDS = ("width", "height", "steps", "guidance_scale", "max_sequence_length", "lora", "lora_scale")

bucket_key = operator.attrgetter(*BUCKET_FIELDS)


# Automatic block size (runtime.batch_size: auto): blocks per actor aimed at, and the bounds
# (the lower one only while every actor still gets a block).
BLOCKS_PER_ACTOR = 8
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 64, 256
UNKNOWN_TOTAL_BLOCK_ROWS = 128


def block_rows(setting: Union[int, Literal["auto"]], total_rows: Optional[int], num_actors: int, rows_per_call: Optional[int] = None) -> int:
    """Rows per engine-actor block (one Ray Data block, one or more diffusers calls).

    An explicit ``setting`` is kept. ``auto`` aims at :data:`BLOCKS_PER_ACTOR` blocks per
    actor, so that the last wave of blocks, when actors run out of work one by one, is
    short beside the run; within :data:`MIN_BLOCK_ROWS`..:data:`MAX_BLOCK_ROWS`: below,
    Ray's fixed cost per block (scheduling, object transfer, a progress report) weighs on
    every image, and the job's blocks per second meet the driver's ceiling (about 10-15
    on a 2-core head, BENCHMARKS.md); above, a block is minutes of GPU work that a crash
    would redo. A table too small to give every actor :data:`MIN_BLOCK_ROWS` rows is cut
    into one block per actor. With
    ``rows_per_call`` (the rows that fill one diffusers call at the spec's default size),
    a block is a whole number of calls, at least one: a block of 98 rows in calls of 16 is
    6 full calls and one of 2, which costs a GPU nearly a full call's time. Without a row
    count (large text tables are not counted before a run), 128.
    """
    if setting != "auto":
        return setting
    if total_rows is None:
        rows = UNKNOWN_TOTAL_BLOCK_ROWS
    else:
        low = min(MIN_BLOCK_ROWS, math.ceil(total_rows / num_actors))
        rows = min(MAX_BLOCK_ROWS, max(low, math.ceil(total_rows / (num_actors * BLOCKS_PER_ACTOR))))
    if rows_per_call:
        rows = max(1, round(rows / rows_per_call)) * rows_per_call
    return rows


def group_by_bucket(requests: Sequence[Any]) -> list[list[int]]:
    """Indices of ``requests`` grouped by :data:`BUCKET_FIELDS`, groups and members in
    first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(bucket_key(request), []).append(index)
    return list(groups.values())


def halves(group: list[int]) -> tuple[list[int], list[int]]:
    """Split a group in two, for retrying a failed call on less (OOM, or one bad row)."""
    middle = (len(group) + 1) // 2
    return group[:middle], group[middle:]


# The stream's columns that decide which engine call a row can share, most expensive to
# switch first: the model (a load when the actor's cache lacks it), then the adapter
# (a set_adapters call), then the call's shape.
ENGINE_ORDER = (
    "model",
    "lora_digest",
    "lora_scale",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "max_sequence_length",
)


def order_for_engine(table):
    """``table`` (an Arrow table of validated requests) sorted by :data:`ENGINE_ORDER`, stably.

    Applied to each validated block before rows are cut into actor batches, so a batch
    mostly holds one model and one bucket: fewer model swaps in the actors' caches and
    fuller diffusers calls. Stable, so rows of one bucket keep their input order and a
    rerun cuts the same batches.
    """
    import pyarrow.compute as pc

    keys = [(name, "ascending", "at_start") for name in ENGINE_ORDER if name in table.column_names]
    if table.num_rows < 2 or not keys:
        return table
    return table.take(pc.sort_indices(table, sort_keys=keys))
