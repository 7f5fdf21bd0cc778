"""What one replica holds: each HTTP request from arrival until the engine is done with its
images, whether or not its client is still there to take them.

Why not Serve's own count: when a client disconnects, Serve cancels the request's handler
and stops counting it at once, but a diffusers call cannot be stopped halfway, so the
images of that call keep the engine busy. Counted by Serve alone, the replica would look
idle (``/healthz``, the drain, admission) while it still works for nobody. Here a request
is a :class:`Ticket` that its connection owns:

- arrival: :meth:`InFlight.admit` takes one of the replica's ``slots``
  (``serve.max_ongoing_requests``), waiting for one if abandoned work still holds them,
  and refuses (:class:`KeyBusy`) a key that already holds ``per_key`` tickets;
- each image is *queued* until its batch starts on the engine, then *running*;
- client gone (:meth:`InFlight.abandon`): its queued images are dropped (the batch
  function skips them, Serve drops their cancelled futures too), its running ones are
  discarded when their call returns;
- the ticket is released (slot, key, ``on_release``, the drain's count) only once the
  handler has returned *and* none of its images runs.

A call shared with other clients' images is never interrupted: their images are in it.
Pure asyncio, one event loop (the replica's); no Ray.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional


class KeyBusy(Exception):
    """The request's API key already holds its share of the replica (``per_key`` requests)."""


@dataclass(eq=False)
class Ticket:
    """One HTTP request's claim on the replica; its images' state."""

    key: Optional[str]
    on_release: Callable[[], None]
    queued: int = 0
    running: int = 0
    abandoned: bool = False
    handler_done: bool = False
    released: bool = False


@dataclass
class Counts:
    """A snapshot for ``/healthz``: requests held (``abandoned`` among them), images on the
    engine now, and since start the images dropped before they started and those made for
    a client that had left."""

    in_flight: int
    abandoned: int
    images_running: int
    images_dropped: int
    images_discarded: int


@dataclass
class InFlight:
    """The replica's tickets. ``slots``: requests held at once (abandoned ones included);
    ``per_key``: requests one key may hold (None: no limit; None keys are never limited)."""

    slots: int
    per_key: Optional[int] = None
    _held: list[Ticket] = field(default_factory=list)
    _by_key: Counter = field(default_factory=Counter)
    _waiting: deque = field(default_factory=deque)  # futures, first come first served
    _handed: int = 0  # slots freed for a waiter that has not taken it yet
    dropped: int = 0
    discarded: int = 0

    async def admit(self, key: Optional[str], on_release: Callable[[], None] = lambda: None) -> Ticket:
        """A ticket for a new request of ``key``. Raises :class:`KeyBusy` at once when the key
        holds ``per_key`` tickets (a waiting request counts: a key cannot queue past its
        share either); otherwise waits for a free slot, in arrival order. Cancelled while
        waiting: nothing held (a slot it was handed goes to the next in line)."""
        if key is not None and self.per_key is not None and self._by_key[key] >= self.per_key:
            raise KeyBusy(key)
        self._by_key[key] += 1
        if self._waiting or len(self._held) + self._handed >= self.slots:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn
            except BaseException:
                if turn in self._waiting:
                    self._waiting.remove(turn)
                elif not turn.cancelled():  # handed a slot, then cancelled: pass it on
                    self._handed -= 1
                    self._hand_over()
                self._unkey(key)
                raise
            self._handed -= 1
        ticket = Ticket(key, on_release)
        self._held.append(ticket)
        return ticket

    def queue(self, ticket: Ticket, images: int) -> None:
        ticket.queued += images

    def start(self, ticket: Ticket) -> bool:
        """One of ``ticket``'s images goes on the engine; False (and dropped) if its client has left."""
        if ticket.abandoned:
            return False
        ticket.queued -= 1
        ticket.running += 1
        return True

    def finish(self, ticket: Ticket) -> None:
        """One of ``ticket``'s running images is made (or failed)."""
        ticket.running -= 1
        if ticket.abandoned:
            self.discarded += 1
        self._release_if_done(ticket)

    def abandon(self, ticket: Ticket) -> None:
        """The client has gone: its queued images will not start."""
        if not ticket.abandoned:
            ticket.abandoned = True
            self.dropped += ticket.queued
            ticket.queued = 0

    def leave(self, ticket: Ticket) -> None:
        """The handler has returned (answered, failed or cancelled)."""
        ticket.handler_done = True
        self._release_if_done(ticket)

    def counts(self) -> Counts:
        return Counts(
            in_flight=len(self._held),
            abandoned=sum(t.abandoned for t in self._held),
            images_running=sum(t.running for t in self._held),
            images_dropped=self.dropped,
            images_discarded=self.discarded,
        )

    def _release_if_done(self, ticket: Ticket) -> None:
        if ticket.released or not ticket.handler_done or ticket.running:
            return
        ticket.released = True
        self._held.remove(ticket)
        self._unkey(ticket.key)
        ticket.on_release()
        self._hand_over()

    def _hand_over(self) -> None:
        # The freed slot goes straight to the first waiter, so a newcomer cannot take it
        # between the wake-up and the waiter running.
        while self._waiting and len(self._held) + self._handed < self.slots:
            turn = self._waiting.popleft()
            if not turn.done():
                self._handed += 1
                turn.set_result(None)

    def _unkey(self, key: Optional[str]) -> None:
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]
