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

Faults: a call whose actor died (process killed, node lost) goes back to the front of
the queue for another actor, and the actor is used again once Ray has restarted it (a
``ready`` call answers). A part whose generated blocks were lost with a node has those
blocks made again from their validated blocks (which Ray itself can re-read). An error
raised by the job's own code (a file that cannot be read, an output that cannot be
written) stops the job with that error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayError, RayTaskError

from pipeline.errors import ClusterError, ImagegenError
from pipeline.storage.units import ReadUnit

log = logging.getLogger(__name__)

MAX_READS = 2  # read tasks at once: the next unit's read overlaps the tail of the last one
DEPTH = 2  # calls queued per actor
POLL_S = 1.0
REPING_S = 1.0  # how often a restarting actor is asked whether it is back
MAX_REMAKES = 3  # times a part's lost blocks are made again before the job gives up


@dataclass(eq=False)
class Block:
    """One validated block on its way through: ``source`` (validated requests), ``out``
    (generated, once made) and its row count."""

    source: Any
    out: Any = None
    rows: int = 0
    placed: bool = False  # already cut into parts
    remaking: bool = False


@dataclass(eq=False)
class Part:
    """Rows ``start:stop`` of each of its blocks, in order."""

    slices: list[tuple[Block, int, int]]
    remakes: int = 0

    @property
    def blocks(self) -> list[Block]:
        return [b for b, _, _ in self.slices]


def unwrap(exc: RayTaskError) -> Exception:
    """The job's own error inside a Ray task error, so the user reads its message, not a
    remote traceback; other errors are kept as they are."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ImagegenError) else exc


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
    and returns its ref; ``actors`` are engine actors with ``generate`` and ``ready``;
    ``written(result)`` hears each part write's result as it comes."""

    units: Iterable[ReadUnit]
    start_read: Callable[[ReadUnit], Any]
    actors: list[Any]
    write: Callable[[list[tuple[Any, int, int]]], Any]
    rows_per_part: int
    lookahead: int
    depth: int = DEPTH
    written: Callable[[Any], None] = lambda result: None
    results: list[Any] = field(default_factory=list)

    def run(self) -> list[Any]:
        """Feed every unit through; returns the write tasks' results (one per part)."""
        pending_units = deque(self.units)
        reads: list[Any] = []
        self._ready: deque[Block] = deque()
        self._calls: dict[Any, tuple[int, Block, Any]] = {}
        self._load = [0] * len(self.actors)
        self._up = [True] * len(self.actors)
        self._alive = set(range(len(self.actors)))
        self._pings: dict[Any, int] = {}  # ready call -> actor, for actors lost and restarting
        self._repings: dict[int, float] = {}  # actor -> when to ask it again (monotonic seconds)
        self._queue: deque[Block] = deque()  # generated, not yet all in parts
        self._offset = 0  # rows of _queue[0] already in a part
        self._queued = 0  # rows in _queue not yet in a part
        self._waiting: list[Part] = []  # parts whose blocks are being made (again)
        self._writes: dict[Any, Part] = {}
        while True:
            while pending_units and len(reads) < MAX_READS and len(self._ready) < self.lookahead:
                reads.append(self.start_read(pending_units.popleft()))
            for i, due in list(self._repings.items()):
                if due <= time.monotonic():
                    del self._repings[i]
                    self._pings[self.actors[i].ready.remote()] = i
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
                else:
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

    def _called(self, ref: Any) -> None:
        i, block, out = self._calls.pop(ref)
        self._load[i] -= 1
        try:
            block.rows = ray.get(ref)
        except RayTaskError as exc:
            # First: a call whose input (a read task) failed raises a RayTaskError, which is
            # also a RayActorError when the read failed on a dead actor; sending that block
            # to another actor would fail it again, forever.
            raise unwrap(exc) from None
        except RayActorError as exc:
            log.warning("engine actor %d was lost (%s); its block goes to another actor", i, type(exc).__name__)
            self._ready.appendleft(block)
            if self._up[i]:
                self._up[i] = False
                self._pings[self.actors[i].ready.remote()] = i
            return
        except ObjectLostError as exc:
            raise ClusterError(
                f"a validated block was lost with a node and Ray could not read it again ({type(exc).__name__}); "
                "run the same command again: it keeps what this run committed and makes the rest"
            ) from None
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

    def _pinged(self, ref: Any) -> None:
        i = self._pings.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again in a while
            self._repings[i] = time.monotonic() + REPING_S
            return
        except RayError as exc:
            self._alive.discard(i)
            if not self._alive:
                cause = getattr(exc, "cause", None)  # an error in the actor's constructor, as raised there
                if isinstance(cause, RayTaskError) and isinstance(unwrap(cause), ImagegenError):
                    raise unwrap(cause) from None
                raise ClusterError(f"every engine actor has failed; the last one: {exc}") from None
            return
        self._up[i] = True

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
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayError as exc:  # its generated blocks were lost (a node went): make them again
            part.remakes += 1
            if part.remakes > MAX_REMAKES:
                raise ClusterError(f"a part's images were lost {part.remakes} times ({exc}); the cluster is losing nodes faster than the job can write") from None
            log.warning("a part's generated blocks were lost (%s); making them again", type(exc).__name__)
            for block in part.blocks:
                if not block.remaking:
                    block.out, block.remaking = None, True
                    self._ready.appendleft(block)
            self._waiting.append(part)
            return
        self.results.append(report)
        self.written(report)
