"""The driver at scale: memory, first committed part, resume and throughput by table size.

One Parquet table (row groups of 50k rows, an id column, PartiPrompts prompts), the
sleeping engine of ``benchmarks/simulated_scale.py`` (the job's own ``ActorEngines``
whose engine sleeps per diffusers-sized call), ``output.rows_per_part`` 5000. Per size,
each in its own process (so peak RSS is that run's):

- the run: wall seconds, seconds until the first part is on disk (a thread polls the
  output), the driver's peak RSS;
- the same command again on the fully committed output (the resume): seconds and RSS;
- throughput: the run's rows/s against the ideal (actors x images per call / seconds per
  call) and against the same blocks pushed through the same code in one process (read,
  validate, cut, the sleeping stage, parts written by the sink), which has one engine.

    .venv/bin/python benchmarks/driver_scale.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from simulated_scale import PARTI, SleepStage  # noqa: E402


def make_table(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:]]
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("prompt", pa.string())])) as writer:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            ids = [f"row-{i}" for i in range(start, start + n)]
            writer.write_table(pa.table({"id": ids, "prompt": [prompts[i % len(prompts)] for i in range(start, start + n)]}), row_group_size=50_000)


def make_spec(work: Path, actors: int, call: int):
    from pipeline.spec.load import parse_spec

    return parse_spec({
        "input": {"url": str(work / "p.parquet"), "id_column": "id"},
        # max_batch_pixels: calls of `call` 8x8 images, as the sleeping engine makes.
        "model": {"ref": "tiny", "cache_dir": str(work / "cache"), "device": "cpu", "engine": {"max_batch_pixels": call * 64}},
        "defaults": {"width": 8, "height": 8, "steps": 1},
        "output": {"url": str(work / "out"), "rows_per_part": 5000},
        "runtime": {"num_actors": actors, "gpus_per_actor": 1, "cpus_per_actor": 0.01, "task_cpus": 0.25, "progress_interval_s": 5},
    })


def child(work: Path, actors: int, call: int, seconds: float) -> dict:
    """One run of the job in this process: wall, first part, peak RSS, summary counts."""
    import ray

    from pipeline.batch.run import run

    # A subclass made here (in __main__) travels to the actors by value, with these settings;
    # SleepStage itself would be imported there with its defaults.
    stage = type("SleepingStage", (SleepStage,), {"SECONDS_PER_CALL": seconds, "CALL_IMAGES": call})
    spec = make_spec(work, actors, call)
    ray.init(num_cpus=os.cpu_count(), num_gpus=actors, include_dashboard=False, logging_level="ERROR", _temp_dir=str(work / "ray"))
    images = work / "out" / "images"
    before = set(images.iterdir()) if images.is_dir() else set()
    first: dict = {}
    start = time.perf_counter()

    def watch() -> None:
        while "at" not in first and not first.get("stop"):
            if images.is_dir() and any(p.name.startswith("part-") and p not in before for p in images.iterdir()):
                first["at"] = time.perf_counter() - start
            time.sleep(0.2)  # a sampling period, not synchronisation

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run(spec, stage=stage)
    wall = time.perf_counter() - start
    first["stop"] = True
    ray.shutdown()
    return {"wall": wall, "first_part": first.get("at"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "images": summary.images, "startup": summary.startup_seconds, "block_rows": summary.block_rows}


def one_process(work: Path, call: int, seconds: float, rows_limit: int) -> dict:
    """The same blocks through the same code in this process, one engine: read units,
    validate with the duplicate-id record, cut blocks, the sleeping stage, parts written by
    the sink. Returns rows/s (and rows/s with the engine's sleep taken out)."""
    import pyarrow as pa

    from pipeline.engine.resolve_catalog import build_catalog
    from pipeline.engine.table_generation import BlockTimes, ImageEncoder, generate_table
    from pipeline.batch.reading import cut
    from pipeline.spec.bucketing import block_rows, order_for_engine
    from pipeline.spec.duplicate_ids import SeenIds, id_batches
    from pipeline.spec.validate import Validator
    from pipeline.storage import filesystem, part_files
    from pipeline.storage.units import plan_units, read_unit
    from simulated_scale import SleepEngine, SleepModels

    spec = make_spec(work, 8, call)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"url": str(work / "one")})})
    catalog = build_catalog(spec)
    table = plan_units(spec.input)
    size = block_rows("auto", table.rows, 8, call)
    validator, seen = Validator(spec, catalog), SeenIds()
    models, encoder = SleepModels(SleepEngine(seconds, call)), ImageEncoder("png", 95, 1)
    fs, root = filesystem.open_url(spec.output.url)
    done, slept, pending = 0, 0.0, []
    start = time.perf_counter()
    for unit in table.units:
        def validated():
            for chunks, repeats in id_batches(read_unit(spec.input, unit), "id", lambda ids, last: seen.register(*ids)):
                v = validator.__class__(spec, catalog, duplicates=repeats)
                yield from (order_for_engine(v.validate_table(c)) for c in chunks)

        for block in cut(validated(), size):
            times = BlockTimes()
            pending.append(generate_table(models, block, "one", "one", encoder, times))
            slept += -(-block.num_rows // call) * seconds
            done += block.num_rows
            if sum(t.num_rows for t in pending) >= 5000:
                part_files.write_block(fs, root, "one", pa.concat_tables(pending, promote_options="permissive"))
                pending = []
        if done >= rows_limit:
            break
    if pending:
        part_files.write_block(fs, root, "one", pa.concat_tables(pending, promote_options="permissive"))
    wall = time.perf_counter() - start
    return {"rows": done, "wall": wall, "rows_per_s": done / wall, "rows_per_s_without_sleep": done / (wall - slept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--actors", type=int, default=8)
    parser.add_argument("--call-images", type=int, default=64)
    parser.add_argument("--seconds-per-call", type=float, default=0.05)
    parser.add_argument("--baseline-rows", type=int, default=100_000, help="rows the one-process pass runs over")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--one-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.actors, args.call_images, args.seconds_per_call)))
        return
    if args.one_process:
        print(json.dumps(one_process(Path(args.one_process), args.call_images, args.seconds_per_call, args.baseline_rows)))
        return

    def sub(flag: str, work: Path) -> dict:
        command = [sys.executable, __file__, flag, str(work), "--actors", str(args.actors), "--call-images", str(args.call_images),
                   "--seconds-per-call", str(args.seconds_per_call), "--baseline-rows", str(args.baseline_rows)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = {}
    for rows in args.rows:
        work = Path(tempfile.mkdtemp(prefix="driver-scale-", dir="/tmp"))
        make_table(work / "p.parquet", rows)
        first = sub("--child", work)
        again = sub("--child", work)
        results[rows] = {"first": first, "again": again}
        if rows == args.rows[0]:
            results["one"] = sub("--one-process", work)
        print(rows, json.dumps(results[rows]), file=sys.stderr, flush=True)

    ideal = args.actors * args.call_images / args.seconds_per_call
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.actors} actors on logical GPUs, calls of "
          f"{args.call_images} images, {args.seconds_per_call} s per call (ideal {ideal:.0f} rows/s)")
    print("| rows | block rows | run s | first part s | driver peak RSS MB | rerun s | rerun RSS MB | rows/s | of ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        f, a = results[rows]["first"], results[rows]["again"]
        rate = rows / f["wall"]
        print(f"| {rows} | {f['block_rows']} | {f['wall']:.1f} | {f['first_part']:.1f} | {f['peak_rss_mb']:.0f} | {a['wall']:.1f} | "
              f"{a['peak_rss_mb']:.0f} | {rate:.0f} | {rate / ideal:.2f} |")
    one = results["one"]
    print(f"\none process, same code, one engine, {one['rows']} rows: {one['rows_per_s']:.0f} rows/s "
          f"({one['rows_per_s_without_sleep']:.0f} rows/s with the engine's sleep taken out)")


if __name__ == "__main__":
    main()
