"""A generated block lost with its node before its part is written.

Run by tests/test_faults.py in its own process (it needs its own multi-node cluster):
    python tests/lost_block_scenario.py WORKDIR
A head and two workers, one engine actor on each worker. The engine on the "kept" worker
waits until the other worker is gone, so the first blocks are all made on the "doomed"
one, and they are big enough (over Ray's 100 KB inline limit) to live in that node's
object store only. The feed's first part write removes the doomed node just before it
launches: the write's input is lost with it (Ray cannot make an actor call's output
again), and so are the doomed engine's other unwritten blocks. Prints one JSON line: what
was written, which blocks each engine made, and the feed's fault counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.batch.dispatch import Dispatcher

BLOCKS, ROWS = 6, 2
PAD = 200_000  # bytes a generated row carries: the block stays in its node's object store
WAIT_S = 120  # how long the kept engine waits for the other node to go (a bound, not a sleep)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Engine:
    """Makes a block: its rows with a large pad column; notes each call in ``work``
    (the actor's own state goes with its node). The engine named ``kept`` makes nothing
    until ``doomed-gone`` exists."""

    def __init__(self, name: str, work: str):
        self.name, self.work = name, Path(work)

    def generate(self, block: pa.Table):
        if self.name == "kept":
            deadline = time.monotonic() + WAIT_S
            while not (self.work / "doomed-gone").exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # polling a file another process creates
        first = block.column("x")[0].as_py()
        with open(self.work / "made.txt", "a") as f:
            f.write(f"{self.name} {first}\n")
        return block.append_column("pad", pa.array([b"x" * PAD] * block.num_rows, pa.binary())), block.num_rows

    def ready(self) -> bool:
        return True


def main(workdir: str) -> None:
    work = Path(workdir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    cluster.add_node(num_cpus=1, resources={"kept": 1})
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    on_head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0)
    def read(unit: int):
        for b in range(BLOCKS):
            yield pa.table({"x": list(range(b * ROWS, (b + 1) * ROWS))})

    @ray.remote(num_cpus=0, max_retries=0)
    def write(bounds, *blocks):
        return [x for b, (start, stop) in zip(blocks, bounds) for x in b.column("x").to_pylist()[start:stop]]

    engines = [Engine.options(resources={name: 1}).remote(name, str(work)) for name in ("doomed", "kept")]
    removed: list[bool] = []

    def write_part(slices):
        if not removed:  # the first part's block was made on the doomed node: it goes now
            cluster.remove_node(doomed)
            removed.append(True)
            (work / "doomed-gone").touch()
        refs = [ref for ref, _, _ in slices]
        return write.options(scheduling_strategy=on_head).remote([(a, b) for _, a, b in slices], *refs)

    feed = Dispatcher(
        units=[0], start_read=lambda unit: read.options(num_returns="streaming", scheduling_strategy=on_head).remote(unit),
        actors=engines, write=write_part, rows_per_part=ROWS, lookahead=BLOCKS,
    )
    written = [x for part in feed.run() for x in part]
    made = [line.split() for line in (work / "made.txt").read_text().splitlines()]
    print(json.dumps({
        "written": written,
        "made": [[name, int(first)] for name, first in made],
        "faults": feed.faults.__dict__,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
