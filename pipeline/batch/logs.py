"""Where a run's log lines go: off a terminal, the output is ours (the progress line each
interval, warnings, the summary).

Ray Data logs its operator progress at INFO every few seconds (a dozen lines per
operator table, 45 lines for the 64-row demo) to both the console and its log file in
Ray's session folder (``logs/ray-data/ray-data.log``). :func:`route_ray_data_logs` keeps
its console to warnings, tells once where the rest is, and leaves the file as it is;
``imagegen run --verbose`` keeps Ray's behaviour.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

RAY_DATA_LOGGER = "ray.data"


class _WarningsOnly(logging.Filter):
    """Lets WARNING and above through; says once where the dropped records are."""

    def __init__(self, stream: TextIO):
        super().__init__()
        self._stream = stream
        self._told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if not self._told:
            from ray.data._internal.logging import get_log_directory

            folder = get_log_directory()
            if folder is not None:
                self._told = True
                self._stream.write(f"imagegen: Ray Data's operator progress and logs: {folder}/ (imagegen run --verbose prints them here)\n")
                self._stream.flush()
        return False


def route_ray_data_logs(verbose: bool, stream: TextIO = sys.stderr) -> None:
    """Unless ``verbose``, Ray Data's console logs below WARNING go only to its log file
    in Ray's session folder. Call before the run; idempotent."""
    import ray.data  # noqa: F401 - importing it configures the logger this changes

    if verbose:
        return
    for handler in logging.getLogger(RAY_DATA_LOGGER).handlers:
        if handler.get_name() == "console" and not any(isinstance(f, _WarningsOnly) for f in handler.filters):
            handler.addFilter(_WarningsOnly(stream))
