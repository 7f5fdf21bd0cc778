"""The job's id registry: one actor that every read task asks which of its rows repeat an
earlier row's id (``input.id_column``). What it holds and how it answers is the pure
:class:`~pipeline.spec.duplicate_ids.SeenIds`; this module is its Ray actor and where it lives."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import numpy as np
import ray

from pipeline.batch.connect import on_driver_node
from pipeline.spec.duplicate_ids import SeenIds
from pipeline.spec.occurrences import Occurrences


class IdRegistry:
    """The ids the job has seen, and the first row of each (see :mod:`pipeline.spec.duplicate_ids`).

    Units register in unit order (``seq``), whatever order their tasks run in: a task
    waits until every earlier unit has registered its last batch, so "the first row with
    an id" is the first in table order. A unit registers in batches (a big text file is
    read as a stream), ``last`` on its final one. A retried task registers its unit again
    and gets the same answers. An asyncio actor: waiting registrations do not hold its thread.
    """

    def __init__(self) -> None:
        self._seen = SeenIds()
        self._occurrences = Occurrences()
        self._answers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._next = 0
        self._turn: Optional[asyncio.Condition] = None

    async def register(self, seq: int, ids: tuple, last: bool = True) -> dict[str, str]:
        return await self._in_turn(seq, last, lambda: self._seen.register(*ids))

    async def number(self, seq: int, batch: int, keys: np.ndarray, last: bool = True) -> np.ndarray:
        """Content identity: each row's occurrence among rows of the same content key, in
        table order (:class:`~pipeline.spec.occurrences.Occurrences`), for batch ``batch``
        of unit ``seq``. A retried read task gets the same answers: each answer is kept,
        sparse (only rows that repeat a content: nothing for a table of distinct rows)."""

        def answer() -> np.ndarray:
            if (seq, batch) in self._answers:
                at, value = self._answers[(seq, batch)]
                numbers = np.zeros(len(keys), np.int64)
                numbers[at] = value
                return numbers
            numbers = self._occurrences.number(keys)
            at = np.flatnonzero(numbers)
            self._answers[(seq, batch)] = (at.astype(np.int32), numbers[at])
            return numbers

        return await self._in_turn(seq, last, answer)

    def absent(self, ids: list[str]) -> list[bool]:
        """Once every unit is numbered: which content ids no row of the table has (see
        :meth:`~pipeline.spec.occurrences.Occurrences.present`)."""
        return [not here for here in self._occurrences.present(ids)]

    async def _in_turn(self, seq: int, last: bool, answer: Any) -> Any:
        if self._turn is None:
            self._turn = asyncio.Condition()
        async with self._turn:
            await self._turn.wait_for(lambda: seq <= self._next)
            result = answer()
            if last and seq == self._next:
                self._next += 1
                self._turn.notify_all()
        return result


def start_registry() -> Any:
    """The job's id registry actor (no CPU reserved: it answers a call per batch of a read
    unit), on the driver's node: the ids seen so far must not be lost with a worker."""
    return ray.remote(num_cpus=0, max_concurrency=1000)(IdRegistry).options(scheduling_strategy=on_driver_node()).remote()
