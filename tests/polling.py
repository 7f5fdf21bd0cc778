"""Waiting on what tests start: the suite's one poller, and a free port for a server.
Tests synchronise on an observable condition, never a blind sleep."""

from __future__ import annotations

import socket
import time
from typing import Callable, Optional


def wait_for(
    condition: Callable[[], object],
    timeout: float = 10.0,
    what: str = "the condition",
    explain: Optional[Callable[[], str]] = None,
    ignore: tuple[type[BaseException], ...] = (),
):
    """Poll ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds with ``what`` (and ``explain()``, for diagnostics) in the message.
    Exceptions of the ``ignore`` types count as not yet (a server still starting refuses
    connections); the last one is named if time runs out."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = condition()
        except ignore as exc:
            last_error, value = exc, None
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" {explain()}" if explain else ""
            error = f" (last error: {last_error})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}.{error}{detail}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
