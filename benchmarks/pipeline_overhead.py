"""Pipeline overhead: the whole Ray job against a bare loop over the same engine.

Both sides generate the same real prompts (PartiPrompts) with the same tiny model, size
and steps, and PNG-encode every image; the Ray job also validates, moves blocks between
stages and writes Parquet. Reported: images/s for each and their ratio, overall (start-up
included) and in steady state; and, from the run summary, the seconds the engine actors
spent in diffusers calls against the seconds they sat waiting for image encoding (which
runs on a thread pool beside the calls, so this should stay near zero). Steady state is taken by differencing two run sizes,
(N2 - N1) / (T(N2) - T(N1)), which cancels every fixed cost (Ray start, actor start,
model load) on both sides alike.

    .venv/bin/python benchmarks/pipeline_overhead.py --rows 200 400 --size 128 --steps 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def prompts(n: int) -> list[str]:
    lines = PARTI.read_text(encoding="utf-8").splitlines()[1:]
    return [lines[i % len(lines)].split("\t")[0] for i in range(n)]


def bare_loop(n: int, args, cache: str) -> float:
    """Build the engine and generate + encode n images in this process, batch by batch."""
    import torch

    from pipeline.engine.image_encoding import encode_image
    from pipeline.engine.engine import Engine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.spec.model_config import ModelConfig

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    engine = Engine(ModelConfig(ref="tiny", cache_dir=cache, device="cpu"))
    texts = prompts(n)
    for first in range(0, n, args.batch_size):
        batch = [
            GenerationRequest(t, "", first + i, args.size, args.size, args.steps, 7.5)
            for i, t in enumerate(texts[first : first + args.batch_size])
        ]
        for result in engine.generate(batch):
            encode_image(result.pixels, "png")
    return time.perf_counter() - start


def ray_job(n: int, args, cache: str, work: Path) -> tuple[float, object]:
    """The whole job through `pipeline.batch.run.run`, Ray start-up included; its wall time and summary."""
    import ray

    from pipeline.batch.run import run
    from pipeline.spec.load import parse_spec

    table = work / f"prompts-{n}.csv"
    pacsv.write_csv(pa.table({"prompt": prompts(n)}), table)
    spec = parse_spec({
        "input": {"url": str(table)},
        "model": {"ref": "tiny", "cache_dir": cache, "device": "cpu"},
        "defaults": {"width": args.size, "height": args.size, "steps": args.steps},
        "output": {"url": str(work / f"out-{n}"), "mode": "overwrite"},
        "runtime": {"num_actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "task_cpus": 0.5, "batch_size": args.batch_size},
    })
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", _temp_dir=str(work / "ray"))
    try:
        summary = run(spec)
    finally:
        ray.shutdown()
    assert summary.images == n, summary
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[200, 400], metavar=("N1", "N2"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    cache = str(work / "cache")
    from pipeline.engine.tiny_models import ensure_tiny

    ensure_tiny(cache)
    n1, n2 = args.rows
    times, summaries = {}, {}
    for n in (n1, n2):
        times[("bare", n)] = bare_loop(n, args, cache)
        times[("ray", n)], summaries[n] = ray_job(n, args, cache, work)
    shutil.rmtree(work, ignore_errors=True)

    def rate(side: str, n: int) -> float:
        return n / times[(side, n)]

    def steady(side: str) -> float:
        return (n2 - n1) / (times[(side, n2)] - times[(side, n1)])

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"tiny SD {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
          f"Ray: {args.actors} actors x {args.cpus_per_actor} CPU")
    print("| measure | bare loop img/s | Ray job img/s | ratio |")
    print("|---|---|---|---|")
    for n in (n1, n2):
        print(f"| overall, {n} rows (start-up included) | {rate('bare', n):.2f} | {rate('ray', n):.2f} | {rate('ray', n) / rate('bare', n):.2f} |")
    print(f"| steady state ({n2}-{n1} rows) | {steady('bare'):.2f} | {steady('ray'):.2f} | {steady('ray') / steady('bare'):.2f} |")
    print()
    print("| Ray job | engine seconds (all actors) | waiting on encoding | share |")
    print("|---|---|---|---|")
    for n, s in summaries.items():
        share = s.encode_wait_seconds / s.engine_seconds if s.engine_seconds else 0.0
        print(f"| {n} rows | {s.engine_seconds:.1f} | {s.encode_wait_seconds:.2f} | {share:.1%} |")


if __name__ == "__main__":
    main()
