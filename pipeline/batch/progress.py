"""Progress of a running job: counts, rate, ETA, and the line a user reads.

The counts come from the job itself: the stages add what they finish to a
:class:`ProgressCounter` (a small Ray actor in :mod:`pipeline.batch.run`), and a
:class:`ProgressPrinter` thread on the driver polls it while the job runs. On a terminal
the line is a bar redrawn in place; elsewhere (logs, CI) one line every
``runtime.progress_interval_s`` seconds. Either way a last line is printed at the end.

Pure: no Ray import; the poll is any callable returning the counter's snapshot.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.spec import schema as S

# Rates are measured over this trailing window, so start-up (cluster, model load) stops
# weighing on the ETA once the job is under way.
RATE_WINDOW_S = 30.0
_TICK_S = 0.5  # terminal redraw period
_BAR_WIDTH = 24


@dataclass(frozen=True)
class Counts:
    """Input rows finished (imaged or rejected) this run, images and error rows among them,
    rows skipped because an earlier run already committed them, and the engine actors'
    model loads and swaps (loads that evicted another model), seconds in diffusers calls
    (and the torch.compile part of them), seconds waiting for image encoding after a
    block's last call, and when the engine actors became ready."""

    def engine_utilization(self, end: float) -> Optional[float]:
        """Share of the engine actors' time, from each one's start to ``end`` (epoch
        seconds), spent in diffusers calls; None before any actor is ready."""
        up = self.actors_ready * end - self.actors_ready_at
        return min(1.0, self.engine_seconds / up) if up > 0 else None

    rows: int = 0
    images: int = 0
    errors: int = 0
    skipped: int = 0
    adopted: int = 0  # requests skipped because an interrupted run had committed them
    model_loads: int = 0
    model_swaps: int = 0
    engine_seconds: float = 0.0
    encode_wait_seconds: float = 0.0
    scoring_seconds: float = 0.0  # the CLIP scorer's, on the encoders' threads
    # torch.compile on the engine actors (inside engine_seconds): graphs compiled or
    # loaded, those of them found in the compile cache, and their seconds.
    compiles: int = 0
    compiles_from_cache: int = 0
    compile_seconds: float = 0.0
    # Engine actors that finished starting (default model loaded), and the sum of the
    # times (epoch seconds) they did so: with the end time, the seconds they were up.
    actors_ready: int = 0
    actors_ready_at: float = 0.0
    # When the last of them did (epoch seconds): the job's start-up ends there.
    last_actor_ready_at: Optional[float] = None

    @property
    def done(self) -> int:
        return self.rows + self.skipped


class ProgressCounter:
    """Running totals the stages add to. Plain Python: :mod:`pipeline.batch.run` makes it an actor."""

    def __init__(self) -> None:
        self._counts = Counts()

    def add(self, **increments: int) -> None:
        """Add to the named counts (fields of :class:`Counts`)."""
        c = self._counts
        self._counts = dataclasses.replace(c, **{name: getattr(c, name) + n for name, n in increments.items()})

    def actor_ready(self, at: float) -> None:
        """An engine actor finished starting at ``at`` (epoch seconds)."""
        c = self._counts
        last = at if c.last_actor_ready_at is None else max(at, c.last_actor_ready_at)
        self._counts = dataclasses.replace(c, actors_ready=c.actors_ready + 1, actors_ready_at=c.actors_ready_at + at, last_actor_ready_at=last)

    def snapshot(self) -> Counts:
        return self._counts


def finished(table: pa.Table) -> dict[str, int]:
    """What a block of the stream (after generation and encoding) finishes: input rows
    (counted once, at their first image), images, and error rows."""
    failed = pc.sum(pc.is_valid(table.column(S.ERROR_STAGE))).as_py() or 0
    rows = pc.sum(pc.equal(table.column(S.IMAGE_INDEX), 0)).as_py() or 0
    return {"rows": rows, "images": table.num_rows - failed, "errors": failed}


def skipped(raw: pa.Table, requests: pa.Table) -> int:
    """Raw rows of a validated block that left no request: all their images are committed."""
    kept = set(zip(requests.column(S.SOURCE).to_pylist(), requests.column(S.ROW_INDEX).to_pylist()))
    return raw.num_rows - len(kept)


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_line(counts: Counts, total: Optional[int], elapsed: float, images_per_s: Optional[float], eta: Optional[float], bar: bool) -> str:
    """One progress line. ``bar`` draws a bar (terminal); otherwise a plain log line."""
    fraction = min(1.0, counts.done / total) if total else None
    rows = f"{counts.done}/{total} rows" if total is not None else f"{counts.done} rows"
    if fraction is not None:
        rows += f" {fraction:4.0%}"
    fields = [
        rows,
        f"{counts.images} images",
        f"{counts.errors} errors",
        f"{images_per_s:.2f} images/s" if images_per_s is not None else "-- images/s",
        f"ETA {_clock(eta)}" if total is not None else "ETA unknown (no row count)",
        f"elapsed {_clock(elapsed)}",
    ]
    if counts.skipped:
        fields.insert(1, f"{counts.skipped} already in the output")
    if bar:
        filled = int(round((fraction or 0) * _BAR_WIDTH))
        return f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] " + " | ".join(fields)
    return "progress: " + ", ".join(fields)


class RateMeter:
    """Images/s and ETA from snapshots over a trailing window."""

    def __init__(self, total: Optional[int], started: float):
        self.total = total
        self._samples: deque[tuple[float, Counts]] = deque([(started, Counts())])

    def add(self, now: float, counts: Counts) -> tuple[Optional[float], Optional[float]]:
        """Record a snapshot; return ``(images per second, seconds left)``, None where unknown."""
        self._samples.append((now, counts))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        then, old = self._samples[0]
        span = now - then
        if span <= 0 or counts.rows == old.rows:
            return None, None
        images_per_s = (counts.images - old.images) / span
        rows_per_s = (counts.rows - old.rows) / span
        eta = max(0, self.total - counts.done) / rows_per_s if self.total is not None else None
        return images_per_s, eta


class ProgressPrinter:
    """Prints a job's progress from ``poll`` while the ``with`` block runs, and once at the end.

    ``poll`` returns the current :class:`Counts`; a poll that raises is skipped (progress
    must never fail a job). On a terminal (``stream.isatty()``) the line is redrawn in
    place every half second; otherwise one line is written every ``interval_s`` seconds.
    """

    def __init__(self, poll: Callable[[], Counts], total: Optional[int], interval_s: float, stream: TextIO):
        self._poll = poll
        self._stream = stream
        self._live = bool(getattr(stream, "isatty", lambda: False)())
        self._interval = _TICK_S if self._live else interval_s
        self._started = time.monotonic()
        self._meter = RateMeter(total, self._started)
        self._total = total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagegen-progress", daemon=True)

    @property
    def live(self) -> bool:
        """Whether the line is redrawn in place (a terminal)."""
        return self._live

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._show(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._show(final=False)

    def _show(self, final: bool) -> None:
        try:
            counts = self._poll()
        except Exception:  # noqa: BLE001 - a lost progress sample is not worth failing the job
            return
        now = time.monotonic()
        rate, eta = self._meter.add(now, counts)
        line = format_line(counts, self._total, now - self._started, rate, eta, bar=self._live)
        if self._live:
            width = shutil.get_terminal_size((120, 24)).columns
            self._stream.write("\r" + line[: width - 1] + "\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
