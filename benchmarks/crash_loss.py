"""Crash loss and resume: how much work a SIGKILLed driver throws away.

The demo's settings (``jobs/demo.yaml``: the tiny model, two engine actors at half a CPU,
blocks of 8 rows) on ``--rows`` PartiPrompts rows in one Parquet file with an id column,
``output.mode: incremental`` and ``output.rows_per_part: 16``:

1. ``imagegen run`` starts in its own process group; the output is polled (never slept
   on) until at least ``--kill-at`` of the rows are in image parts on disk, then the
   group is SIGKILLed (the driver and the local Ray it started);
2. the same command runs again: images generated again = those of its images whose
   request id was already on disk at the kill; crash loss = that over the images on disk;
3. the same command once more on the now complete output: the resume figure (wall
   seconds, images made: 0 expected);
4. ``imagegen verify`` with the spec after each.

    .venv/bin/python benchmarks/crash_loss.py --rows 400 --kill-at 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def rows_on_disk(out: Path) -> int:
    """Rows in the image parts present now (committed or not): what a user sees on disk."""
    folder = out / "images"
    total = 0
    for part in folder.glob("part-*.parquet") if folder.is_dir() else []:
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 - a part being renamed into place: counted next poll
            continue
    return total


def ids_on_disk(out: Path) -> set[str]:
    folder = out / "images"
    return set(pd.read_parquet(folder, columns=["request_id"])["request_id"]) if folder.is_dir() and any(folder.iterdir()) else set()


def run_command(command: list[str], env: dict) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.stdout


def newest_manifest(out: Path) -> dict:
    manifests = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    return max(manifests, key=lambda m: m["run_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rows-per-part", type=int, default=16)
    parser.add_argument("--kill-at", type=float, default=0.7, help="share of rows on disk before the kill")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="crash-loss-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1 : args.rows + 1]]
    table = work / "prompts.parquet"
    pd.DataFrame({"id": [f"p{i:06d}" for i in range(len(prompts))], "Prompt": prompts}).to_parquet(table, row_group_size=50_000)
    out = work / "out"
    overrides = [
        f"input.url={table}", "input.id_column=id", f"output.url={out}", "output.mode=incremental",
        f"output.rows_per_part={args.rows_per_part}",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "jobs" / "demo.yaml")]
    for o in overrides:
        command += ["--set", o]
    verify = [sys.executable, "-m", "pipeline.cli", "verify", str(out), "--input", str(REPO / "jobs" / "demo.yaml")]
    for o in overrides:
        verify += ["--set", o]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp"), "PYTHONPATH": str(REPO)}

    target = int(args.kill_at * args.rows + 0.999)
    started = time.monotonic()
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while rows_on_disk(out) < target:
            if driver.poll() is not None:
                raise SystemExit("the run finished before the kill: use more rows")
            time.sleep(0.05)  # polling the output, not synchronising on time
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    killed_after = time.monotonic() - started
    on_disk = ids_on_disk(out)

    rerun_s, rerun_out = run_command(command, env)
    rerun = newest_manifest(out)
    images = pd.read_parquet(out / "images", columns=["request_id", "run_id"])
    made_again = int(images[images["run_id"] == rerun["run_id"]]["request_id"].isin(on_disk).sum())
    verify_after_crash = subprocess.run(verify, cwd=REPO, env=env, capture_output=True, text=True).returncode == 0

    resume_s, _ = run_command(command, env)
    resume = newest_manifest(out)
    verify_after_resume = subprocess.run(verify, cwd=REPO, env=env, capture_output=True, text=True).returncode == 0

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
        "rows": args.rows,
        "rows_per_part": args.rows_per_part,
        "killed_after_s": round(killed_after, 1),
        "images_on_disk_at_kill": len(on_disk),
        "rerun_images_made": rerun["counts"]["images"],
        "rerun_adopted": rerun.get("adopted", {}).get("requests"),
        "images_made_again": made_again,
        "crash_loss": round(made_again / len(on_disk), 4) if on_disk else None,
        "rerun_s": round(rerun_s, 1),
        "verify_after_rerun": verify_after_crash,
        "resume_s": round(resume_s, 1),
        "resume_images_made": resume["counts"]["images"],
        "verify_after_resume": verify_after_resume,
        "total_images": len(images),
        "unique_request_ids": int(images["request_id"].nunique()),
    }
    print(json.dumps(result, indent=2))
    print("\n".join(line for line in rerun_out.splitlines() if "adopted" in line or "recovered" in line))


if __name__ == "__main__":
    main()
