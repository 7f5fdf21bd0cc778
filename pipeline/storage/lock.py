"""One run at a time per output: a lease file written with an exclusive create.

Two runs committing into one output at once could both generate the same request ids
and both write them; and a run cleaning up uncommitted parts would delete the other's
parts in flight. So a run takes ``<output>/_lock.json`` before it touches the output and
drops it when done. The lock is a lease: the holder refreshes ``expires_at`` while it
works. A lock is stale, and taken over, when its lease has expired, or at once when its
holder was a process on this machine that no longer exists (a run killed with SIGKILL,
rerun by the same command). The loser of a race gets :class:`RunConflict` naming the
holder, before any work.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import fsspec

from pipeline.errors import RunConflict
from pipeline.storage import filesystem

LOCK_NAME = "_lock.json"
LEASE_SECONDS = 120.0


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


def live_holder(fs: fsspec.AbstractFileSystem, root: str) -> Optional[dict[str, Any]]:
    """Who holds the output's lock (run id, host, pid...), or None when no live run does:
    no lock, an unreadable one, or a stale one (see the module docstring)."""
    try:
        holder = json.loads(fs.cat_file(filesystem.join(root, LOCK_NAME)))
    except (FileNotFoundError, ValueError):
        return None
    return None if _holder_gone(holder, time.time()) else holder


@dataclass
class OutputLock:
    """A held lock on one output. Use :meth:`acquire`, then :meth:`release` when done."""

    fs: fsspec.AbstractFileSystem
    path: str
    run_id: str
    url: str
    _stop: Optional[threading.Event] = None

    @classmethod
    def acquire(cls, fs: fsspec.AbstractFileSystem, root: str, run_id: str, url: str, lease_s: float = LEASE_SECONDS) -> "OutputLock":
        """Take the output's lock, or raise :class:`RunConflict` if a live run holds it.
        A heartbeat thread keeps the lease until :meth:`release`."""
        lock = cls(fs, filesystem.join(root, LOCK_NAME), run_id, url)
        if not filesystem.create_exclusive(fs, lock.path, lock._body(lease_s)):
            holder = lock._read()
            if holder is not None and not _holder_gone(holder, time.time()):
                raise RunConflict(
                    f"another run ({holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}) is writing to "
                    f"{url}; wait for it to finish, or write to another output.url. If no such run is alive, its lease "
                    f"expires within {lease_s:.0f} s of its last heartbeat."
                )
            # Stale: remove it and race for it like anyone else.
            with filesystem.storage_errors(lock.path, "remove the stale lock"):
                fs.rm(lock.path)
            if not filesystem.create_exclusive(fs, lock.path, lock._body(lease_s)):
                raise RunConflict(f"another run took the lock on {url} at the same moment; wait for it to finish")
        lock._start_heartbeat(lease_s)
        return lock

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        holder = self._read()
        if holder is not None and holder.get("run_id") == self.run_id:
            self.fs.rm(self.path)

    def _body(self, lease_s: float) -> bytes:
        now = time.time()
        return json.dumps(
            {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now, "expires_at": now + lease_s}
        ).encode()

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treated as expired

    def _start_heartbeat(self, lease_s: float) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(lease_s / 3):
                holder = self._read()
                if holder is None or holder.get("run_id") != self.run_id:
                    return  # taken over after we stalled: nothing to refresh
                filesystem.atomic_write(self.fs, self.path, self._body(lease_s))

        threading.Thread(target=beat, name=f"lock-heartbeat-{self.run_id}", daemon=True).start()
