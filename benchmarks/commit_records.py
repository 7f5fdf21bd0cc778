"""Reading the commit records of a large output: seconds, not minutes.

Builds a synthetic output of ``--images`` committed images in parts of ``--rows-per-part``
rows (empty stand-in part files: adoption checks a part's presence and size, not its
bytes), committed either by one record per part (a run that died before its end) or by
one compacted record per run of ``--run-images`` (runs that finished), then times
:func:`~pipeline.storage.commit_protocol.read_commits` and building the skip filter from it
as the job's prepare does (the records' keys let go as they are taken), and reports the
peak RSS of a fresh process that only reads, and what it grew by while reading, per image.
``--interrupted`` makes every run an interrupted one (a resume after a crash: every id
adoptable, whose 8-byte prefixes the filter keeps too).

    .venv/bin/python benchmarks/commit_records.py --images 10000000 --rows-per-part 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.storage import commit_protocol, filesystem, record_format, skip_filter  # noqa: E402


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 16), dtype=np.uint8).view(skip_filter.KEY).ravel()


def build(root: Path, images: int, rows_per_part: int, run_images: int, compacted: bool) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for run_index, run_start in enumerate(range(0, images, run_images)):
        run_id = f"20260101T{run_index:06d}Z-{run_index:08x}"
        (root / "_commits" / run_id).mkdir(parents=True)
        parts = []
        for start in range(run_start, min(images, run_start + run_images), rows_per_part):
            n = min(rows_per_part, images - start)
            path = f"images/part-{run_id}-{start:012d}.parquet"
            (root / path).write_bytes(b"")
            parts.append(record_format.PartEntry(path, n, 0, "0" * 64, random_keys(rng, n), random_keys(rng, 0)))
        groups = [parts] if compacted else [[p] for p in parts]
        for group in groups:
            name = record_format.record_name(run_id, group, compacted=compacted)
            record = record_format.Record(name, run_id, time.time(), group, {"images": sum(p.rows for p in group)})
            (root / name).write_bytes(record_format.encode_record(record))


def memory_mb(field: str) -> float:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (peak) in MB. Not ``ru_maxrss``: Linux
    carries the parent's size at fork into a child's ``ru_maxrss`` across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def read(root: str, images: int, interrupted: bool) -> dict:
    """Read the output at ``root`` as the job's prepare does, in this (fresh) process: the
    growth of its peak RSS over what its imports took is what reading costs."""
    rss_before = memory_mb("VmRSS")
    fs, path = filesystem.open_url(root)
    t0 = time.perf_counter()
    found = commit_protocol.read_commits(fs, path)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    skip = found.skip_filter(interrupted=list(found.runs()) if interrupted else (), release=True)
    ids_s = time.perf_counter() - t0
    peak = memory_mb("VmHWM")  # the resume's: the lookups below are the read tasks', elsewhere
    probe = random_keys(np.random.default_rng(1), 1_000_000)
    t0 = time.perf_counter()
    skip.contains(probe)
    probe_s = time.perf_counter() - t0
    return {
        "read_commits_s": round(read_s, 2),
        "skip_filter_s": round(ids_s, 2),
        "skip_filter_bytes": skip.committed.nbytes + skip.adoptable.nbytes,
        "contains_1M_s": round(probe_s, 3),
        "orphans": len(found.orphans),
        "rss_mb_before_reading": round(rss_before),
        "peak_rss_mb": round(peak),
        "bytes_per_image_while_reading": round((peak - rss_before) * 2**20 / images, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--rows-per-part", type=int, default=5000)
    parser.add_argument("--run-images", type=int, default=1_000_000, help="images per run (one compacted record each)")
    parser.add_argument("--compacted", action="store_true", help="one record per run, not per part")
    parser.add_argument("--interrupted", action="store_true", help="every run interrupted: every id adoptable (a resume after a crash)")
    parser.add_argument("--read", metavar="ROOT", help=argparse.SUPPRESS)  # the reading child
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(args.read, args.images, args.interrupted)))
        return
    with tempfile.TemporaryDirectory(prefix="commit-records-") as work:
        root = Path(work) / "out"
        t0 = time.perf_counter()
        build(root, args.images, args.rows_per_part, args.run_images, args.compacted)
        built = time.perf_counter() - t0
        records = sum(1 for _ in (root / "_commits").rglob("*.commit"))
        size = sum(p.stat().st_size for p in (root / "_commits").rglob("*.commit"))
        child = [sys.executable, __file__, "--read", str(root), "--images", str(args.images), *(["--interrupted"] if args.interrupted else [])]
        measured = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "images": args.images,
            "rows_per_part": args.rows_per_part,
            "records": records,
            "record_bytes": size,
            "compacted": args.compacted,
            "interrupted": args.interrupted,
            "build_s": round(built, 1),
            **measured,
        }, indent=2))


if __name__ == "__main__":
    main()
