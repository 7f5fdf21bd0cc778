"""How long an engine call may run before the dispatcher takes its actor for hung
(:class:`CallDeadline`), from the times of recent calls. Plain data: the driver's
dispatcher (:mod:`pipeline.batch.dispatch`) records each call's end and reads the deadline.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class CallDeadline:
    """How long an engine call may run before its actor is taken for hung: ``factor``
    times the slowest seconds per row of the last ``window`` calls, times ``block_rows``
    (the most rows a block holds: the driver never learns a block's rows before its call
    ends), and never under ``floor_s``, which alone applies until a call has finished.

    A call's clock starts when it can run: when its actor has answered ``ready`` (its
    constructor, with the default model's load, is not timed) and the call before it on
    that actor has ended. The floor must cover what a call itself may load: another
    model on first use, a first compile. Generous on purpose: a call taken for hung
    costs a model load on a restarted actor, a hung one costs the job. The bookkeeping
    is per call, never per row."""

    floor_s: float
    factor: float
    block_rows: int
    window: int = 32
    _per_row: deque = field(default_factory=deque, repr=False)
    _seconds: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._per_row = deque(maxlen=self.window)
        self._seconds = self.floor_s

    def record(self, seconds: float, rows: int) -> None:
        """A call of ``rows`` rows finished in ``seconds``."""
        self._per_row.append(seconds / max(rows, 1))
        self._seconds = max(self.floor_s, self.factor * max(self._per_row) * self.block_rows)

    @property
    def seconds(self) -> float:
        return self._seconds
