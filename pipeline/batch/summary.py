"""What a finished run did (:class:`RunSummary`, also what its manifest records) and the
one-screen summary printed at its end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.storage.trash import TRASH_DIR

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished run did; also what its manifest records."""

    run_id: str
    output: str
    input_rows: int  # rows this run made images or error rows for
    images: int
    errors: int
    errors_by_stage: dict[str, int]
    wall_seconds: float
    engine_utilization: Optional[float] = None  # share of the engine actors' time up spent generating
    startup_seconds: Optional[float] = None  # from the run's start until its last engine actor was ready
    block_rows: int = 0  # rows per engine-actor block (runtime.batch_size, or what auto chose)
    model_loads: int = 0
    model_swaps: int = 0
    engine_seconds: float = 0.0  # summed over engine actors: in diffusers calls and model loads
    encode_wait_seconds: float = 0.0  # summed over engine actors: idle, waiting for encoding
    scoring_seconds: Optional[float] = None  # summed over engine actors: the CLIP scorer's; None without one
    compile_seconds: float = 0.0  # summed over engine actors: torch.compile's part of engine_seconds
    compiles: int = 0  # graphs compiled or loaded by torch.compile, all actors
    compiles_from_cache: int = 0  # ... of them found in the compile cache (local or shared)
    parts: list[dict[str, Any]] = field(repr=False, default_factory=list)
    skipped: int = 0  # rows read whose every image the output already held: not made again
    adopted: int = 0  # requests not made again: an interrupted run had committed them
    adopted_from: list[str] = field(default_factory=list)  # those interrupted runs
    recovery: Any = None  # pipeline.storage.commit_protocol.Recovery: what was removed before the run
    faults: dict[str, int] = field(default_factory=dict)  # what the feed recovered from (pipeline.batch.dispatch.FaultCounts)
    # Found before any work, worth a user's attention (images no current input row owns).
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def swaps_per_1000_images(self) -> float:
        """Model loads that evicted another model, per 1000 images generated."""
        return 1000 * self.model_swaps / self.images if self.images else 0.0


def format_summary(s: RunSummary) -> str:
    images_parts = sum(1 for p in s.parts if p["path"].startswith("images/"))
    errors_parts = len(s.parts) - images_parts
    busy = f" ({s.engine_utilization:.0%} of their time up)" if s.engine_utilization is not None else ""
    ready = f"{s.startup_seconds:.1f} s until the last engine actor was ready" if s.startup_seconds is not None else "no engine actor started"
    by_stage = ", ".join(f"{stage}: {n}" for stage, n in sorted(s.errors_by_stage.items())) or "none"
    lines = [
        f"run {s.run_id} finished in {s.wall_seconds:.1f} s",
        f"  rows in      {s.input_rows + s.skipped}  ({s.input_rows} made this run, {s.skipped} already in the output)",
        f"  images out   {s.images}  ({s.images_per_second:.2f} images/s)",
        f"  errors       {s.errors}  ({by_stage})",
        f"  model loads  {s.model_loads}  ({s.model_swaps} swaps, {s.swaps_per_1000_images:.1f} per 1000 images)",
        f"  engines      {s.engine_seconds:.1f} s generating{busy}, {s.encode_wait_seconds:.1f} s waiting on image encoding (all actors), blocks of {s.block_rows} rows",
        *([_compile_line(s)] if s.compiles else []),
        *([f"  scoring      {s.scoring_seconds:.1f} s scoring images with CLIP (all actors; on the encoders' threads, overlapping generation)"] if s.scoring_seconds is not None else []),
        f"  start-up     {ready}",
        *_recovery_lines(s),
        *_fault_lines(s),
        f"  output       {s.output}",
        f"                 images/  {images_parts} new part(s)",
        f"                 errors/  {errors_parts} new part(s)",
        f"                 _runs/{s.run_id}.json",
        "  read it with  pandas.read_parquet(OUTPUT + '/images')  or",
        "                datasets.load_dataset('parquet', data_dir=OUTPUT + '/images')",
    ]
    lines += [f"  warning      {w}" for w in s.warnings]
    return "\n".join(lines)


def _fault_lines(s: RunSummary) -> list[str]:
    """What the feed recovered from (calls lost or past their deadline, blocks made
    again, parts written again); nothing in a run without faults."""
    seen = [f"{n} {name.replace('_', ' ')}" for name, n in s.faults.items() if n]
    return [f"  faults       {', '.join(seen)}"] if seen else []


def _compile_line(s: RunSummary) -> str:
    """torch.compile's share of the engines' time, apart from generating."""
    fresh = s.compiles - s.compiles_from_cache
    return (
        f"  compiling    {s.compile_seconds:.1f} s of the engines' {s.engine_seconds:.1f} s (all actors): "
        f"{s.compiles} graph(s), {fresh} compiled, {s.compiles_from_cache} loaded from the compile cache"
    )


def _recovery_lines(s: RunSummary) -> list[str]:
    """What this run took over from interrupted runs, and what it set aside first (into the trash)."""
    lines = []
    if s.adopted_from:
        lines.append(f"  adopted      {s.adopted} request(s) committed by interrupted run(s) {', '.join(s.adopted_from)}: not made again")
    r = s.recovery
    if r:
        removed = f"{len(r.removed_parts)} part(s) without a commit record"
        dropped = f"{len(r.dropped_records)} damaged commit record(s) ({r.rows_made_again} rows made again)"
        damaged = f"; {len(r.damaged_parts)} damaged part(s)" if r.damaged_parts else ""
        lines.append(f"  recovered    set aside {removed} ({TRASH_DIR}/); dropped {dropped}{damaged}; {len(r.superseded_records)} superseded record(s)")
    return lines
