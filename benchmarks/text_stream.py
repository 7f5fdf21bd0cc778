"""A big text file in one read task: seconds to its first rows and the task's peak memory.

One CSV, TSV or JSONL file of PartiPrompts prompts with an id and a seed column, read
the way a read task reads its unit (``storage.units.read_unit``, which streams text
files a block at a time), against the baseline run side by side: the same rows held
whole before the first one is used (``list(read_unit(...))``, which is what a read task
did before text files were streamed: its first block came after the whole file). Each
measurement runs in its own process, so the peak RSS is that reader's alone.

    .venv/bin/python benchmarks/text_stream.py --rows 1000000 --formats csv tsv jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def make_file(path: Path, fmt: str, rows: int) -> None:
    prompts = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:]]
    with open(path, "w", newline="") as f:
        if fmt == "jsonl":
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "prompt": prompts[i % len(prompts)], "seed": i}) + "\n")
            return
        writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(["id", "prompt", "seed"])
        for i in range(rows):
            writer.writerow([f"r{i}", prompts[i % len(prompts)], i])


def child(path: Path, fmt: str, whole: bool) -> dict:
    from pipeline.spec.config import InputConfig
    from pipeline.storage.units import plan_units, read_unit

    inp = InputConfig(url=str(path), format=fmt, id_column="id")
    (unit,) = plan_units(inp).units
    start = time.perf_counter()
    chunks = list(read_unit(inp, unit)) if whole else read_unit(inp, unit)
    first, rows = None, 0
    for chunk in chunks:
        if first is None:
            first = time.perf_counter() - start
        rows += chunk.num_rows
    return {
        "first": first,
        "all": time.perf_counter() - start,
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", nargs="+", default=["csv", "tsv", "jsonl"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, fmt, whole = args.child
        print(json.dumps(child(Path(path), fmt, whole == "whole")))
        return

    def sub(path: Path, fmt: str, how: str) -> dict:
        done = subprocess.run([sys.executable, __file__, "--child", str(path), fmt, how], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    work = Path(tempfile.mkdtemp(prefix="text-stream-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.rows} rows per file")
    print("| format | file MB | reader | first rows s | all rows s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats:
        path = work / f"prompts.{fmt}"
        make_file(path, fmt, args.rows)
        size = path.stat().st_size / 2**20
        for how, name in (("whole", "held whole (baseline)"), ("stream", "streamed")):
            r = sub(path, fmt, how)
            assert r["rows"] == args.rows, r
            print(f"| {fmt} | {size:.0f} | {name} | {r['first']:.2f} | {r['all']:.2f} | {r['peak_rss_mb']:.0f} |", flush=True)
        path.unlink()


if __name__ == "__main__":
    main()
