"""One run at a time per output: a lease file, created exclusively and renewed only if unchanged.

Two runs committing into one output at once could both generate the same request ids
and both write them; and a run cleaning up uncommitted parts would delete the other's
parts in flight. So a run takes ``<output>/_lock.json`` before it touches the output and
drops it when done. The lock is a lease: the holder rewrites it while it works. A lock is
stale, and taken over, when it has not been rewritten for its lease (``lease_s``), or at
once when its holder was a process on this machine that no longer exists (a run killed
with SIGKILL, rerun by the same command). The loser of a race gets :class:`RunConflict`
naming the holder, before any work.

**Every change is conditional** (:func:`~pipeline.storage.filesystem.replace_versioned`):
the lock is created only if absent (whole: locally a complete file hard-linked into place,
so no racer ever reads it half written), and renewed, taken over or removed only if it is
still the version its writer last saw (S3: ``If-Match`` on its ETag; local disk: compare
and rename under an ``flock``). A stale lock is therefore taken over by exactly one of the
runs that read it, and a renewal that comes late never overwrites a successor's lock: it
fails, and the run knows it lost the lease.

**One clock.** Age is the time since the lock's last write by the store's own clock
(S3's ``Last-Modified`` against its ``Date``; locally the file's mtime), never the
``expires_at`` a driver wrote by its own clock: workers, contenders and ``inspect`` judge
a lease alike, however the machines' clocks disagree. The holder times its renewals by
its own monotonic clock from when it sent the last one, which is never later than the
store's.

**Refresh.** A heartbeat thread renews the lease every third of its length. A write
that fails (an S3 503, a dropped connection) is retried with backoff for as long as the
lease has time left, less a safety margin: one failed PUT must not end a lease that
others then take over. A lease that could not be renewed in time, or that another run
took over, is **lost**: :meth:`OutputLock.lost` says why, and every step that writes or
deletes in the output checks the lease file first (:func:`check_lease`: each part, fold,
the manifest, the error-part rewrite, the card), raising
:class:`~pipeline.errors.LeaseLost`; between that check and the step there is a window of
one request.

**Order.** Right after taking the lock a run takes the next sequence number by an
exclusive create of ``_lock.seq/<n>``, and its run id becomes ``r<n, 12 digits>-<id>``.
Run ids are compared as text wherever "later" is decided (record order, which run's verdict
supersedes which, manifest order), so the lock, not a clock, decides it; ids of runs from
before numbering (``<UTC time>-<hex>``) sort before every numbered one, in their old order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import fsspec

from pipeline.errors import LeaseLost, RunConflict, StorageError
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
SEQ_DIR = "_lock.seq"
LEASE_SECONDS = 120.0
_T = TypeVar("_T")


def _lease_of(holder: dict[str, Any]) -> float:
    """The lease the holder asked for (locks written before ``lease_s`` was stored: from
    their own times; unreadable ones: the default)."""
    lease = holder.get("lease_s")
    if isinstance(lease, (int, float)):
        return float(lease)
    try:
        return float(holder["expires_at"]) - float(holder["renewed_at"])
    except (KeyError, TypeError, ValueError):
        return LEASE_SECONDS


def _holder_gone(holder: dict[str, Any], age_s: float) -> bool:
    if age_s > _lease_of(holder):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def _retrying(action: Callable[[], _T], deadline: float, first_delay: float, stop: Optional[threading.Event] = None) -> _T:
    """``action()``, retried on a storage failure with doubling delays until ``deadline``
    (``time.monotonic()`` seconds); the last failure is raised. ``stop`` cuts the waiting short."""
    delay = first_delay
    while True:
        try:
            return action()
        except (StorageError, OSError):
            if time.monotonic() + delay >= deadline:
                raise
        if stop is not None and stop.wait(delay):
            raise StorageError("the lock was released while a write was being retried")
        if stop is None:
            time.sleep(delay)  # a writer's own retry: nothing else to wait on
        delay *= 2


def _holder(current: Optional[filesystem.Versioned]) -> Optional[dict[str, Any]]:
    """The lock's holder (None when there is no lock; {} when unreadable)."""
    if current is None:
        return None
    try:
        holder = json.loads(current.data)
    except ValueError:
        return {}  # unreadable: stale once its age passes the default lease
    return holder if isinstance(holder, dict) else {}


def check_lease(fs: fsspec.AbstractFileSystem, root: str, run_id: str, url: str, retry_s: float = 10.0) -> None:
    """Raise :class:`LeaseLost` unless run ``run_id`` holds a live lease on the output at
    ``root``: called before every step that writes or deletes in it. A read that fails
    is retried for up to ``retry_s`` seconds, then raised as :class:`StorageError`."""
    path = filesystem.join(root, LOCK_NAME)
    current = _retrying(lambda: filesystem.read_versioned(fs, path), time.monotonic() + retry_s, 0.2)
    holder = _holder(current)
    if holder is None:
        reason = "its lock file is gone"
    elif holder.get("run_id") != run_id:
        reason = f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}) holds it now"
    elif current.age_s > _lease_of(holder):
        reason = f"its lease expired {current.age_s - _lease_of(holder):.0f} s ago without being renewed"
    else:
        return
    raise LeaseLost(
        f"run {run_id} lost its lock on {url}: {reason}. It stopped writing; the blocks it committed stay "
        "committed (the next run into this output adopts them, and removes any part left without a commit record). "
        "Check that the output's storage is reachable and rerun the same command."
    )


def live_holder(fs: fsspec.AbstractFileSystem, root: str) -> Optional[dict[str, Any]]:
    """Who holds the output's lock (run id, host, pid...), or None when no live run does:
    no lock, or a stale one (see the module docstring)."""
    current = filesystem.read_versioned(fs, filesystem.join(root, LOCK_NAME))
    holder = _holder(current)
    return None if holder is None or _holder_gone(holder, current.age_s) else holder


def numbered_run_id(sequence: int, run_id: str) -> str:
    """The run id that sorts by ``sequence``, after every id of an unnumbered run."""
    return f"r{sequence:012d}-{run_id}"


def _last_sequence(fs: fsspec.AbstractFileSystem, folder: str) -> int:
    try:
        names = fs.ls(folder, detail=False, refresh=True)  # never a cached listing
    except FileNotFoundError:
        return 0
    numbers = [int(base) for base in (n.rstrip("/").rsplit("/", 1)[-1] for n in names) if base.isdigit()]
    return max(numbers, default=0)


@dataclass
class OutputLock:
    """A held lock on one output. Use :meth:`acquire`, then :meth:`release` when done;
    :meth:`lost` (from any thread) is the reason the lease was lost, or None.
    ``run_id`` is the numbered id the run writes under (see the module docstring)."""

    fs: fsspec.AbstractFileSystem
    root: str
    run_id: str
    url: str
    lease_s: float = LEASE_SECONDS
    acquired_at: float = field(default_factory=time.time)
    expires_at: float = 0.0  # by this process's clock, for people; others judge the lock's age
    sequence: int = 0
    version: str = ""  # of the lock as this run last wrote it
    _sent: float = 0.0  # time.monotonic() when the last write that landed was sent
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: Optional[str] = None

    @property
    def path(self) -> str:
        return filesystem.join(self.root, LOCK_NAME)

    @classmethod
    def acquire(cls, fs: fsspec.AbstractFileSystem, root: str, run_id: str, url: str, lease_s: float = LEASE_SECONDS) -> "OutputLock":
        """Take the output's lock, or raise :class:`RunConflict` if a live run holds it;
        then take the run's sequence number (``lock.run_id`` becomes the numbered id).
        A heartbeat thread keeps the lease (``lease_s`` seconds, renewed every third of it)
        until :meth:`release`."""
        # The number is guessed before the lock (one write in the usual case) and made
        # sure of under it: see _number.
        guess = _last_sequence(fs, filesystem.join(root, SEQ_DIR)) + 1
        lock = cls(fs, root, numbered_run_id(guess, run_id), url, lease_s, sequence=guess)
        lock._take()
        try:
            lock._number(run_id)
        except BaseException:
            lock.release()
            raise
        threading.Thread(target=lock._heartbeat, name=f"lock-heartbeat-{lock.run_id}", daemon=True).start()
        return lock

    def _take(self) -> None:
        sent, body = time.monotonic(), self._body()
        version = filesystem.create_versioned(self.fs, self.path, body)
        if version is None:
            current = filesystem.read_versioned(self.fs, self.path)
            holder = _holder(current)
            if holder is None:  # released between the two requests
                version = filesystem.create_versioned(self.fs, self.path, body)
            elif not _holder_gone(holder, current.age_s):
                raise RunConflict(
                    f"another run ({holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}) is writing to "
                    f"{self.url}; wait for it to finish, or write to another output.url. If no such run is alive, its lease "
                    f"expires within {_lease_of(holder):.0f} s of its last heartbeat."
                )
            else:
                # Stale: replaced only if still the very lock judged stale, so of the runs
                # that read it exactly one takes it over.
                version = filesystem.replace_versioned(self.fs, self.path, body, current.version)
                if version is not None:
                    log.warning("took over the stale lock of run %s on %s", holder.get("run_id"), self.url)
        if version is None:
            raise RunConflict(f"another run took the lock on {self.url} at the same moment; wait for it to finish")
        self._wrote(version, sent, body)

    def _number(self, base_id: str) -> None:
        """Make the guessed sequence number this run's by an exclusive create, under the
        lock; if a run that held the lock since the guess took it, the next free one (and
        the lock is rewritten with the id it gives)."""
        folder = filesystem.join(self.root, SEQ_DIR)
        n = self.sequence
        while not filesystem.create_exclusive(self.fs, filesystem.join(folder, f"{n:012d}"), base_id.encode()):
            n += 1
        if n == self.sequence:
            return
        self.sequence, self.run_id = n, numbered_run_id(n, base_id)
        self._renew(deadline=self._sent + self.lease_s / 2)
        if self._lost is not None:
            raise RunConflict(f"another run took the lock on {self.url} while this one started ({self._lost}); wait for it to finish")

    def lost(self) -> Optional[str]:
        """Why the lease was lost (renewals failed until it expired, or another run took
        it over), or None while it is held."""
        return self._lost

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost (see :func:`check_lease`)."""
        if self._lost is not None:
            raise LeaseLost(
                f"run {self.run_id} lost its lock on {self.url}: {self._lost}. It stopped writing; the blocks it "
                "committed stay committed (the next run into this output adopts them, and removes any part left without "
                "a commit record). Check that the output's storage is reachable and rerun the same command."
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still the one this run wrote."""
        self._stop.set()
        try:
            filesystem.remove_versioned(self.fs, self.path, self.version)
        except (StorageError, OSError):
            pass  # a lock we cannot remove expires with its lease

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "sequence": self.sequence,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "lease_s": self.lease_s,
                "acquired_at": self.acquired_at,
                "renewed_at": now,
                "expires_at": now + self.lease_s,
            }
        ).encode()

    def _wrote(self, version: str, sent: float, body: bytes) -> None:
        self.version, self._sent = version, sent
        self.expires_at = json.loads(body)["expires_at"]

    def _heartbeat(self) -> None:
        # Renewals stop this long before expiry: the lock's age by the store's clock runs
        # from when the store got the last write, never earlier than when it was sent.
        margin = self.lease_s / 6
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._renew(deadline=self._sent + self.lease_s - margin)
            except (StorageError, OSError) as exc:
                if not self._stop.is_set():
                    self._lost = f"its lease could not be renewed before it expired ({exc})"
                return
            if self._lost is not None:
                return

    def _renew(self, deadline: float) -> None:
        """Rewrite the lock if it is still the version this run wrote; otherwise it was
        taken over (or removed) and the lease is lost. One body per renewal, so an attempt
        whose answer was lost but which landed is recognised by the next attempt."""
        sent, body = time.monotonic(), self._body()

        def attempt() -> None:
            version = filesystem.replace_versioned(self.fs, self.path, body, self.version)
            if version is None:
                current = filesystem.read_versioned(self.fs, self.path)
                if current is None or current.data != body:
                    holder = _holder(current)
                    self._lost = "its lock file is gone" if holder is None else f"run {holder.get('run_id')} took it over"
                    return
                version = current.version  # an earlier attempt landed
            self._wrote(version, sent, body)

        _retrying(attempt, deadline, first_delay=min(1.0, self.lease_s / 20), stop=self._stop)
