"""One run at a time per output: a lease file written with an exclusive create.

Two runs committing into one output at once could both generate the same request ids
and both write them; and a run cleaning up uncommitted parts would delete the other's
parts in flight. So a run takes ``<output>/_lock.json`` before it touches the output and
drops it when done. The lock is a lease: the holder refreshes ``expires_at`` while it
works. A lock is stale, and taken over, when its lease has expired, or at once when its
holder was a process on this machine that no longer exists (a run killed with SIGKILL,
rerun by the same command). The loser of a race gets :class:`RunConflict` naming the
holder, before any work.

**Refresh.** A heartbeat thread rewrites the lease every third of its length. A write
that fails (an S3 503, a dropped connection) is retried with backoff for as long as the
lease has time left, less a safety margin: one failed PUT must not end a lease that
others then take over. A lease that could not be renewed in time, or that another run
took over, is **lost**: :meth:`OutputLock.lost` says why, and the writers check the lease
file before every part (:func:`check_lease`), raising :class:`~pipeline.errors.LeaseLost`,
so a run that lost its lease adds no part after it knows. Between that check and the
part's PUT there is a window of one request; renewals stop a margin before expiry, so a
late renewal never lands on a lock someone else took in the meantime.

**Takeover race.** Removing a stale lock and creating one are two requests; two runs that
both saw the same stale lock could each remove the other's fresh one. So taking over is
decided first by an exclusive create of a marker named after the stale lock's content
digest (``_lock.takeovers/<digest>``): exactly one run wins each stale lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import fsspec

from pipeline.errors import LeaseLost, RunConflict, StorageError
from pipeline.storage import filesystem

LOCK_NAME = "_lock.json"
TAKEOVERS_DIR = "_lock.takeovers"
LEASE_SECONDS = 120.0
_T = TypeVar("_T")


def _holder_gone(holder: dict[str, Any], now: float) -> bool:
    if holder.get("expires_at", 0) < now:
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
    (epoch seconds); the last failure is raised. ``stop`` cuts the waiting short."""
    delay = first_delay
    while True:
        try:
            return action()
        except (StorageError, OSError):
            if time.time() + delay >= deadline:
                raise
        if stop is not None and stop.wait(delay):
            raise StorageError("the lock was released while a write was being retried")
        if stop is None:
            time.sleep(delay)  # a writer's own retry: nothing else to wait on
        delay *= 2


def _read_lock(fs: fsspec.AbstractFileSystem, path: str) -> tuple[Optional[dict[str, Any]], bytes]:
    """The lock's holder (None when there is no lock; {} when unreadable) and its raw bytes."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, b""
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}, raw  # unreadable: treated as expired
    return (holder if isinstance(holder, dict) else {}), raw


def check_lease(fs: fsspec.AbstractFileSystem, root: str, run_id: str, url: str, retry_s: float = 10.0) -> None:
    """Raise :class:`LeaseLost` unless run ``run_id`` holds a live lease on the output at
    ``root``: called by every writer before it adds a part. A read that fails is retried
    for up to ``retry_s`` seconds, then raised as :class:`StorageError`."""
    path = filesystem.join(root, LOCK_NAME)
    holder, _ = _retrying(lambda: _read_lock(fs, path), time.time() + retry_s, 0.2)
    now = time.time()
    if holder is None:
        reason = "its lock file is gone"
    elif holder.get("run_id") != run_id:
        reason = f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}) holds it now"
    elif holder.get("expires_at", 0) < now:
        reason = f"its lease expired {now - holder['expires_at']:.0f} s ago without being renewed"
    else:
        return
    raise LeaseLost(
        f"run {run_id} lost its lock on {url}: {reason}. It stopped writing; the blocks it committed stay "
        "committed (the next run into this output adopts them, and removes any part left without a commit record). "
        "Check that the output's storage is reachable and rerun the same command."
    )


def live_holder(fs: fsspec.AbstractFileSystem, root: str) -> Optional[dict[str, Any]]:
    """Who holds the output's lock (run id, host, pid...), or None when no live run does:
    no lock, an unreadable one, or a stale one (see the module docstring)."""
    holder, _ = _read_lock(fs, filesystem.join(root, LOCK_NAME))
    return None if not holder or _holder_gone(holder, time.time()) else holder


@dataclass
class OutputLock:
    """A held lock on one output. Use :meth:`acquire`, then :meth:`release` when done;
    :meth:`lost` (from any thread) is the reason the lease was lost, or None."""

    fs: fsspec.AbstractFileSystem
    root: str
    run_id: str
    url: str
    lease_s: float = LEASE_SECONDS
    acquired_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: Optional[str] = None

    @property
    def path(self) -> str:
        return filesystem.join(self.root, LOCK_NAME)

    @classmethod
    def acquire(cls, fs: fsspec.AbstractFileSystem, root: str, run_id: str, url: str, lease_s: float = LEASE_SECONDS) -> "OutputLock":
        """Take the output's lock, or raise :class:`RunConflict` if a live run holds it.
        A heartbeat thread keeps the lease (``lease_s`` seconds, renewed every third of it)
        until :meth:`release`."""
        lock = cls(fs, root, run_id, url, lease_s)
        body = lock._body()
        if not filesystem.create_exclusive(fs, lock.path, body):
            with filesystem.storage_errors(lock.path, "read"):
                holder, raw = _read_lock(fs, lock.path)
            if holder is not None and not _holder_gone(holder, time.time()):
                raise RunConflict(
                    f"another run ({holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}) is writing to "
                    f"{url}; wait for it to finish, or write to another output.url. If no such run is alive, its lease "
                    f"expires within {lease_s:.0f} s of its last heartbeat."
                )
            conflict = RunConflict(f"another run took the lock on {url} at the same moment; wait for it to finish")
            if holder is not None:
                # Stale: one run per stale lock wins the right to replace it.
                marker = filesystem.join(root, TAKEOVERS_DIR, hashlib.sha256(raw).hexdigest()[:32])
                if not filesystem.create_exclusive(fs, marker, run_id.encode()):
                    raise conflict
                filesystem.remove(fs, lock.path)
            body = lock._body()
            if not filesystem.create_exclusive(fs, lock.path, body):
                raise conflict
        lock.expires_at = json.loads(body)["expires_at"]
        threading.Thread(target=lock._heartbeat, name=f"lock-heartbeat-{run_id}", daemon=True).start()
        return lock

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
        """Stop the heartbeat and remove the lock if this run still holds it."""
        self._stop.set()
        try:
            holder, _ = _read_lock(self.fs, self.path)
            if holder is not None and holder.get("run_id") == self.run_id:
                filesystem.remove(self.fs, self.path)
        except (OSError, StorageError):
            pass  # a lock we cannot remove expires with its lease

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired_at": self.acquired_at,
                "renewed_at": now,
                "expires_at": now + self.lease_s,
            }
        ).encode()

    def _heartbeat(self) -> None:
        # Renewals stop this long before expiry: a renewal still in flight when another
        # run may take over could otherwise overwrite that run's fresh lock.
        margin = self.lease_s / 6
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._renew(deadline=self.expires_at - margin)
            except (StorageError, OSError) as exc:
                if not self._stop.is_set():
                    self._lost = f"its lease could not be renewed before it expired ({exc})"
                return
            if self._lost is not None:
                return

    def _renew(self, deadline: float) -> None:
        def attempt() -> None:
            holder, _ = _read_lock(self.fs, self.path)
            if holder is None or holder.get("run_id") != self.run_id:
                taker = "its lock file is gone" if holder is None else f"run {holder.get('run_id')} took it over"
                self._lost = taker
                return
            body = self._body()
            filesystem.atomic_write(self.fs, self.path, body)
            self.expires_at = json.loads(body)["expires_at"]

        _retrying(attempt, deadline, first_delay=min(1.0, self.lease_s / 20), stop=self._stop)
