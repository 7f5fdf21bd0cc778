"""The batch job on Ray Data: read -> validate -> generate + encode (actor pool) -> write.

This is the only place stages are chained and resources attached. The logic of each
stage lives in pure modules (:mod:`pipeline.validate`, :mod:`pipeline.stages`,
:mod:`pipeline.sink`); here they are wrapped as Ray Data operators:

- the read is a file datasource that numbers rows within each file (row identity);
- validation runs in the read tasks (fused), so bad rows never reach a GPU;
- rows are re-blocked to ``runtime.batch_size`` rows (or a size chosen from the row count)
  so every actor gets work and the last blocks make a short tail;
- a fixed-size pool of actors each builds its :class:`~pipeline.engine.Engine` in its
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

import dataclasses
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink, FileBasedDatasource
from ray.data.datasource.datasink import WriteResult

from pipeline import card, progress, sink, storage, tables
from pipeline.batching import block_rows, order_for_engine
from pipeline.catalog import Catalog, ModelEntry, build_catalog
from pipeline.config import JobSpec, RuntimeConfig
from pipeline.errors import ClusterError, ImagegenError
from pipeline.lock import OutputLock
from pipeline.stages import BlockTimes, ImageEncoder, generate_table
from pipeline.validate import Validator, find_duplicate_ids

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished run did; also what its manifest records."""

    run_id: str
    output: str
    input_rows: int
    images: int
    errors: int
    errors_by_stage: dict[str, int]
    wall_seconds: float
    engine_utilization: Optional[float] = None  # share of the engine actors' time up spent generating
    startup_seconds: Optional[float] = None  # from the run's start until its last engine actor was ready
    block_rows: int = 0  # rows per engine-actor block (runtime.batch_size, or what auto chose)
    model_loads: int = 0
    model_swaps: int = 0
    engine_seconds: float = 0.0  # summed over engine actors: in diffusers calls and model loads
    encode_wait_seconds: float = 0.0  # summed over engine actors: idle, waiting for encoding
    parts: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def swaps_per_1000_images(self) -> float:
        """Model loads that evicted another model, per 1000 images generated."""
        return 1000 * self.model_swaps / self.images if self.images else 0.0


# -- read ----------------------------------------------------------------------------------


class PromptTableDatasource(FileBasedDatasource):
    """Prompt-table files -> raw rows numbered within their file (see :mod:`pipeline.tables`)."""

    def __init__(self, paths: list[str], fmt: str, base: str, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._format = fmt
        self._base = base

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from tables.read_file(f, self._format, storage.relative_name(path, self._base))


def read_requests(spec: JobSpec, validator: Validator, counter: Any) -> ray.data.Dataset:
    fs, base, files = storage.list_table(spec.input.url, spec.input.storage_options)
    datasource = PromptTableDatasource(files, spec.input.format, base, filesystem=storage.arrow_filesystem(fs))
    task_cpus = {"num_cpus": spec.runtime.task_cpus}
    # One block per file chunk (tables.CHUNK_ROWS rows): Ray Data would otherwise split a
    # few files' blocks finer for parallelism, and each validated block is sorted by model
    # and bucket (order_for_engine) only within itself: bigger blocks, longer same-model runs.
    ds = ray.data.read_datasource(datasource, override_num_blocks=len(files), **task_cpus)
    kwargs = {"validator": validator, "counter": counter}
    return ds.map_batches(validate_counting, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **task_cpus)


# -- generate ------------------------------------------------------------------------------


class GenerateStage:
    """An engine actor: generates and encodes block after block.

    Holds a cache of resident engines (see :mod:`pipeline.model_cache`) and an image
    encoder's thread pool (see :func:`~pipeline.stages.generate_table`). The default model
    is loaded in the constructor, so a model that cannot load fails the job at start rather
    than every row; other models load on first use. What each block finishes (rows,
    images, errors), model loads and swaps, and the engine's busy and encode-wait seconds
    go to ``counter`` for the progress line and the run summary.
    """

    def __init__(self, spec: JobSpec, catalog: Catalog, counter: Any = None):
        import torch

        rt = spec.runtime
        threads = max(1, int(rt.cpus_per_actor))
        # Ray gives the actor a CPU share; torch would otherwise spin one thread per core.
        torch.set_num_threads(threads)
        from pipeline.model_cache import ModelCache, default_budget

        device = catalog.models[catalog.default_model].config.device
        budget = int(rt.model_memory_gb * 1e9) if rt.model_memory_gb else default_budget(device)
        self.models = ModelCache(catalog, budget)
        self.encoder = ImageEncoder(spec.output.format, spec.output.quality, threads)
        self._counter = counter
        self._reported = self.models.stats
        self.models.get(catalog.default_model)
        self._ready()

    def _ready(self) -> None:
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id() or ""
        self.node_id = context.get_node_id() or ""
        if self._counter is not None:
            self._counter.actor_ready.remote(time.time())
        self._report({})

    def __call__(self, batch: pa.Table) -> pa.Table:
        times = BlockTimes()
        table = generate_table(self.models, batch, self.actor_id, self.node_id, self.encoder, times)
        self._report({**progress.finished(table), "engine_seconds": times.engine, "encode_wait_seconds": times.encode_wait})
        return table

    def _report(self, finished: dict[str, Any]) -> None:
        stats, before = self.models.stats, self._reported
        self._reported = stats
        if self._counter is not None:
            self._counter.add.remote(model_loads=stats.loads - before.loads, model_swaps=stats.swaps - before.swaps, **finished)


def actor_gpus(spec: JobSpec) -> float:
    """GPUs per engine actor: as set, else 1 when the model is to run on CUDA."""
    if spec.runtime.gpus_per_actor is not None:
        return spec.runtime.gpus_per_actor
    device = next(iter(spec.named_models().values())).device  # one device for all (JobSpec checks)
    if device == "cpu":
        return 0
    if device == "cuda":
        return 1
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def engine_catalog(catalog: Catalog, gpus: float) -> Catalog:
    """The catalog an engine actor gets: ``device: auto`` follows its GPU reservation; an
    explicit device is kept (a CPU engine on logical GPUs is how several-GPU layouts are
    tested on machines without one)."""

    def placed(entry: ModelEntry) -> ModelEntry:
        device = entry.config.device if entry.config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
        return dataclasses.replace(entry, config=entry.config.model_copy(update={"device": device}))

    return dataclasses.replace(catalog, models={name: placed(entry) for name, entry in catalog.models.items()})


def rows_per_call(spec: JobSpec, catalog: Catalog) -> Optional[int]:
    """Rows whose images fill one diffusers call of the default model at the spec's default
    size and image count; None when its calls are unbounded (no ``max_batch_pixels``)."""
    budget = catalog.models[catalog.default_model].config.engine.max_batch_pixels
    d = spec.defaults
    return max(1, budget // (d.width * d.height * d.num_images)) if budget else None


# -- progress: stages add what they finish to a counter actor that the driver polls --------

# num_cpus=0: a default actor takes a whole CPU, which on a small machine starves the job.
ProgressActor = ray.remote(num_cpus=0)(progress.ProgressCounter)


def validate_counting(table: pa.Table, validator: Validator, counter: Any) -> pa.Table:
    """Validation that also reports rows skipped as already committed; the block leaves
    sorted for the engine (by model, adapter and bucket: see :func:`order_for_engine`)."""
    requests = validator.validate_table(table)
    counter.add.remote(skipped=progress.skipped(table, requests))
    return order_for_engine(requests)


def _final_counts(counter: Any) -> progress.Counts:
    """The counter's totals; empty ones if it cannot answer: the counts it keeps (progress,
    model loads, engine seconds) are reports about the run, never worth failing it for."""
    try:
        return ray.get(counter.snapshot.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        log.warning("the progress counter did not answer (%s); model loads and engine times are not recorded for this run", exc)
        return progress.Counts()


# -- write ---------------------------------------------------------------------------------


class DatasetSink(Datasink[sink.WriteReport]):
    """Writes each block as atomic parts; on completion writes the run manifest, then
    regenerates the dataset card (README.md) over all the output's runs."""

    def __init__(self, spec: JobSpec, run_id: str, catalog: Catalog, started: float, counter: Any):
        self._output = spec.output
        self._spec = spec
        self._run_id = run_id
        self._catalog = catalog
        self._started = started
        self._counter = counter
        self.report: sink.WriteReport | None = None

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> sink.WriteReport:
        fs, root = storage.open_url(self._output.url, self._output.storage_options)
        report = sink.WriteReport()
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                report.add(sink.write_block(fs, root, self._run_id, table))
        return report

    def on_write_complete(self, write_result: WriteResult[sink.WriteReport]) -> None:
        report = sink.WriteReport()
        for part in write_result.write_returns:
            report.add(part)
        finished = time.time()
        counts = _final_counts(self._counter)
        fs, root = storage.open_url(self._output.url, self._output.storage_options)
        sink.write_manifest(
            fs,
            root,
            self._run_id,
            {
                "run_id": self._run_id,
                "status": "complete",
                "started_at": self._started,
                "finished_at": finished,
                "wall_seconds": finished - self._started,
                "spec": self._spec.redacted(),
                "spec_fingerprint": self._spec.fingerprint(),
                "model_fingerprint": self._catalog.models[self._catalog.default_model].fingerprint,
                "models": {
                    name: {"ref": m.config.ref, "fingerprint": m.fingerprint, "family": m.family.name, "pipeline_class": m.pipeline_class}
                    for name, m in self._catalog.models.items()
                },
                "loras": {name: {"url": a.config.url, "digest": a.digest} for name, a in self._catalog.loras.items()},
                "versions": sink.library_versions(),
                "counts": {
                    "input_rows": report.input_rows,
                    "images": report.images,
                    "errors": report.errors,
                    "errors_by_stage": report.errors_by_stage,
                    "model_loads": counts.model_loads,
                    "model_swaps": counts.model_swaps,
                },
                "parts": sorted(report.parts, key=lambda p: p["path"]),
            },
        )
        card.write_card(fs, root)
        self.report = report


def prepare_output(spec: JobSpec) -> sink.Committed:
    """Apply ``output.mode`` and return what earlier runs committed there."""
    fs, root = storage.open_url(spec.output.url, spec.output.storage_options)
    with storage.storage_errors(spec.output.url, "prepare"):
        if spec.output.mode == "overwrite":
            sink.clear_output(fs, root)
        committed = sink.read_committed(fs, root)
        if committed.runs and spec.output.mode == "error_if_exists":
            raise ImagegenError(
                f"{spec.output.url} already holds {len(committed.runs)} run(s) and output.mode is error_if_exists; "
                "choose another output.url, or set output.mode to incremental or overwrite"
            )
        removed = sink.remove_uncommitted(fs, root, committed)
    if removed:
        log.warning("removed %d part(s) left uncommitted by an interrupted run", len(removed))
    return committed


# -- the job -------------------------------------------------------------------------------


def connect(runtime: RuntimeConfig) -> None:
    """Join (or start) the Ray cluster the spec names; reuse one already initialised.

    Raises :class:`ClusterError` within seconds when ``runtime.address`` names a host and
    port nothing listens on: ``ray.init`` itself retries such an address for minutes
    (``ray://`` for 30 s) before giving up.
    """
    if ray.is_initialized():
        return
    advice = "Start a cluster with `ray start --head` and set runtime.address to the address it prints, or unset runtime.address to run on a local Ray."
    if runtime.address and runtime.address.startswith(("http://", "https://")):
        raise ClusterError(
            f"runtime.address {runtime.address!r} is a dashboard URL, which only `imagegen submit` uses. "
            "To run this spec on that cluster, use `imagegen submit SPEC --address URL`; to connect directly, "
            "set runtime.address to host:port, ray://host:10001 or auto."
        )
    if runtime.address not in (None, "auto", "local"):
        _probe(runtime.address, advice)
    try:
        ray.init(address=runtime.address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, TimeoutError) as exc:
        where = runtime.address or "a new local cluster"
        raise ClusterError(f"cannot reach Ray at {where}: {exc}. {advice}") from None


def _probe(address: str, advice: str, timeout_s: float = 5.0) -> None:
    """Fail fast unless something accepts TCP connections at ``address`` ([ray://]host:port)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"runtime.address {address!r} is not host:port, ray://host:port or auto. {advice}")
    hosts = [host]
    if host in ("127.0.0.1", "localhost"):
        # Ray itself swaps a loopback address for this node's IP; a head may listen only there.
        hosts.append(ray.util.get_node_ip_address())
    for candidate in hosts:
        try:
            socket.create_connection((candidate, int(port)), timeout=timeout_s).close()
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    raise ClusterError(f"cannot reach Ray at {address}: {reason} (nothing answers on port {port} of {host}). {advice}")


def require_gpus(spec: JobSpec) -> None:
    """Fail before any work when an engine actor asks for more GPUs than the cluster has:
    Ray would otherwise keep the actors pending, and the job waiting, forever."""
    gpus = actor_gpus(spec)
    have = ray.cluster_resources().get("GPU", 0)
    if gpus > have:
        asked = f"runtime.gpus_per_actor is {gpus:g}" if spec.runtime.gpus_per_actor is not None else "model.device is cuda"
        raise ClusterError(
            f"each engine actor needs {gpus:g} GPU(s) ({asked}), but the Ray cluster has {have:g} GPU(s), so the job "
            "would wait forever. To run on CPU, set model.device: cpu (or auto) and leave runtime.gpus_per_actor "
            "unset; or set runtime.address to a cluster with GPUs (an autoscaling one must keep a GPU worker up)."
        )


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
    fs, root = storage.open_url(spec.output.url, spec.output.storage_options)
    lock = OutputLock.acquire(fs, root, run_id, spec.output.url)
    try:
        committed = prepare_output(spec)
        validator = Validator(spec, catalog, skip=frozenset(committed.request_ids), duplicates=duplicates)
        return _execute(spec, run_id, catalog, validator, started, stage)
    finally:
        lock.release()


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
    counts = _final_counts(counter)
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
        parts=report.parts,
    )
