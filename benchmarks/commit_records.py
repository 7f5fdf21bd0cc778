"""Reading the commit records of a large output: seconds, not minutes.

Builds a synthetic output of ``--images`` committed images in parts of ``--rows-per-part``
rows (empty stand-in part files: adoption checks a part's presence and size, not its
bytes), committed either by one record per part (a run that died before its end) or by
one compacted record per run of ``--run-images`` (runs that finished), then times
:func:`~pipeline.storage.commit_protocol.read_commits` and building the skip filter from it, and
reports the driver's peak RSS.

    .venv/bin/python benchmarks/commit_records.py --images 10000000 --rows-per-part 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.storage import commit_protocol, filesystem, record_format  # noqa: E402


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
            parts.append(record_format.PartEntry(path, n, 0, "0" * 64, rng.integers(0, 2**63, n, dtype=np.uint64), np.empty(0, np.uint64)))
        groups = [parts] if compacted else [[p] for p in parts]
        for group in groups:
            name = record_format.record_name(run_id, group, compacted=compacted)
            record = record_format.Record(name, run_id, time.time(), group, {"images": sum(p.rows for p in group)})
            (root / name).write_bytes(record_format.encode_record(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--rows-per-part", type=int, default=5000)
    parser.add_argument("--run-images", type=int, default=1_000_000, help="images per run (one compacted record each)")
    parser.add_argument("--compacted", action="store_true", help="one record per run, not per part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="commit-records-") as work:
        root = Path(work) / "out"
        t0 = time.perf_counter()
        build(root, args.images, args.rows_per_part, args.run_images, args.compacted)
        built = time.perf_counter() - t0
        records = sum(1 for _ in (root / "_commits").rglob("*.commit"))
        size = sum(p.stat().st_size for p in (root / "_commits").rglob("*.commit"))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fs, path = filesystem.open_url(str(root))
        t0 = time.perf_counter()
        found = commit_protocol.read_commits(fs, path)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        skip = found.ids()
        ids_s = time.perf_counter() - t0
        probe = np.random.default_rng(1).integers(0, 2**63, 1_000_000, dtype=np.uint64)
        t0 = time.perf_counter()
        skip.contains(probe)
        probe_s = time.perf_counter() - t0
        print(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
            "images": args.images,
            "rows_per_part": args.rows_per_part,
            "records": records,
            "record_bytes": size,
            "compacted": args.compacted,
            "build_s": round(built, 1),
            "read_commits_s": round(read_s, 2),
            "skip_filter_s": round(ids_s, 2),
            "skip_filter_bytes": skip.nbytes,
            "contains_1M_s": round(probe_s, 3),
            "orphans": len(found.orphans),
            "peak_rss_mb_before_read": round(rss_before),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }, indent=2))


if __name__ == "__main__":
    main()
