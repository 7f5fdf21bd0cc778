"""The driver's loop: read units -> validated blocks -> engine actors -> parts, bounded.

The driver holds object refs, never rows: the read tasks' streams of validated blocks
(:mod:`pipeline.batch.reading`), a short queue of blocks waiting for an actor, the calls in
flight, the generated blocks not yet in a part, and the part writes in flight. Each is
bounded by the number of actors or by ``output.rows_per_part``, never by the table:

- read tasks start in table order, at most :data:`MAX_READS` at once, and only while
  fewer than ``lookahead`` blocks wait for an actor; each read task pauses itself once a
  few of its blocks wait (Ray's generator backpressure). So validated rows wait in the
  object store a few blocks per actor ahead of the engines, whatever the table's size;
- each actor has at most ``depth`` calls queued (one running, one ready to start the
  moment it ends), the next going to the least loaded actor;
- generated blocks are cut into parts of exactly ``rows_per_part`` rows (the last part
  fewer) and each part is written by a task as soon as its rows exist.

The engine actors live for the whole job: the read of the next unit overlaps the last
blocks of the one before, so actors never wait at a unit's boundary.

Faults, each read once by :func:`~pipeline.batch.ray_faults.read_fault` and handled as
itself:

- a lost actor (process killed, node lost): its calls go back to the front of the queue
  for other actors, and the actor is used again once Ray has restarted it (a ``ready``
  call answers), however often it is lost; only an actor whose constructor raised leaves
  the pool;
- a hung call: each call has a deadline (:class:`~pipeline.batch.call_deadline.CallDeadline`: a multiple of the slowest
  recent call, never under a floor that covers a model load); past it, the actor's
  calls go to other actors and the actor is killed for Ray to restart;
- a lost object: a part whose generated block was lost with a node has that block, and
  only that one, made again from its validated block;
- a lost writer (its process or node went, Ray's own retries spent): the part is written
  again from the same generated blocks, never generated again;
- the job's own error (a file that cannot be read, an output that cannot be written,
  a validated block Ray cannot read again) stops the job with that error.

A block in flight through :data:`MAX_RETRIES` lost or hung calls, or a part lost as often,
stops the job: the cause is then the block (a prompt that crashes or hangs the engine)
or a cluster losing nodes faster than the job can write.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import ray
from ray.exceptions import RayError, RayTaskError

from pipeline.batch.call_deadline import CallDeadline
from pipeline.batch.ray_faults import Fault, RayFault, read_fault, unwrap
from pipeline.errors import ClusterError
from pipeline.storage.units import ReadUnit

log = logging.getLogger(__name__)

MAX_READS = 2  # read tasks at once: the next unit's read overlaps the tail of the last one
DEPTH = 2  # calls queued per actor
POLL_S = 1.0
REPING_S = 1.0  # how often a restarting actor is asked whether it is back
MAX_RETRIES = 3  # lost or hung calls of one block, or lost writes of one part, before the job gives up


@dataclass(eq=False)
class Block:
    """One validated block on its way through: ``source`` (validated requests), ``out``
    (generated, once made) and its row count."""

    source: Any
    out: Any = None
    rows: int = 0
    placed: bool = False  # already cut into parts
    remaking: bool = False
    losses: int = 0  # its calls lost with their actor or past their deadline


@dataclass(eq=False)
class Part:
    """Rows ``start:stop`` of each of its blocks, in order."""

    slices: list[tuple[Block, int, int]]
    retries: int = 0

    @property
    def blocks(self) -> list[Block]:
        return [b for b, _, _ in self.slices]


@dataclass
class FaultCounts:
    """What the feed recovered from in a run (all zero in a run without faults)."""

    calls_lost: int = 0  # calls lost with their actor (process or node), sent to another actor
    calls_overdue: int = 0  # calls past their deadline: sent to another actor, their actor restarted
    blocks_remade: int = 0  # generated blocks lost with a node, made again
    parts_rewritten: int = 0  # part writes run again after their writer was lost


def result(refs: Any) -> Any:
    """``ray.get(refs)``, raising what the task itself raised (see :func:`unwrap`)."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        raise unwrap(exc) from None


@dataclass
class Dispatcher:
    """Runs the loop. ``start_read(unit)`` launches a read task (a stream of block refs);
    ``write(slices)`` launches a part's write task over ``[(generated ref, start, stop)]``
    and returns its ref; ``actors`` are engine actors with ``generate`` and ``ready``,
    restartable by Ray; ``written(result)`` hears each part write's result as it comes;
    ``deadline`` bounds each engine call (None: calls are never given up). ``faults``
    counts what was recovered from."""

    units: Iterable[ReadUnit]
    start_read: Callable[[ReadUnit], Any]
    actors: list[Any]
    write: Callable[[list[tuple[Any, int, int]]], Any]
    rows_per_part: int
    lookahead: int
    depth: int = DEPTH
    written: Callable[[Any], None] = lambda result: None
    deadline: Optional[CallDeadline] = None
    results: list[Any] = field(default_factory=list)
    faults: FaultCounts = field(default_factory=FaultCounts)

    def run(self) -> list[Any]:
        """Feed every unit through; returns the write tasks' results (one per part)."""
        pending_units = deque(self.units)
        reads: list[Any] = []
        n = len(self.actors)
        self._ready: deque[Block] = deque()
        self._calls: dict[Any, tuple[int, Block, Any]] = {}
        self._load = [0] * n
        self._up = [True] * n
        self._alive = set(range(n))
        # Per actor: its calls in the order they run (the first is running), since when the
        # first has run (None until the actor has answered ready), whether it has answered.
        self._order: list[deque[Any]] = [deque() for _ in range(n)]
        self._since: list[Optional[float]] = [None] * n
        self._answered = [False] * n
        self._pings: dict[Any, int] = {}  # ready call -> actor, for actors starting or restarting
        self._repings: dict[int, float] = {}  # actor -> when to ask it again (monotonic seconds)
        self._asking: set[int] = set()  # actors with a ready call pending or due
        self._queue: deque[Block] = deque()  # generated, not yet all in parts
        self._offset = 0  # rows of _queue[0] already in a part
        self._queued = 0  # rows in _queue not yet in a part
        self._waiting: list[Part] = []  # parts whose blocks are being made (again)
        self._writes: dict[Any, Part] = {}
        for i in range(n):  # first in each actor's queue: answers once its constructor ran
            self._ping(i)
        next_check = time.monotonic() + POLL_S
        while True:
            while pending_units and len(reads) < MAX_READS and len(self._ready) < self.lookahead:
                reads.append(self.start_read(pending_units.popleft()))
            now = time.monotonic()
            for i, due in list(self._repings.items()):
                if due <= now:
                    del self._repings[i]
                    self._ping(i)
            if self.deadline is not None and now >= next_check:
                next_check = now + POLL_S
                self._give_up_overdue(now)
            self._dispatch()
            generating = pending_units or reads or self._ready or self._calls
            if not generating:
                self._cut(final=True)
                if not self._writes and not self._waiting:
                    return self.results
            waitables = [*self._calls, *self._writes, *self._pings]
            if len(self._ready) < self.lookahead:
                waitables += reads
            if not waitables and not self._repings:
                raise ClusterError("no engine actor is running and none is restarting; the job cannot go on")
            done = []
            if waitables:
                done, _ = ray.wait(waitables, num_returns=1, timeout=POLL_S, fetch_local=False)
            else:  # only actors to ask again later
                time.sleep(REPING_S)  # a polling period while every actor restarts, not synchronisation
            if done:
                done, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0, fetch_local=False)
            for ref in done:
                if ref in self._calls:
                    self._called(ref)
                elif ref in self._writes:
                    self._written(ref)
                elif ref in self._pings:
                    self._pinged(ref)
                elif ref in reads:
                    try:
                        self._ready.append(Block(next(ref)))
                    except StopIteration:
                        reads.remove(ref)

    # -- engine calls ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._ready:
            free = [i for i in self._alive if self._up[i] and self._load[i] < self.depth]
            if not free:
                return
            i = min(free, key=self._load.__getitem__)
            block = self._ready.popleft()
            out, rows = self.actors[i].generate.options(num_returns=2).remote(block.source)
            self._calls[rows] = (i, block, out)
            self._load[i] += 1
            self._order[i].append(rows)
            if len(self._order[i]) == 1 and self._answered[i]:
                self._since[i] = time.monotonic()

    def _ended(self, i: int, ref: Any) -> Optional[float]:
        """Takes a call off actor ``i``'s order; the seconds it ran, when known."""
        self._load[i] -= 1
        order, now = self._order[i], time.monotonic()
        if order and order[0] == ref:
            order.popleft()
            ran = now - self._since[i] if self._since[i] is not None else None
            self._since[i] = now if order and self._answered[i] else None
            return ran
        order.remove(ref)  # a call that failed with its actor, behind the one running
        return None

    def _called(self, ref: Any) -> None:
        i, block, out = self._calls.pop(ref)
        ran = self._ended(i, ref)
        try:
            block.rows = ray.get(ref)
        except RayError as exc:
            fault = read_fault(exc)
            if fault.kind is Fault.JOB_ERROR:
                # A call whose input (a read task) failed, also when the read failed on a
                # dead actor: sending its block to another actor would fail it again, forever.
                raise fault.error from None
            if fault.kind is Fault.LOST_OBJECT:
                raise ClusterError(
                    f"a validated block was lost with a node and Ray could not read it again ({type(exc).__name__}); "
                    "run the same command again: it keeps what this run committed and makes the rest"
                ) from None
            self._lost(i, fault)
            if fault.kind is Fault.ACTOR_FAILED:  # not the block's doing
                self._ready.appendleft(block)
                return
            log.warning("engine actor %d was lost (%s); its block goes to another actor", i, type(exc).__name__)
            self.faults.calls_lost += 1
            self._again(block)
            return
        self._answered[i] = True
        if ran is not None and self.deadline is not None:
            self.deadline.record(ran, block.rows)
        block.out, block.remaking = out, False
        if not block.placed:
            block.placed = True
            self._queue.append(block)
            self._queued += block.rows
            self._cut(final=False)
        else:
            waiting, self._waiting = self._waiting, []
            for part in waiting:
                self._launch(part)

    def _again(self, block: Block) -> None:
        """``block`` goes back to the front of the queue, for another actor."""
        block.losses += 1
        if block.losses > MAX_RETRIES:
            raise ClusterError(
                f"a block's call was lost or hung on {block.losses} engine actors in turn; one of its prompts may crash "
                "or hang the engine (see the actors' logs), or the cluster is losing nodes faster than the job can run"
            )
        self._ready.appendleft(block)

    def _give_up_overdue(self, now: float) -> None:
        """Actors whose running call is past its deadline: their calls go to other actors
        and Ray restarts them (``ray.kill`` with ``no_restart=False``)."""
        limit = self.deadline.seconds
        for i, since in enumerate(self._since):
            if since is None or now - since <= limit:
                continue
            log.warning(
                "engine actor %d's call has run %.0f s, past its deadline of %.0f s (runtime.call_deadline_*); "
                "its blocks go to other actors and the actor is restarted", i, now - since, limit,
            )
            self.faults.calls_overdue += 1
            order = self._order[i]
            while order:  # from the last, so that the blocks keep their order at the front
                self._again(self._calls.pop(order.pop())[1])
            self._load[i], self._since[i] = 0, None
            ray.kill(self.actors[i], no_restart=False)
            self._lost(i, RayFault(Fault.LOST_ACTOR, TimeoutError("past its deadline")))

    def _lost(self, i: int, fault: RayFault) -> None:
        """Actor ``i`` was lost: asked until it answers, unless it can never come back."""
        self._answered[i], self._since[i] = False, None  # its other calls fail too: none is running
        if fault.kind is Fault.ACTOR_FAILED:
            self._up[i] = False
            self._alive.discard(i)
            if not self._alive:
                raise ClusterError(f"every engine actor has failed; the last one: {fault.error}") from None
        else:
            self._up[i] = False
            if i not in self._asking:
                self._ping(i)

    def _ping(self, i: int) -> None:
        self._asking.add(i)
        self._pings[self.actors[i].ready.remote()] = i

    def _pinged(self, ref: Any) -> None:
        i = self._pings.pop(ref)
        try:
            ray.get(ref)
        except RayError as exc:
            fault = read_fault(exc)
            if fault.kind is Fault.ACTOR_FAILED:
                self._asking.discard(i)
                self._lost(i, fault)
            else:  # restarting, or lost again (however often): ask again in a while
                self._up[i] = False
                self._repings[i] = time.monotonic() + REPING_S
            return
        self._asking.discard(i)
        self._up[i] = self._answered[i] = True
        if self._order[i] and self._since[i] is None:
            self._since[i] = time.monotonic()

    # -- parts -----------------------------------------------------------------------------

    def _cut(self, final: bool) -> None:
        while self._queued >= self.rows_per_part or (final and self._queued):
            need = min(self.rows_per_part, self._queued)
            slices = []
            while need:
                block = self._queue[0]
                take = min(need, block.rows - self._offset)
                slices.append((block, self._offset, self._offset + take))
                need -= take
                self._queued -= take
                self._offset += take
                if self._offset == block.rows:
                    self._queue.popleft()
                    self._offset = 0
            self._launch(Part(slices))

    def _launch(self, part: Part) -> None:
        if any(block.out is None for block in part.blocks):
            self._waiting.append(part)
            return
        self._writes[self.write([(block.out, start, stop) for block, start, stop in part.slices])] = part

    def _written(self, ref: Any) -> None:
        part = self._writes.pop(ref)
        try:
            report = ray.get(ref)
        except RayError as exc:
            fault = read_fault(exc)
            if fault.kind is Fault.JOB_ERROR:
                raise fault.error from None
            part.retries += 1
            if part.retries > MAX_RETRIES:
                raise ClusterError(f"a part's write was lost {part.retries} times ({type(exc).__name__}); the cluster is losing nodes faster than the job can write") from None
            if fault.kind is Fault.LOST_OBJECT:
                self._remake(part, fault.lost_object, type(exc).__name__)
            else:  # the writer went, not its inputs: write the same generated blocks again
                log.warning("a part's write task was lost (%s); writing it again", type(exc).__name__)
                self.faults.parts_rewritten += 1
                self._launch(part)
            return
        self.results.append(report)
        self.written(report)

    def _remake(self, part: Part, lost: Optional[str], why: str) -> None:
        """Makes again the block of ``part`` that was lost (every block, when Ray did not
        say which); blocks already being made again are waited for."""
        gone = [b for b in part.blocks if b.remaking or (lost is not None and b.out.hex() == lost)] or part.blocks
        log.warning("%d generated block(s) of a part were lost (%s); making them again", len(gone), why)
        for block in gone:
            if not block.remaking:
                self.faults.blocks_remade += 1
                block.out, block.remaking = None, True
                self._ready.appendleft(block)
        self._waiting.append(part)
