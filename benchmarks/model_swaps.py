"""Model swaps: how often engine actors load a model when rows pick models at random.

The real job on the tiny models (SD, SDXL, SD3: three families, three sets of weights),
rows assigned a model uniformly at random (seeded), run twice: with room in each actor's
cache for every model, and with room for one only (``runtime.model_memory_gb`` tiny), the
worst case, where every switch of model is a load. Reported from the run summary: model
loads, swaps (loads that evicted a model) and swaps per 1000 images, plus wall time. The
rows are sorted by model within each read chunk before they are cut into actor batches;
the baseline run writes the same rows as files of 8 rows (one actor batch each), so rows
are grouped within a batch only: each batch then holds ~2.6 of the 3 models and, with
room for one, swaps about twice.

    .venv/bin/python benchmarks/model_swaps.py --rows 1000 --actors 2
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"
MODELS = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}


def one_run(rows: int, actors: int, memory_gb: float | None, work: Path, cache: str, file_rows: int) -> dict:
    """The job over ``rows`` random-model rows written as files of ``file_rows`` rows."""
    from pipeline.batch.run import run
    from pipeline.spec.load import parse_spec

    prompts = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:]]
    pick = random.Random(0)
    table = pa.table({"prompt": [prompts[i % len(prompts)] for i in range(rows)], "model": [pick.choice(list(MODELS)) for _ in range(rows)]})
    folder = work / f"table-{file_rows}"
    folder.mkdir(exist_ok=True)
    for start in range(0, rows, file_rows):
        pacsv.write_csv(table.slice(start, file_rows), folder / f"p-{start:06d}.csv")
    spec = parse_spec({
        "input": {"url": str(folder), "format": "csv"},
        "models": {name: {"ref": ref, "cache_dir": cache, "device": "cpu"} for name, ref in MODELS.items()},
        "defaults": {"model": "sd", "width": 32, "height": 32, "steps": 1},
        "output": {"url": str(work / f"out-{memory_gb}-{file_rows}"), "mode": "overwrite"},
        "runtime": {"num_actors": actors, "cpus_per_actor": 0.5, "task_cpus": 0.5, "batch_size": 8, "model_memory_gb": memory_gb},
    })
    start = time.perf_counter()
    summary = run(spec)
    return {"wall": time.perf_counter() - start, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="swaps-", dir="/tmp"))
    cache = str(work / "cache")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", _temp_dir=str(work / "ray"))
    settings = {
        "all fit": (None, args.rows),
        "one slot": (1e-6, args.rows),
        "one slot, baseline: files of 8 rows (no grouping beyond a batch)": (1e-6, 8),
    }
    results = {label: one_run(args.rows, args.actors, memory, work, cache, file_rows) for label, (memory, file_rows) in settings.items()}
    ray.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.rows} rows, models {', '.join(MODELS)} at random, "
          f"{args.actors} actors, batch 8, read chunks of 4096 rows")
    print("| actor cache | images | model loads | swaps | swaps per 1000 images | wall s |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        s = r["summary"]
        print(f"| {label} | {s.images} | {s.model_loads} | {s.model_swaps} | {s.swaps_per_1000_images:.1f} | {r['wall']:.1f} |")


if __name__ == "__main__":
    main()
