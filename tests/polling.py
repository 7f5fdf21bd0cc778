"""The suite's one poller. Tests synchronise on an observable condition, never a blind sleep."""

from __future__ import annotations

import time
from typing import Callable, Optional


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "the condition", explain: Optional[Callable[[], str]] = None):
    """Poll ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds with ``what`` (and ``explain()``, for diagnostics) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" {explain()}" if explain else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}.{detail}")
        time.sleep(0.05)
