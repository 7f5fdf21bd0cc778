"""The batch job on Ray Data: read -> validate -> generate + encode (actor pool) -> write.

This is the only place stages are chained and resources attached. The logic of each
stage lives in pure modules (:mod:`pipeline.spec.validate`, :mod:`pipeline.engine.stages`,
:mod:`pipeline.storage.sink`); here they are wrapped as Ray Data operators:

- the read is a file datasource that numbers rows within each file (row identity);
- validation runs in the read tasks (fused), so bad rows never reach a GPU;
- rows are re-blocked to ``runtime.batch_size`` rows (or a size chosen from the row count)
  so every actor gets work and the last blocks make a short tail;
- a fixed-size pool of actors each builds its :class:`~pipeline.engine.engine.Engine` in its
  constructor (weights are loaded on the worker, never pickled from the driver);
- encoding runs on a thread pool inside each actor, overlapping the next diffusers call,
  so GPUs do not wait on PNG compression and raw pixels never cross the object store
  (a separate CPU stage costs a task per block and a copy of every image's pixels);
- the datasink writes each block as atomic parts and the manifest once, at the end, then
  the dataset card;
- validation and the engine actors report what they finish to a counter actor (``num_cpus=0``)
  that the driver polls for the progress line while the job runs.
"""

from __future__ import annotations

import logging
import sys
import time

import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.engine.resolve import build_catalog
from pipeline.job import progress
from pipeline.job.actors import GenerateStage, ProgressActor, actor_gpus, engine_catalog, final_counts, rows_per_call
from pipeline.job.connect import connect, require_gpus
from pipeline.job.datasink import DatasetSink, prepare_output
from pipeline.job.read import read_requests
from pipeline.job.summary import RunSummary
from pipeline.output.ownership import unowned_images
from pipeline.spec.batching import block_rows
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec
from pipeline.spec.validate import Validator, find_duplicate_ids
from pipeline.storage import filesystem, sink, tables
from pipeline.storage.lock import OutputLock

log = logging.getLogger(__name__)


def run(spec: JobSpec, stage: type[GenerateStage] = GenerateStage) -> RunSummary:
    """Run a job spec to completion and return its summary.

    Fails before any generation for problems with the spec or the table as a whole
    (:class:`~pipeline.errors.ImagegenError`); row problems become error rows. ``stage``
    is the engine actor's class; benchmarks pass a subclass whose engine only sleeps, to
    measure the orchestration alone at a scale this machine could not compute.
    """
    started = time.time()
    run_id = sink.new_run_id()
    catalog = build_catalog(spec)
    tables.preflight(spec.input)
    duplicates = find_duplicate_ids(tables.read_input(spec.input), spec.input.id_column) if spec.input.id_column else {}
    # The cluster is checked before the output is touched: a job that cannot run must not
    # clear an output (mode: overwrite) or take its lock.
    connect(spec.runtime)
    require_gpus(spec)
    # The lock comes before anything touches the output: cleaning up uncommitted parts
    # must never delete the parts of a run still in flight.
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    lock = OutputLock.acquire(fs, root, run_id, spec.output.url)
    try:
        committed = prepare_output(spec)
        warnings = _ownership_warnings(spec, fs, root)
        validator = Validator(spec, catalog, skip=frozenset(committed.request_ids), duplicates=duplicates)
        summary = _execute(spec, run_id, catalog, validator, started, stage)
        summary.warnings.extend(warnings)
        return summary
    finally:
        lock.release()


def _ownership_warnings(spec: JobSpec, fs, root: str) -> list[str]:
    """Warn, before any work, when the output holds images no current input row owns
    (a renamed or converted input without an id column: this run would make them again)."""
    unowned = unowned_images(spec, fs, root)
    if not unowned.images:
        return []
    message = unowned.message(spec)
    log.warning("%s", message)
    return [message]


def _execute(spec: JobSpec, run_id: str, catalog: Catalog, validator: Validator, started: float, stage: type) -> RunSummary:
    """The Ray Data pipeline itself; the caller holds the output's lock."""
    rt = spec.runtime
    gpus = actor_gpus(spec)
    # On the driver's node: a counter on a worker that is lost would take the counts with
    # it, and the node the driver runs on outlives the job anyway.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    counter = ProgressActor.options(scheduling_strategy=here).remote()
    total_rows = tables.count_rows(spec.input)
    rows_per_block = block_rows(rt.batch_size, total_rows, rt.num_actors, rows_per_call(spec, catalog))
    ds = read_requests(spec, validator, counter)
    ds = ds.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs={"spec": spec, "catalog": engine_catalog(catalog, gpus), "counter": counter},
        compute=ActorPoolStrategy(size=rt.num_actors),
        num_cpus=rt.cpus_per_actor,
        num_gpus=gpus,
        batch_size=rows_per_block,
        batch_format="pyarrow",
        zero_copy_batch=True,
    )
    ds = ds.repartition(target_num_rows_per_block=spec.output.rows_per_part, strict=True)
    datasink = DatasetSink(spec, run_id, catalog, started, counter)
    poll = lambda: ray.get(counter.snapshot.remote(), timeout=5)  # noqa: E731
    with progress.ProgressPrinter(poll, total_rows, rt.progress_interval_s, sys.stderr) as printer:
        if printer.live:  # Ray Data's own bars would be redrawn over ours
            ray.data.DataContext.get_current().enable_progress_bars = False
        ds.write_datasink(datasink, ray_remote_args={"num_cpus": rt.task_cpus})
    report = datasink.report or sink.WriteReport()
    counts = final_counts(counter)
    return RunSummary(
        run_id=run_id,
        output=spec.output.url,
        input_rows=report.input_rows,
        images=report.images,
        errors=report.errors,
        errors_by_stage=report.errors_by_stage,
        wall_seconds=time.time() - started,
        engine_utilization=counts.engine_utilization(time.time()),
        block_rows=rows_per_block,
        startup_seconds=counts.last_actor_ready_at - started if counts.last_actor_ready_at is not None else None,
        model_loads=counts.model_loads,
        model_swaps=counts.model_swaps,
        engine_seconds=counts.engine_seconds,
        encode_wait_seconds=counts.encode_wait_seconds,
        scoring_seconds=counts.scoring_seconds if catalog.scorer is not None else None,
        parts=report.parts,
    )
