"""The batch job on Ray: read units -> validate -> generate + encode (engine actors) -> parts.

This is the only place stages are chained and resources attached. The logic of each
stage lives in pure modules (:mod:`pipeline.spec.validate`, :mod:`pipeline.engine.table_generation`,
:mod:`pipeline.storage.part_files`); here they are wired to Ray:

- the table is cut into read units (runs of Parquet row groups, or files) from its listing
  and footers alone (:mod:`pipeline.storage.units`), so work starts without reading it;
- one read task per unit reads, validates (bad rows never reach a GPU) and cuts its rows
  into blocks of ``runtime.batch_size`` rows (or a size chosen from the row count);
  duplicate ids are checked against an id registry actor (:mod:`pipeline.batch.reading`);
- ``runtime.num_actors`` engine actors, created once for the whole job, each build their
  :class:`~pipeline.engine.engine.Engine` in their constructor (weights are loaded on the
  worker, never pickled from the driver) and encode on a thread pool inside the actor
  (:mod:`pipeline.batch.engine_actors`);
- the driver feeds blocks to the actors and generated rows to part writes, holding object
  refs only, a bounded number of them (:mod:`pipeline.batch.dispatch`);
- each part is written by a task through the output writer (atomic parts), and the manifest
  at once with a commit record (a crash loses only the blocks in flight; the next run
  adopts the rest), and at the end the manifest and the dataset card
  (:mod:`pipeline.batch.output_tasks`);
- validation and the engine actors report what they finish to a counter actor (``num_cpus=0``)
  that the driver polls for the progress line while the job runs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid

import pyarrow as pa
import ray

from pipeline.engine.resolve_catalog import build_catalog, place, workload
from pipeline.batch import progress
from pipeline.batch.engine_actors import ActorEngines, ProgressActor, actor_gpus, final_counts, rows_per_call, start_engines, startup_failure
from pipeline.batch.connect import connect, on_driver_node, require_gpus
from pipeline.batch.output_tasks import OutputWriter, Prepared, RecordFolder, preparing
from pipeline.batch.call_deadline import CallDeadline
from pipeline.batch.dispatch import Dispatcher, result
from pipeline.batch.id_registry import start_registry
from pipeline.batch.reading import start_read
from pipeline.batch.shared_skip_filter import SharedSkipFilter
from pipeline.batch.summary import RunSummary
from pipeline.output.ownership import ownership_warnings
from pipeline.spec.bucketing import block_rows
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec
from pipeline.spec.occurrences import needs_registry
from pipeline.spec.validate import Validator
from pipeline.storage import filesystem, ownership_marker, part_files, tables
from pipeline.storage.lock import OutputLock
from pipeline.storage.units import TablePlan, plan_units

log = logging.getLogger(__name__)


def run(spec: JobSpec, stage: type[ActorEngines] = ActorEngines) -> RunSummary:
    """Run a job spec to completion and return its summary.

    Fails before any generation for problems with the spec or the table as a whole
    (:class:`~pipeline.errors.ImagegenError`); row problems become error rows. ``stage``
    is the engine actor's class; benchmarks pass a subclass whose engine only sleeps, to
    measure the orchestration alone at a scale this machine could not compute.
    """
    started = time.time()
    run_id = part_files.new_run_id()
    catalog = build_catalog(spec)
    for note in tables.preflight(spec.input):  # files of the input folder not read, first
        log.warning("%s", note)
    # The cluster is checked before the output is touched: a job that cannot run must not
    # clear an output (mode: overwrite) or take its lock.
    connect(spec.runtime)
    require_gpus(spec)
    # Device and dtype made concrete before any request id is made: both decide pixels.
    # The engine options too: compile: auto decides from the job's size.
    table = plan_units(spec.input)
    catalog = place(catalog, actor_gpus(spec), work=workload(spec, table.rows))
    # The lock comes before anything touches the output: cleaning up uncommitted parts
    # must never delete the parts of a run still in flight.
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    ownership_marker.check_output(fs, root, spec.output.url)  # not even a lock in a folder that is not ours
    lock = OutputLock.acquire(fs, root, run_id, spec.output.url, lease_s=spec.output.lock_lease_s)
    run_id = lock.run_id  # numbered under the lock: "later" is a larger number, not a later clock
    try:
        prepared, skip = prepare(spec, run_id, started, catalog)  # adopts what interrupted runs committed
        # Beside the work, not before it: the check reads every input id and every committed
        # image (a resume of 1M rows held 50 MB more on the driver, and waited for it).
        ownership = ray.remote(ownership_warnings).options(num_cpus=spec.runtime.task_cpus).remote(spec)
        validator = Validator(spec, catalog, skip=skip)
        summary = _execute(spec, run_id, catalog, validator, started, stage, prepared, table)
        summary.warnings.extend([*prepared.warnings, *_warned(ownership)])
        return summary
    except Exception as exc:
        # However the job failed (a writer's LeaseLost arrives wrapped by Ray), a lost
        # lease is the reason to report: the user must know the output was given up.
        lock.raise_if_lost()
        failure = startup_failure(exc)  # a default model that cannot load: one message
        if failure is not None:
            raise failure from None
        raise
    finally:
        lock.release()


def prepare(spec: JobSpec, run_id: str, started: float, catalog: Catalog) -> tuple[Prepared, SharedSkipFilter]:
    """The output prepared for this run (:func:`~pipeline.batch.output_tasks.prepare_output`), by a
    task: the driver logs its warnings and gets what read tasks skip (the request ids
    earlier runs committed, see :class:`~pipeline.spec.validate.Validator`'s ``skip``) as
    refs to their 16-byte keys in the object store, read zero-copy by every read task. The
    driver never holds them, so its memory does not grow with the output (a resume of 10M
    images held 640 MB on the driver when it read the records itself, against 280 MB for
    the first run).

    The task runs on the driver's node and is never run again: its returns live in that
    node's object store, and one stored on a worker that is lost would be made again by
    Ray re-running the prepare mid-run, which would take this run's parts for an
    interrupted run's. It asks for no CPU, as the driver's node may offer none (the
    KubeRay head in ``infra/``); it runs before any work."""
    placed = preparing.options(num_cpus=0, max_retries=0, scheduling_strategy=on_driver_node())
    done, committed, adoptable = placed.remote(spec, run_id, started, catalog)
    prepared: Prepared = result(done)
    for message in prepared.warnings:
        log.warning("%s", message)
    return prepared, SharedSkipFilter(committed, adoptable, size=prepared.committed)


def _warned(ownership: ray.ObjectRef) -> list[str]:
    """The ownership check's warnings (images no current input row owns), logged as they
    are given: a renamed input without an id column makes every image again."""
    warnings = result(ownership)
    for message in warnings:
        log.warning("%s", message)
    return warnings


def _execute(
    spec: JobSpec, run_id: str, catalog: Catalog, validator: Validator, started: float, stage: type, prepared: Prepared, table: TablePlan
) -> RunSummary:
    """The pipeline itself; the caller holds the output's lock."""
    rt = spec.runtime
    # Named, so that engine actors find it by name, also after a restart (see EngineActor).
    counter_name = f"imagegen-progress-{uuid.uuid4().hex}"
    counter = ProgressActor.options(name=counter_name, scheduling_strategy=on_driver_node()).remote()
    rows_per_block = block_rows(rt.batch_size, table.rows, rt.num_actors, rows_per_call(spec, catalog))
    registry = start_registry() if needs_registry(spec.input) else None
    actors = start_engines(spec, catalog, counter_name, stage)
    shared = ray.put(validator)  # once: every read task reads the same copy
    output_writer = OutputWriter(spec, run_id, catalog, started, counter, prepared)
    writer = write_part.options(num_cpus=rt.task_cpus)
    writer_ref = ray.put(output_writer)

    def write(slices: list) -> ray.ObjectRef:
        return writer.remote(writer_ref, [(start, stop) for _, start, stop in slices], *(ref for ref, _, _ in slices))

    folder = RecordFolder(spec, run_id)
    dispatcher = Dispatcher(
        units=table.units,
        start_read=lambda unit: start_read(spec, unit, shared, rows_per_block, registry, counter),
        actors=actors,
        write=write,
        rows_per_part=spec.output.rows_per_part,
        lookahead=LOOKAHEAD_PER_ACTOR * rt.num_actors,
        written=folder.add,
        deadline=CallDeadline(rt.call_deadline_floor_s, rt.call_deadline_factor, rows_per_block),
    )
    poll = lambda: ray.get(counter.snapshot.remote(), timeout=5)  # noqa: E731
    try:
        try:
            with progress.ProgressPrinter(poll, table.rows, rt.progress_interval_s, sys.stderr):
                reports = dispatcher.run()
        finally:
            for actor in actors:
                ray.kill(actor)  # frees their GPUs now, not when the driver exits
        folder.finish()
        report = part_files.WriteReport()
        for part in reports:
            report.add(part)
        # The registry has counted every row: it tells the end of the run which rows are gone.
        output_writer.finish(report, registry)
    finally:
        if registry is not None:
            ray.kill(registry)
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
        compile_seconds=counts.compile_seconds,
        compiles=counts.compiles,
        compiles_from_cache=counts.compiles_from_cache,
        parts=report.parts,
        skipped=counts.skipped,
        adopted=counts.adopted,
        adopted_from=prepared.interrupted,
        recovery=prepared.recovery,
        faults=dataclasses.asdict(dispatcher.faults),
    )


# Validated blocks waiting on the driver's queue for an actor, per actor (besides the
# DEPTH calls queued at each actor): enough to cover a read task's start, few enough that
# the rows waiting ahead of the engines stay a few blocks per actor.
LOOKAHEAD_PER_ACTOR = 2


@ray.remote
def write_part(output_writer: OutputWriter, bounds: list[tuple[int, int]], *blocks: pa.Table) -> part_files.WriteReport:
    """A part write task: rows ``start:stop`` of each generated block, as one part, through
    the output writer (atomic parts). Ray retries it as it is, so a retry writes the same rows."""
    slices = [block.slice(start, stop - start) for block, (start, stop) in zip(blocks, bounds)]
    return output_writer.write(tables.concat_rows(slices))
