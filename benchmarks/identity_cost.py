"""What content identity costs: ``imagegen validate`` (every row validated in one process)
of one table without an id column, by position (``input.identity: position``, the scheme-2
identity) and by content (the default: each row's content digest and its occurrence among
identical rows, counted in table order), side by side, alternating, in this process. Also
the numbering alone (read + digest + count) against the read alone. Each as the process's
CPU seconds (steady on a shared machine) and wall seconds.

The table: one Parquet file, row groups of 50k rows, a prompt (PartiPrompts-like text, 1 in
10 rows a repeat of another) and a width column.

    .venv/bin/python benchmarks/identity_cost.py --rows 1000000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def table(rows: int) -> pa.Table:
    prompts = [f"a watercolor painting of object number {i % (rows - rows // 10)} on a hill at dawn" for i in range(rows)]
    return pa.table({"prompt": prompts, "width": pa.array([32] * rows, pa.int64())})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from pipeline.batch.plan import make_plan
    from pipeline.spec.load import parse_spec
    from pipeline.spec.occurrences import numbered
    from pipeline.storage import tables

    folder = tempfile.mkdtemp(prefix="identity-cost-")
    path = os.path.join(folder, "p.parquet")
    pq.write_table(table(args.rows), path, row_group_size=50_000)

    def spec(identity: str):
        return parse_spec({
            "input": {"url": path, "identity": identity},
            "model": {"ref": "tiny"},
            "defaults": {"width": 32, "height": 32, "steps": 1},
            "output": {"url": os.path.join(folder, f"out-{identity}")},
        })  # fmt: skip

    cpu: dict[str, list[float]] = {"validate position": [], "validate content": [], "read": [], "read + number": []}
    wall: dict[str, list[float]] = {k: [] for k in cpu}

    def timed(name: str, work) -> int:
        started, started_cpu = time.perf_counter(), time.process_time()
        rows = work()
        cpu[name].append(time.process_time() - started_cpu)
        wall[name].append(time.perf_counter() - started)
        return rows

    for _ in range(args.repeats):
        for identity in ("position", "content"):
            s = spec(identity)
            assert timed(f"validate {identity}", lambda: make_plan(s, on_cluster=False).valid_rows) == args.rows
        s = spec("content")
        assert timed("read", lambda: sum(c.num_rows for c in tables.read_input(s.input))) == args.rows
        assert timed("read + number", lambda: sum(c.num_rows for c in numbered(tables.read_input(s.input), s.input))) == args.rows
    per_million = lambda times: {k: round(min(v) * 1e6 / args.rows, 1) for k, v in times.items()}  # noqa: E731
    cpu_m = per_million(cpu)
    print(json.dumps({
        "rows": args.rows, "repeats": args.repeats, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average": os.getloadavg()[0], "cpu_seconds_per_million_rows": cpu_m, "wall_seconds_per_million_rows": per_million(wall),
        "validate_content_over_position_cpu": round(cpu_m["validate content"] / cpu_m["validate position"], 3),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
