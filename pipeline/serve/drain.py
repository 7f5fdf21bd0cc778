"""Graceful shutdown of ``imagegen serve``: one small actor that every replica asks before
taking a request, and that the serving process tells when to stop taking them.

Why an actor: Serve routes a request to any replica of the app, so "stop taking new
requests" has to reach all of them at once, and "wait for those in flight" has to count
across all of them. The replica asks :meth:`DrainState.admit` (one actor call, about a
millisecond, against a generation of seconds) and reports :meth:`DrainState.done` when it
answers. After :meth:`DrainState.drain`, every new request gets 503 while the serving
process waits (:meth:`DrainState.wait_idle`, an event, not a poll) for the count to reach
zero or the grace period to end.

Only ``imagegen serve`` makes one: an app deployed by ``serve deploy`` or a RayService
has none and relies on Serve's own graceful shutdown of each replica
(``graceful_shutdown_timeout_s = serve.shutdown_grace_s``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import ray

log = logging.getLogger(__name__)

NAMESPACE = "imagegen"


def actor_name(app_name: str) -> str:
    return f"imagegen-drain-{app_name}"


@ray.remote(num_cpus=0)
class DrainState:
    """Requests in flight across the app's replicas, and whether new ones are refused."""

    def __init__(self) -> None:
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self) -> bool:
        """Count a new request in, or refuse it (False) once draining."""
        if self._draining:
            return False
        self._in_flight += 1
        self._idle.clear()
        return True

    async def done(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        if self._in_flight == 0:
            self._idle.set()

    async def drain(self) -> int:
        """Refuse new requests from now on; return how many are in flight."""
        self._draining = True
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> int:
        """Wait until no request is in flight, at most ``timeout_s``; return how many are."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            pass
        return self._in_flight

    async def status(self) -> dict:
        return {"draining": self._draining, "in_flight": self._in_flight}


class DrainClient:
    """A replica's handle on the app's :class:`DrainState`; a no-op without one.

    If the actor cannot be reached (the serving process is gone), requests are served:
    refusing every request for want of a coordinator would turn a lost driver into an
    outage, while Serve's own graceful shutdown still protects in-flight requests.
    """

    def __init__(self, name: Optional[str]):
        self._actor = ray.get_actor(name, namespace=NAMESPACE) if name else None

    async def admit(self) -> bool:
        if self._actor is None:
            return True
        try:
            return await self._actor.admit.remote()
        except ray.exceptions.RayError as exc:
            log.warning("the drain coordinator did not answer (%s); serving the request", type(exc).__name__)
            self._actor = None
            return True

    def done(self) -> None:
        if self._actor is not None:
            self._actor.done.remote()

    async def status(self) -> Optional[dict]:
        if self._actor is None:
            return None
        try:
            return await self._actor.status.remote()
        except ray.exceptions.RayError:
            return None
