"""The engine actors (:class:`ActorEngines`) and what they need from the cluster: GPUs per
actor, the catalog they get, the progress counter they report to.

Each actor builds its engines in its constructor (weights are loaded on the worker,
never pickled from the driver) and encodes on a thread pool inside the actor, overlapping
the next diffusers call, so GPUs do not wait on PNG compression and raw pixels never
cross the object store (a separate CPU stage costs a task per block and a copy of every
image's pixels).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import pyarrow as pa
import ray

from pipeline.engine.kernels import CompileClock
from pipeline.engine.resolve_catalog import place
from pipeline.engine.table_generation import BlockTimes, ImageEncoder, generate_table
from pipeline.errors import ModelError
from pipeline.batch import progress
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec

log = logging.getLogger(__name__)


class ActorEngines:
    """An engine actor: generates and encodes block after block.

    Holds a cache of resident engines (see :mod:`pipeline.engine.resident_models`), an image
    encoder's thread pool (see :func:`~pipeline.engine.table_generation.generate_table`) and, with a
    ``scoring`` section, the CLIP scorer that pool runs (loaded here, beside the default
    model, on the same device). The default model
    is loaded in the constructor, so a model that cannot load fails the job at start rather
    than every row; other models load on first use. What each block finishes (rows,
    images, errors), model loads and swaps, and the engine's busy, encode-wait and scoring
    seconds go to ``counter`` for the progress line and the run summary.
    """

    def __init__(self, spec: JobSpec, catalog: Catalog, counter: Any = None):
        import torch

        rt = spec.runtime
        threads = max(1, int(rt.cpus_per_actor))
        # Ray gives the actor a CPU share; torch would otherwise spin one thread per core.
        torch.set_num_threads(threads)
        from pipeline.engine.resident_models import ModelCache, default_budget

        device = catalog.models[catalog.default_model].config.device
        budget = int(rt.model_memory_gb * 1e9) if rt.model_memory_gb else default_budget(device)
        self.models = ModelCache(catalog, budget)
        self.encoder = ImageEncoder(spec.output.format, spec.output.quality, threads, scorer=_load_scorer(catalog))
        self._counter = counter
        self._reported = self.models.stats
        self._compiled = CompileClock.totals()
        try:
            self.models.get(catalog.default_model)
        except Exception as exc:  # noqa: BLE001 - one message for the whole job (see startup_failure)
            entry = catalog.models[catalog.default_model]
            raise ModelError(
                f"{_DEFAULT_MODEL_FAILED} {entry.name!r}{'' if entry.name == entry.config.ref else f' ({entry.config.ref})'} "
                "cannot be loaded on the engine actors: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} -- check model.ref and that the "
                "weights are complete (a partial download or copy fails like this), then rerun"
            ) from None
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
        self._report(
            {**progress.finished(table), "engine_seconds": times.engine, "encode_wait_seconds": times.encode_wait, "scoring_seconds": times.scoring}
        )
        return table

    def _report(self, finished: dict[str, Any]) -> None:
        stats, before = self.models.stats, self._reported
        compiled, compiled_before = CompileClock.totals(), self._compiled
        self._reported, self._compiled = stats, compiled
        compiles = dict(zip(("compiles", "compiles_from_cache", "compile_seconds"), (now - then for now, then in zip(compiled, compiled_before))))
        if self._counter is not None:
            self._counter.add.remote(model_loads=stats.loads - before.loads, model_swaps=stats.swaps - before.swaps, **compiles, **finished)


class EngineActor:
    """The job's engine actor process: one :class:`ActorEngines` (or a subclass, as the
    benchmarks' sleeping stage) kept for the whole job, fed block after block by the driver
    (:mod:`pipeline.batch.dispatch`).

    Its constructor's arguments are plain data, passed by value, and the progress counter
    is named, not passed: Ray keeps by-value arguments with the actor's creation task, so
    a restart after any node's loss finds them, while an argument in the object store (an
    object ref, a value over Ray's inline limit, or an actor handle, which carries a
    reference) may be gone with its node or owner and the restart then fails
    (ray-project/ray#53727)."""

    def __init__(self, stage: type, spec: JobSpec, catalog: Catalog, counter_name: Optional[str] = None):
        counter = ray.get_actor(counter_name) if counter_name is not None else None
        self.stage = stage(spec, catalog, counter)

    def generate(self, block: pa.Table) -> tuple[pa.Table, int]:
        """A generated block and its row count (a second, tiny return: the driver reads
        counts without fetching images)."""
        table = self.stage(block)
        return table, table.num_rows

    def ready(self) -> bool:
        """Answers once the actor has (re)started: its constructor ran."""
        return True


def start_engines(spec: JobSpec, catalog: Catalog, counter_name: Optional[str], stage: type = ActorEngines) -> list[Any]:
    """Create the job's ``runtime.num_actors`` engine actors, each reserving its CPUs and
    GPUs, reporting to the progress counter named ``counter_name``. A lost actor is
    restarted by Ray (``max_restarts``) but its calls are not retried
    (``max_task_retries=0``): the driver gives an interrupted block to another actor at
    once rather than wait for a restart that may never come (no GPU left for it).

    The arguments go by value (see :class:`EngineActor`); arguments over Ray's inline limit
    would go to the object store, so a catalog that large is logged as a risk to restarts."""
    rt = spec.runtime
    gpus = actor_gpus(spec)
    remote = ray.remote(EngineActor).options(num_cpus=rt.cpus_per_actor, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
    args = (stage, spec, engine_catalog(catalog, gpus), counter_name)
    largest = max(len(ray.cloudpickle.dumps(arg)) for arg in args)
    if largest > INLINE_LIMIT_BYTES:
        log.warning(
            "an engine actor's constructor argument takes %d bytes, over Ray's inline limit (%d): it goes to the object "
            "store, and an actor lost with a node may then fail to restart (ray-project/ray#53727)", largest, INLINE_LIMIT_BYTES,
        )
    return [remote.remote(*args) for _ in range(rt.num_actors)]


# Ray's max_direct_call_object_size: a task argument larger than this is put in the object store.
INLINE_LIMIT_BYTES = 100 * 1024


def _load_scorer(catalog: Catalog):
    """The catalog's CLIP scorer, loaded on the default model's device; None without one."""
    if catalog.scorer is None:
        return None
    from pipeline.engine.engine import resolve_device
    from pipeline.engine.clip_scorer import ClipScorer

    device = resolve_device(catalog.models[catalog.default_model].config)
    return ClipScorer(catalog.scorer.config, device, catalog.scorer.fingerprint)


_DEFAULT_MODEL_FAILED = "the default model"


def startup_failure(exc: BaseException) -> Optional[ModelError]:
    """The :class:`ModelError` an engine actor raised because the default model cannot be
    loaded, recovered from the error Ray raised on the driver (an actor's creation-task
    exception reaches the driver only as text inside ``ActorDiedError``); None otherwise."""
    marker = f"ModelError: {_DEFAULT_MODEL_FAILED} "
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if marker in text:
            return ModelError(text[text.rindex(marker) + len("ModelError: ") :].split("\n", 1)[0].strip())
        exc = exc.__cause__ or exc.__context__
    return None


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
    """The catalog an engine actor gets: devices and dtypes made concrete for its GPU
    reservation (:func:`pipeline.engine.resolve_catalog.place`)."""

    return place(catalog, gpus)


def rows_per_call(spec: JobSpec, catalog: Catalog) -> Optional[int]:
    """Rows whose images fill one diffusers call of the default model at the spec's default
    size and image count; None when its calls are unbounded (no ``max_batch_pixels``)."""
    budget = catalog.models[catalog.default_model].config.engine.max_batch_pixels
    d = spec.defaults
    return max(1, budget // (d.width * d.height * d.num_images)) if budget else None


# num_cpus=0: a default actor takes a whole CPU, which on a small machine starves the job.
ProgressActor = ray.remote(num_cpus=0)(progress.ProgressCounter)




def final_counts(counter: Any) -> progress.Counts:
    """The counter's totals; empty ones if it cannot answer: the counts it keeps (progress,
    model loads, engine seconds) are reports about the run, never worth failing it for."""
    try:
        return ray.get(counter.snapshot.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        log.warning("the progress counter did not answer (%s); model loads and engine times are not recorded for this run", exc)
        return progress.Counts()
