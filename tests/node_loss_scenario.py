"""A worker node removed mid-job, on a several-node cluster with logical GPUs.

Run by tests/test_faults.py in its own process (it needs its own multi-node cluster):
    python tests/node_loss_scenario.py WORKDIR MODEL_CACHE PROMPT_TABLE ROWS
Prints one JSON line: the job summary and what the scenario observed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.batch.run import run
from pipeline.spec.load import parse_spec


# A job that commits no part for this long is reported as stuck, with its stack, before the
# test's own timeout: a hang detector on progress, not a bound on the job's time.
STALL_S = 120


def main(workdir: str, cache: str, table: str, rows: int) -> None:
    work = Path(workdir)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    spec = parse_spec({
        "input": {"url": table, "id_column": "id"},  # the id registry actor too
        "model": {"ref": "tiny", "cache_dir": cache, "device": "cpu"},
        "defaults": {"width": 64, "height": 64, "steps": 4},
        "output": {"url": str(work / "out"), "rows_per_part": 4},
        # One engine actor per (logical) GPU: each lands on its own worker node.
        "runtime": {"num_actors": 2, "gpus_per_actor": 1, "cpus_per_actor": 0.5, "task_cpus": 0.25, "batch_size": 4},
    })
    result: dict = {}

    def job_body() -> None:
        try:
            result["summary"] = run(spec).__dict__
        except Exception:  # noqa: BLE001 - reported in the JSON line, for the test to show
            result["error"] = traceback.format_exc()

    job = threading.Thread(target=job_body)
    job.start()
    images = work / "out" / "images"
    deadline = time.monotonic() + 180
    while not (images.is_dir() and any(images.iterdir())):
        if time.monotonic() > deadline or not job.is_alive():
            raise SystemExit("no part was committed before the deadline")
        time.sleep(0.1)
    parts_before = len(list(images.iterdir()))
    bookkeeping = {a["ActorClassName"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                   if a["ActorClassName"] in ("ProgressCounter", "IdRegistry") and a["State"] == "ALIVE"}
    driver_node = ray.get_runtime_context().get_node_id()
    cluster.remove_node(workers[1])
    parts, progressed = parts_before, time.monotonic()
    while job.is_alive() and time.monotonic() - progressed < STALL_S:
        job.join(timeout=1)
        if len(list(images.iterdir())) > parts:
            parts, progressed = len(list(images.iterdir())), time.monotonic()
    observed = {"error": result.get("error"), "parts_when_removed": parts_before, "finished": not job.is_alive(), "nodes_alive": sum(n["Alive"] for n in ray.nodes()),
                "bookkeeping_on_driver_node": {name: node == driver_node for name, node in bookkeeping.items()}}
    if job.is_alive():  # where it is stuck, for the test's failure message
        observed["stuck_at"] = "".join(traceback.format_stack(sys._current_frames()[job.ident]))
    summary = {k: v for k, v in result.get("summary", {}).items() if k not in ("parts", "recovery")}
    print(json.dumps({"summary": summary, **observed}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
