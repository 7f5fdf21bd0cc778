"""Orchestration at simulated scale: the real job with an engine that sleeps.

The engine actors are the job's own `ActorEngines` with the engine swapped for one that
sleeps a fixed time per batch and returns blank images, so 64 "GPU" actors (logical GPUs)
fit on a small machine. Everything else is the real pipeline: read, validation, re-blocking,
actor pool, encoding, atomic Parquet parts, manifest.

Efficiency = ideal time / measured time, with ideal = calls / actors x sleep per call.
It is reported overall and after start-up: measured from the moment the last engine actor
was ready (the run summary's ``startup_seconds``). Start-up here is 64 Ray worker
processes starting on 2 cores (about 2 CPU-seconds each, Ray's and Ray Data's own
imports), which on a cluster happens on each node in parallel and where model loading
takes its place; after start-up is the orchestration's own share: feeding the first
blocks, keeping actors fed, the tail of the last blocks, and writing the output.
Engine utilization (from the run summary) = the actors' seconds in (sleeping) calls over
the seconds each was up, from its start to the job's end. Each size runs in its own
process, so the driver's peak RSS is that run's.

    .venv/bin/python benchmarks/simulated_scale.py --actors 64 --rows 10000 100000 \
        --call-images 16 --seconds-per-call 1.33
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"

from pipeline.engine.engine import GenerationResult  # noqa: E402
from pipeline.engine.resident_models import CacheStats  # noqa: E402
from pipeline.engine.table_generation import ImageEncoder  # noqa: E402
from pipeline.batch.engine_actors import ActorEngines  # noqa: E402
from pipeline.engine.kernels import CompileClock  # noqa: E402


class SleepEngine:
    """Generates nothing: sleeps ``seconds_per_call`` per diffusers-sized call of at most
    ``call_images`` images, returns black images."""

    scheduler_name = "sleep"  # the scheduler class an engine records per image

    def __init__(self, seconds_per_call: float, call_images: int):
        self.seconds_per_call = seconds_per_call
        self.call_images = call_images

    def call_size(self, request) -> int:
        return self.call_images

    def generate(self, requests):
        import numpy as np

        calls = -(-len(requests) // self.call_images)
        time.sleep(self.seconds_per_call * calls)  # stands in for the GPU's work, not for synchronisation
        return [
            GenerationResult(pixels=np.zeros((r.height, r.width, 3), np.uint8), seconds=self.seconds_per_call / self.call_images)
            for r in requests
        ]


class SleepModels:
    """Stands in for the actor's model cache: one sleeping engine, nothing to load."""

    stats = CacheStats()
    resident = ["sleep"]

    def __init__(self, engine: SleepEngine):
        self.engine = engine

    def get(self, name: str) -> SleepEngine:
        return self.engine


class SleepStage(ActorEngines):
    SECONDS_PER_CALL = 1.0
    CALL_IMAGES = 16

    def __init__(self, spec, catalog, counter=None):  # noqa: D107 - the real stage's signature, no torch
        self.models = SleepModels(SleepEngine(self.SECONDS_PER_CALL, self.CALL_IMAGES))
        self.encoder = ImageEncoder(spec.output.format, spec.output.quality, 1)
        self._counter, self._reported = counter, self.models.stats
        self._compiled = CompileClock.totals()  # what ActorEngines reports compiles against
        self._ready()


def one_size(rows: int, actors: int, batch, call: int, seconds: float) -> dict:
    """Run in a child process: returns wall time and this process's peak RSS."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray

    from pipeline.batch.run import run
    from pipeline.spec.load import parse_spec

    work = Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))
    prompts = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:]]
    pacsv.write_csv(pa.table({"prompt": [prompts[i % len(prompts)] for i in range(rows)]}), work / "p.csv")
    SleepStage.SECONDS_PER_CALL, SleepStage.CALL_IMAGES = seconds, call
    spec = parse_spec({
        "input": {"url": str(work / "p.csv")},
        # max_batch_pixels: calls of `call` 8x8 images, as the sleeping engine makes.
        "model": {"ref": "tiny", "cache_dir": str(work / "cache"), "device": "cpu", "engine": {"max_batch_pixels": call * 64}},
        "defaults": {"width": 8, "height": 8, "steps": 1},
        "output": {"url": str(work / "out"), "rows_per_part": 5000},
        "runtime": {"num_actors": actors, "gpus_per_actor": 1, "cpus_per_actor": 0.01, "task_cpus": 0.25, "batch_size": batch,
                    "progress_interval_s": 1},
    })
    ray.init(num_cpus=os.cpu_count(), num_gpus=actors, include_dashboard=False, logging_level="ERROR", _temp_dir=str(work / "ray"))
    start = time.perf_counter()
    summary = run(spec, stage=SleepStage)
    wall = time.perf_counter() - start
    ray.shutdown()
    assert summary.images == rows, summary
    return {
        "rows": rows,
        "wall": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engine_seconds": summary.engine_seconds,
        "utilization": summary.engine_utilization,
        "startup": summary.startup_seconds,
        "block_rows": summary.block_rows,
    }


LOW, HIGH = 0.2, 0.8
_PROGRESS = re.compile(r"progress: (\d+)/\d+ rows.*elapsed (\d+):(\d+)(?::(\d+))?")


def steady_window(log: str, rows: int):
    """Seconds the job took from LOW to HIGH of its rows done, read from its progress lines
    (one a second). Start-up, which overlaps the first actors' work when 64 actor processes
    start on 2 cores, and the tail are outside the window; differencing two sizes does not
    cancel start-up when it overlaps work. None when the window spans under 5 lines."""
    points = []
    for match in _PROGRESS.finditer(log):
        done, a, b, c = match.groups()
        seconds = int(a) * 3600 + int(b) * 60 + int(c) if c else int(a) * 60 + int(b)
        points.append((int(done), seconds))

    def first_at(fraction):
        return next((t for done, t in points if done >= fraction * rows), None)

    low, high = first_at(LOW), first_at(HIGH)
    if low is None or high is None or high - low < 5:
        return None
    return high - low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs=2, default=[10000, 100000], metavar=("N1", "N2"))
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="rows per actor block (runtime.batch_size): a number, or auto")
    parser.add_argument("--call-images", type=int, default=16, help="images per simulated diffusers call")
    parser.add_argument("--seconds-per-call", type=float, default=1.0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args.child, args.actors, args.batch_size, args.call_images, args.seconds_per_call)))
        return

    results = {}
    for rows in args.rows:
        command = [sys.executable, __file__, "--child", str(rows), "--actors", str(args.actors),
                   "--batch-size", str(args.batch_size), "--call-images", str(args.call_images),
                   "--seconds-per-call", str(args.seconds_per_call)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[rows] = json.loads(done.stdout.strip().splitlines()[-1])
        results[rows]["window"] = steady_window(done.stderr, rows)

    def ideal(rows: int) -> float:
        calls = -(-rows // args.call_images)
        return calls / args.actors * args.seconds_per_call

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.actors} actors on logical GPUs, "
          f"blocks of {args.batch_size} rows, calls of {args.call_images} images, {args.seconds_per_call} s per call")
    print("| rows | block rows | wall s | start-up s | ideal s | efficiency overall | after start-up | engine utilization | driver peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        r = results[rows]
        after = ideal(rows) / (r["wall"] - r["startup"])
        print(f"| {rows} | {r['block_rows']} | {r['wall']:.1f} | {r['startup']:.1f} | {ideal(rows):.1f} | {ideal(rows) / r['wall']:.2f} | {after:.2f} "
              f"| {r['utilization']:.2f} | {r['peak_rss_mb']:.0f} |")
    ideal_rate = args.actors * args.call_images / args.seconds_per_call
    print()
    print(f"Steady window: rows/s between {LOW:.0%} and {HIGH:.0%} of the rows done (from the job's progress lines), "
          f"against the ideal {ideal_rate:.0f} rows/s")
    print("| rows | window s | rows/s | window efficiency |")
    print("|---|---|---|---|")
    for rows in args.rows:
        window = results[rows]["window"]
        if window:
            rate = (HIGH - LOW) * rows / window
            print(f"| {rows} | {window:.0f} | {rate:.0f} | {rate / ideal_rate:.2f} |")
        else:
            print(f"| {rows} | too short to measure | | |")


if __name__ == "__main__":
    main()
