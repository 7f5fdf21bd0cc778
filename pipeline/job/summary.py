"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from pipeline.batch import RunSummary


def format_summary(s: RunSummary) -> str:
    images_parts = sum(1 for p in s.parts if p["path"].startswith("images/"))
    errors_parts = len(s.parts) - images_parts
    busy = f" ({s.engine_utilization:.0%} of their time up)" if s.engine_utilization is not None else ""
    ready = f"{s.startup_seconds:.1f} s until the last engine actor was ready" if s.startup_seconds is not None else "no engine actor started"
    by_stage = ", ".join(f"{stage}: {n}" for stage, n in sorted(s.errors_by_stage.items())) or "none"
    lines = [
        f"run {s.run_id} finished in {s.wall_seconds:.1f} s",
        f"  rows in      {s.input_rows}",
        f"  images out   {s.images}  ({s.images_per_second:.2f} images/s)",
        f"  errors       {s.errors}  ({by_stage})",
        f"  model loads  {s.model_loads}  ({s.model_swaps} swaps, {s.swaps_per_1000_images:.1f} per 1000 images)",
        f"  engines      {s.engine_seconds:.1f} s generating{busy}, {s.encode_wait_seconds:.1f} s waiting on image encoding (all actors), blocks of {s.block_rows} rows",
        f"  start-up     {ready}",
        f"  output       {s.output}",
        f"                 images/  {images_parts} new part(s)",
        f"                 errors/  {errors_parts} new part(s)",
        f"                 _runs/{s.run_id}.json",
        "  read it with  pandas.read_parquet(OUTPUT + '/images')  or",
        "                datasets.load_dataset('parquet', data_dir=OUTPUT + '/images')",
    ]
    return "\n".join(lines)
