"""Faults injected into real components, each followed by the exact accounting check:
every input row in exactly one place, no request id twice, `verify` clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray import cloudpickle as ray_cloudpickle

from pipeline.batch.run import run
from pipeline.output.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parent.parent


def prompt_table(path: Path, prompts: Path, n: int) -> str:
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1 : n + 1]
    pd.DataFrame({"prompt": [line.split("\t")[0] for line in lines]}).to_csv(path, index=False)
    return str(path)


def committed_parts(out: Path) -> list[Path]:
    folder = out / "images"
    return [p for p in folder.iterdir() if p.name.startswith("part-")] if folder.is_dir() else []


def assert_exactly_once(spec, n_rows: int):
    report = verify(spec.output.url, spec=spec)
    assert report.ok, report.format()
    images = pd.read_parquet(Path(spec.output.url) / "images")
    assert len(images) == n_rows and images["request_id"].is_unique


def test_engine_actor_killed_mid_job(ray_cluster, make_spec, prompts, tmp_path, wait_for):
    n = 96  # about 10 s of generation: the kill lands mid-job
    spec = make_spec(
        {"url": prompt_table(tmp_path / "p.csv", prompts, n)},
        defaults={"width": 64, "height": 64, "steps": 4},
        output={"rows_per_part": 4},
    )
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run(spec)))
    job.start()
    out = Path(spec.output.url)
    wait_for(lambda: committed_parts(out), 120, "the first committed part")

    def engine_actor_pid():
        # The engine actors are the job's only actors that take CPUs; Ray titles
        # an actor's process after its class.
        for proc in Path("/proc").iterdir():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and "EngineActor" in title:
                return int(proc.name)
        return None

    pid = wait_for(engine_actor_pid, 30, "the engine actor's process")
    assert len(committed_parts(out)) < n // 4, "the job should still be running"
    os.kill(pid, signal.SIGKILL)
    job.join()  # a job that never ends fails on the test's timeout
    summary = result["summary"]
    assert (summary.images, summary.errors) == (n, 0)
    assert summary.faults["calls_lost"] >= 1  # the kill took the call it was running; another ran it
    assert_exactly_once(spec, n)


def commit_records(out: Path) -> list[Path]:
    folder = out / "_commits"
    return sorted(folder.rglob("*.commit")) if folder.is_dir() else []


@pytest.mark.timeout(600)  # two cold starts of a local Ray in subprocesses
def test_driver_killed_mid_job_then_same_command_again(model_cache, prompts, tmp_path, wait_for):
    """The driver SIGKILLed once some blocks are committed: the same command adopts them
    (generates fewer images than the table asks for), and the output is exactly once."""
    n = 120  # about 12 s of generation: the kill lands mid-job
    spec_path = tmp_path / "job.yaml"
    out = tmp_path / "out"
    spec_path.write_text(yaml.safe_dump({
        "input": {"url": prompt_table(tmp_path / "p.csv", prompts, n)},
        "model": {"ref": "tiny", "cache_dir": model_cache},
        "defaults": {"width": 64, "height": 64, "steps": 4},
        "output": {"url": str(out), "rows_per_part": 4, "mode": "incremental"},
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.5, "batch_size": 4},
    }))
    command = [sys.executable, "-m", "pipeline.cli", "run", str(spec_path)]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    # Its own session, so the kill takes the driver and the local Ray it started.
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(commit_records(out)) >= 3, 150, "three committed blocks")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    (killed,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert killed["status"] == "running", "the killed run must not have finished"
    on_disk = pd.read_parquet(out / "images")
    assert 0 < len(on_disk) < n, "the kill should land mid-job"
    from pipeline.output.inspect import inspect_output
    from pipeline.spec.load import load_spec

    seen = inspect_output(str(out), spec=load_spec(spec_path))
    assert [(r.run_id, r.status) for r in seen.runs] == [(killed["run_id"], "interrupted")]
    assert seen.spec_left == n - seen.images and seen.images >= 12

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "adopted" in again.stdout and killed["run_id"] in again.stdout
    manifests = {m["run_id"]: m for m in (json.loads(p.read_text()) for p in (out / "_runs").glob("*.json"))}
    rerun = next(m for run_id, m in manifests.items() if run_id != killed["run_id"])
    assert manifests[killed["run_id"]]["status"] == "interrupted"
    assert len(list((out / "_commits" / killed["run_id"]).glob("*.commit"))) == 1  # compacted on adoption
    committed_before = manifests[killed["run_id"]]["counts"]["images"]
    assert committed_before >= 12  # at least the three blocks seen committed
    assert rerun["counts"]["images"] == n - committed_before < n  # made only the rest
    assert rerun["adopted"] == {"requests": committed_before, "from_runs": [killed["run_id"]]}
    assert_exactly_once(load_spec(spec_path), n)


def test_a_nan_row_fails_alone_and_the_job_goes_on(ray_cluster, make_spec, tmp_path):
    rows = pd.DataFrame({"prompt": ["a kite", "a boat", "a fox"], "guidance_scale": ["", "1e30", ""]})
    rows.to_csv(tmp_path / "t.csv", index=False)
    # Raising the limit lets an absurd guidance scale through; CFG then overflows to NaN.
    spec = make_spec({"url": str(tmp_path / "t.csv")}, limits={"max_guidance_scale": 1e38}, runtime={"batch_size": 3})
    summary = run(spec)
    assert (summary.images, summary.errors, summary.errors_by_stage) == (2, 1, {"generate": 1})
    errors = pd.read_parquet(Path(spec.output.url) / "errors")
    assert errors.iloc[0]["error_type"] == "ImageIsNaN" and errors.iloc[0]["row_index"] == 1
    assert verify(spec.output.url, spec=spec).ok

    # Generation failures are retried by the next run; validation rejects are not.
    summary = run(spec)
    assert (summary.images, summary.errors) == (0, 1)
    # The retry's verdict replaces the first one: the row is in errors/ once, not twice.
    errors = pd.read_parquet(Path(spec.output.url) / "errors")
    assert len(errors) == 1 and errors.iloc[0]["run_id"] == summary.run_id
    assert_exactly_once(spec, 2)


def test_out_of_memory_halves_the_group_down_to_one(model_cache):
    import torch

    from pipeline.engine.engine import Engine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.spec.model_config import ModelConfig

    class SmallGPU(Engine):
        """An engine whose device 'holds' at most 2 images per call."""

        calls: list[int] = []

        def _call(self, batch):
            self.calls.append(len(batch))
            if len(batch) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated above 2 images)")
            return super()._call(batch)

    engine = SmallGPU(ModelConfig(ref="tiny", cache_dir=model_cache))
    requests = [GenerationRequest(f"p{i}", "", i, 32, 32, 2, 7.5) for i in range(7)]
    results = engine.generate(requests)
    assert all(r.ok for r in results)
    assert engine.calls == [7, 4, 2, 2, 3, 2, 1]
    plain = Engine(ModelConfig(ref="tiny", cache_dir=model_cache)).generate(requests)
    assert all((a.pixels.astype(int) - b.pixels.astype(int)).__abs__().max() <= 1 for a, b in zip(results, plain))


@pytest.mark.slow  # a three-node cluster and a node removed mid-job: most of a minute on 2 cores
@pytest.mark.timeout(480)  # the scenario reports a hang (with its stack) well before this
def test_worker_node_removed_mid_job(model_cache, prompts, tmp_path):
    n = 96
    table = prompt_table(tmp_path / "p.csv", prompts, n)
    pd.read_csv(table).rename_axis("id").reset_index().to_csv(table, index=False)  # the scenario names an id column
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "node_loss_scenario.py"), str(tmp_path), model_cache, table, str(n)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=450,
    )
    # Ray forwards worker logs to the driver's stdout too; the scenario's line is JSON.
    line = next((line for line in reversed(done.stdout.splitlines()) if line.startswith('{"summary"')), None)
    assert line is not None, done.stderr[-3000:]
    observed = json.loads(line)
    assert observed["error"] is None, observed["error"]
    assert observed["finished"], observed["stuck_at"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert observed["nodes_alive"] == 2  # head + the surviving worker
    # The job's counts and seen ids live on the driver's node, so no worker's loss takes them.
    assert observed["bookkeeping_on_driver_node"] == {"ProgressCounter": True, "IdRegistry": True}
    assert observed["parts_when_removed"] < n // 4, "the node must go while the job is running"
    assert (observed["summary"]["images"], observed["summary"]["errors"]) == (n, 0)
    assert observed["summary"]["faults"]["calls_lost"] >= 1  # the lost node's calls, run by the other actor
    from pipeline.spec.load import parse_spec

    spec = parse_spec({"input": {"url": table, "id_column": "id"}, "model": {"ref": "tiny", "cache_dir": model_cache, "device": "cpu"},
                       "defaults": {"width": 64, "height": 64, "steps": 4}, "output": {"url": str(tmp_path / "out")}})
    assert_exactly_once(spec, n)


class CountingEngine:
    """An engine actor for the feed alone: a block out as it came in; ``ready`` answers
    how many calls it has run."""

    def __init__(self):
        self.calls = 0

    def generate(self, block):
        self.calls += 1
        return block, block.num_rows

    def ready(self):
        return self.calls


@pytest.mark.timeout(120)
def test_a_read_that_failed_on_a_dead_actor_stops_the_job(ray_cluster):
    """A call whose input is a read task that failed on a call to a dead actor raises an
    error that is also a RayActorError. It is the read's failure, not the engine actor's:
    the job stops with it instead of sending the block from actor to actor forever."""
    import pyarrow as pa
    import ray
    from ray.exceptions import ActorDiedError

    from pipeline.batch.dispatch import Dispatcher

    @ray.remote(num_cpus=0)
    class Gone:
        def snapshot(self):
            return None

    @ray.remote(num_cpus=0)
    def read(counter):
        ray.get(counter.snapshot.remote())  # as a read task reports to the job's counter
        yield pa.table({"x": [1, 2]})

    gone = Gone.remote()
    ray.kill(gone)
    engine = ray.remote(num_cpus=0)(CountingEngine)
    engines = [engine.remote(), engine.remote()]
    feed = Dispatcher(
        units=["unit"], start_read=lambda unit: read.options(num_returns="streaming").remote(gone),
        actors=engines, write=lambda slices: None, rows_per_part=2, lookahead=2,
    )
    with pytest.raises(ActorDiedError, match="actor died|killed"):
        feed.run()
    assert ray.get([e.ready.remote() for e in engines]) == [0, 0]  # the failed input never ran a call


# Ray's workers cannot import this module: what its remote code uses travels by value.
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


def first_time(flag: Path) -> bool:
    """True for the one caller, across processes, that creates ``flag``."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


@pytest.mark.timeout(150)  # without a deadline the job waits on the hung call for ever
def test_a_hung_call_is_given_up_and_its_actor_restarted(ray_cluster, make_spec, prompts, tmp_path):
    """The job's first engine call never returns, as on a hung GPU: past the deadline
    (the floor, before any call has finished) its block goes back to the queue, the actor
    is killed for Ray to restart, and the restarted actor makes every row, once."""
    from pipeline.batch.engine_actors import ActorEngines

    flag = tmp_path / "hung"

    class HangsOnce(ActorEngines):
        def __call__(self, batch):
            if first_time(flag):
                threading.Event().wait()  # hung: only a kill ends it
            return super().__call__(batch)

    n = 12
    spec = make_spec({"url": prompt_table(tmp_path / "p.csv", prompts, n)}, runtime={"call_deadline_floor_s": 6})
    summary = run(spec, stage=HangsOnce)
    assert flag.exists()
    assert summary.faults == {"calls_lost": 0, "calls_overdue": 1, "blocks_remade": 0, "parts_rewritten": 0}
    assert (summary.images, summary.errors) == (n, 0)
    assert_exactly_once(spec, n)


def feed_blocks(n_blocks: int, rows: int):
    """A read task's stream of ``n_blocks`` blocks of ``rows`` rows, numbered."""
    import pyarrow as pa
    import ray

    @ray.remote(num_cpus=0)
    def read(unit):
        for b in range(n_blocks):
            yield pa.table({"x": list(range(b * rows, (b + 1) * rows))})

    return lambda unit: read.options(num_returns="streaming").remote(unit)


@pytest.mark.timeout(120)
def test_an_actor_lost_twice_in_a_row_stays_in_the_pool(ray_cluster, tmp_path):
    """The only engine actor dies in its first call, and again while the feed asks whether
    it is back: both are losses Ray restarts it from, so the job goes on with it."""
    import pyarrow as pa
    import ray

    from pipeline.batch.dispatch import Dispatcher

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
    class DiesTwice:
        def generate(self, block):
            if first_time(tmp_path / "died-in-call"):
                os._exit(1)
            return block, block.num_rows

        def ready(self):
            if (tmp_path / "died-in-call").exists() and first_time(tmp_path / "died-in-ready"):
                os._exit(1)
            return True

    @ray.remote(num_cpus=0)
    def write(*blocks):
        return pa.concat_tables(blocks).column("x").to_pylist()

    feed = Dispatcher(
        units=["unit"], start_read=feed_blocks(3, 2), actors=[DiesTwice.remote()],
        write=lambda slices: write.remote(*(ref for ref, _, _ in slices)), rows_per_part=2, lookahead=2,
    )
    assert sorted(x for part in feed.run() for x in part) == list(range(6))
    assert (tmp_path / "died-in-ready").exists()
    assert feed.faults.calls_lost >= 1  # the call it died in, and the one queued behind it if any


@pytest.mark.timeout(120)
def test_a_lost_writer_writes_again_without_generating_again(ray_cluster, tmp_path):
    """A part's write task dies (its process goes, Ray's retries off): the part is written
    again from the generated blocks it had; no block is generated twice."""
    import ray

    from pipeline.batch.dispatch import Dispatcher

    @ray.remote(num_cpus=0, max_retries=0)
    def write(bounds, *blocks):
        if first_time(tmp_path / "writer-died"):
            os._exit(1)
        return [x for b, (start, stop) in zip(blocks, bounds) for x in b.column("x").to_pylist()[start:stop]]

    engine = ray.remote(num_cpus=0)(CountingEngine).remote()
    feed = Dispatcher(
        units=["unit"], start_read=feed_blocks(3, 2), actors=[engine],
        write=lambda slices: write.remote([(a, b) for _, a, b in slices], *(ref for ref, _, _ in slices)),
        rows_per_part=3, lookahead=2,
    )
    assert sorted(x for part in feed.run() for x in part) == list(range(6))
    assert (tmp_path / "writer-died").exists()
    assert ray.get(engine.ready.remote()) == 3  # one call per block
    assert (feed.faults.parts_rewritten, feed.faults.blocks_remade) == (1, 0)


@pytest.mark.slow  # a three-node cluster of its own, in its own process: ~15 s on 2 cores
@pytest.mark.timeout(300)
def test_a_block_lost_with_its_node_before_its_write_is_the_only_one_made_again(tmp_path):
    """A node goes between an engine call and the write of its part: the write finds its
    input lost (Ray cannot make an actor call's output again), and the feed makes again
    exactly the blocks that node held; blocks made elsewhere are made once, every row is
    written once, and the write task is not counted as a lost writer."""
    from collections import Counter

    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "lost_block_scenario.py"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    line = next((line for line in reversed(done.stdout.splitlines()) if line.startswith('{"written"')), None)
    assert line is not None and done.returncode == 0, done.stderr[-3000:]
    observed = json.loads(line)
    assert sorted(observed["written"]) == list(range(12))  # every row once
    made = Counter(first for _, first in observed["made"])
    lost = {first for name, first in observed["made"] if name == "doomed"}
    assert lost, "the doomed node must have made blocks before it went"
    # Made twice: only blocks the doomed node made (lost before their write, or with the
    # call's reply, which the feed counts as a lost call); the kept engine never twice.
    assert {first for first, n in made.items() if n > 1} <= lost and max(made.values()) <= 2
    assert Counter(first for name, first in observed["made"] if name == "kept") == Counter(set(made))
    assert 1 <= observed["faults"]["blocks_remade"] <= len(lost) and observed["faults"]["parts_rewritten"] == 0


def test_ray_errors_are_read_one_way():
    """The one reading of Ray's errors (the feed's calls, pings and writes all use it):
    the overlaps that Ray's types allow are decided, and an actor lost for any reason but
    a failed constructor is a loss Ray restarts it from."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayTaskError, WorkerCrashedError

    from pipeline.batch.ray_faults import Fault, read_fault
    from pipeline.errors import StorageError

    def raised_in_task(cause: Exception) -> RayTaskError:
        return RayTaskError("f", "Traceback (most recent call last): ...", cause).as_instanceof_cause()

    lost = ObjectLostError("ab" * 28, None, "")
    storage = StorageError("the output cannot be written")
    constructor_failed = ActorDiedError(RayTaskError("__init__", "Traceback ...", ValueError("no model")))
    seen = {
        "died (process or node)": read_fault(ActorDiedError()).kind,
        "unavailable (restarting)": read_fault(ActorUnavailableError("restarting", None)).kind,
        "constructor raised": read_fault(constructor_failed).kind,
        "a task's argument lost": read_fault(raised_in_task(lost)).kind,
        "a task's read failed on a dead actor": read_fault(raised_in_task(ActorDiedError())).kind,
        "the job's own error": read_fault(raised_in_task(storage)).kind,
        "a task's worker crashed": read_fault(WorkerCrashedError()).kind,
    }
    assert seen == {
        "died (process or node)": Fault.LOST_ACTOR,
        "unavailable (restarting)": Fault.LOST_ACTOR,
        "constructor raised": Fault.ACTOR_FAILED,
        "a task's argument lost": Fault.LOST_OBJECT,
        "a task's read failed on a dead actor": Fault.JOB_ERROR,
        "the job's own error": Fault.JOB_ERROR,
        "a task's worker crashed": Fault.LOST_WORKER,
    }
    assert read_fault(raised_in_task(lost)).lost_object == "ab" * 28  # which block to make again
    assert read_fault(raised_in_task(storage)).error is storage  # the user reads the job's message
