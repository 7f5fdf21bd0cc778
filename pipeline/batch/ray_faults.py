"""What a Ray error means for the job: the one place the feed reads Ray's exceptions.

Ray raises the same exception types for different faults, and one fault under different
types: a task whose argument was lost with a node fails with a ``RayTaskError`` that is
also an ``ObjectLostError``; a read task that failed on a dead actor fails with a
``RayTaskError`` that is also a ``RayActorError``; a call to an actor that Ray is
restarting answers ``ActorUnavailableError`` or, if it reached the old process before it
died, ``ActorDiedError``. :func:`read_fault` sorts them once, in an order that decides
those overlaps, into the few faults the feed (:mod:`pipeline.batch.dispatch`) handles
each as itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from pipeline.errors import ImagegenError


class Fault(enum.Enum):
    LOST_OBJECT = "lost object"  # an object was lost with its node and Ray could not make it again
    JOB_ERROR = "job error"  # the job's own code raised (a read, a call, a write): stop with it
    ACTOR_FAILED = "actor failed"  # an actor's constructor raised: Ray does not restart it
    LOST_ACTOR = "lost actor"  # an actor's process or node went: Ray restarts it (max_restarts=-1)
    LOST_WORKER = "lost worker"  # a task's process or node went (Ray's own retries spent): run it again


@dataclass(frozen=True)
class RayFault:
    """A Ray error read: its ``kind``, the hex id of the lost object (``LOST_OBJECT``),
    and the error to raise when the job stops on it (the job's own error unwrapped)."""

    kind: Fault
    error: BaseException
    lost_object: Optional[str] = None


def read_fault(exc: BaseException) -> RayFault:
    """The fault behind ``exc``, a Ray error raised by ``ray.get`` on the driver.

    The order decides overlaps: a lost object first (whatever task reports it, the cure is
    to make that object again or to stop if it cannot be made); then any error raised by a
    task's own code, including a read that failed calling a dead actor (resending its
    block would fail again, forever); an actor whose constructor raised is failed for good;
    any other actor error is a lost actor, which Ray restarts. Anything else (a crashed
    worker, a lost node under a task) is a lost worker: the task may be run again."""
    if isinstance(exc, ObjectLostError):
        return RayFault(Fault.LOST_OBJECT, exc, getattr(exc, "object_ref_hex", None))
    if isinstance(exc, RayTaskError):
        return RayFault(Fault.JOB_ERROR, unwrap(exc))
    if isinstance(exc, RayActorError):
        if exc.actor_init_failed:
            return RayFault(Fault.ACTOR_FAILED, exc)
        return RayFault(Fault.LOST_ACTOR, exc)
    return RayFault(Fault.LOST_WORKER, exc)


def unwrap(exc: RayTaskError) -> BaseException:
    """The job's own error inside a Ray task error, so the user reads its message, not a
    remote traceback; other errors are kept as they are."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ImagegenError) else exc
