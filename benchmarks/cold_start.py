"""Cold start: seconds from `imagegen run` of the demo to its first committed image.

Runs the real command in a fresh process (a new local Ray each time) with small parts,
so the first part lands as soon as the first images are encoded, and polls the output
for it. Reported per repetition: time to first committed part, and to the finished run.
Two settings: the tiny model already in the cache (the usual case), and an empty cache
(the model is built first).

    .venv/bin/python benchmarks/cold_start.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(cache: str, work: Path) -> tuple[float, float]:
    out = work / f"out-{time.monotonic_ns()}"
    command = [
        sys.executable, "-m", "pipeline.cli", "run", "jobs/demo.yaml",
        "--set", f"output.url={out}", "--set", f"model.cache_dir={cache}", "--set", "output.rows_per_part=8",
    ]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    images = out / "images"
    while process.poll() is None:
        if first is None and images.is_dir() and any(p.name.startswith("part-") for p in images.iterdir()):
            first = time.perf_counter() - start
        time.sleep(0.02)  # polling resolution of the measurement, not synchronisation
    total = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"imagegen run failed with exit code {process.returncode}")
    return (first if first is not None else total), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cold-", dir="/tmp"))
    warm_cache = str(work / "warm-cache")
    one_run(warm_cache, work)  # fills the cache
    rows = {"model cached": [one_run(warm_cache, work) for _ in range(args.repeat)]}
    rows["empty model cache"] = [one_run(str(work / f"cold-{i}"), work) for i in range(args.repeat)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; demo: 64 rows, tiny model 64x64, 4 steps, 2 actors")
    print("| setting | first committed image, s (median) | whole run, s (median) | runs |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        firsts, totals = zip(*values)
        print(f"| {name} | {statistics.median(firsts):.1f} | {statistics.median(totals):.1f} | {len(values)} |")


if __name__ == "__main__":
    main()
