"""Resolving the job's models and LoRA adapters, once on the driver before any work.

For each model: its fingerprint (weights), its family and pipeline class (which row
parameters it takes), whether it ships a safety checker, checked to load from
safetensors unless pickles are allowed. For each adapter: its content digest. For the
CLIP scorer, if any: its fingerprint. The :class:`Catalog` is plain data, shipped to the
validator (request ids, row checks) and the engine actors (which model and adapter a row
names), so nothing is looked up twice or differently in two places.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Optional

from pipeline.engine import adapters, weight_sources
from pipeline.engine.gpu_rates import GPU_MAX_BATCH_PIXELS, compile_choice
from pipeline.errors import ModelError, SpecError
from pipeline.spec.catalog import AdapterEntry, Catalog, ModelEntry, ScorerEntry
from pipeline.spec.config import JobSpec
from pipeline.spec.families import FAMILIES, SCHEDULER_CLASSES, Family, UnknownFamily, family_of_class
from pipeline.spec.model_config import ModelConfig
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

# What each tiny model is built as (pipeline.engine.tiny_models), read from here so the
# driver need not build a model to learn it: pipeline class, scheduler class, the VAE's
# downsampling and the transformer's patch size (1 for a UNet).
TINY_MODELS = {
    "tiny": ("StableDiffusionPipeline", "DDIMScheduler", 2, 1),
    "tiny-sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", 2, 1),
    "tiny-sd3": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", 2, 2),
    "tiny-flux": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", 2, 1),
}
TINY_CLASSES = {name: info[0] for name, info in TINY_MODELS.items()}
# Real models' VAE downsampling and transformer patch size (SD3, FLUX), for a model whose
# configs cannot be read before the job (a hub id without network access).
_USUAL_GEOMETRY = (8, 2)


def build_catalog(spec: JobSpec) -> Catalog:
    """Resolve every model and adapter of ``spec``; :class:`ModelError` names the first
    that cannot be used and says what to do."""
    setting = (lambda name: f"models.{name}") if spec.models else (lambda name: "model")
    models = {name: _model_entry(name, config, setting(name)) for name, config in spec.named_models().items()}
    _check_default_size(spec, models)
    loras = {name: AdapterEntry(name, config, adapters.digest(name, config)) for name, config in spec.loras.items()}
    scorer = None
    if spec.scoring is not None:
        from pipeline.engine.clip_scorer import scorer_fingerprint

        scorer = ScorerEntry(spec.scoring, scorer_fingerprint(spec.scoring))
    return Catalog(models, spec.default_model(), loras, scorer)


def _check_default_size(spec: JobSpec, models: dict[str, ModelEntry]) -> None:
    """A default width or height that a model cannot make would reject every row of that
    model that does not set its own: a spec error before any work, not a table of errors."""
    for name, entry in models.items():
        for field in ("width", "height"):
            value = getattr(spec.defaults, field)
            if value % entry.size_multiple:
                raise SpecError(
                    f"defaults.{field}={value} is not a multiple of {entry.size_multiple}, which model {name!r} needs "
                    f"({entry.size_rule}); set defaults.{field} to a multiple of {entry.size_multiple}"
                )


def _model_entry(name: str, config: ModelConfig, setting: str) -> ModelEntry:
    """``setting`` is where the spec sets this model (``model``, ``models.NAME``), for messages."""
    weight_sources.check_weights_format(config)
    ref = weight_sources.parse_ref(config.ref)
    commit = weight_sources.hub_commit(ref.location, config.revision) if ref.kind == "hub" else None
    fingerprint = weight_sources.fingerprint(config, commit=commit)
    pinned = config.model_copy(update={"revision": commit}) if commit else config  # what the engine loads
    declared = FAMILIES[config.family] if config.family else None
    index = read_model_index(pinned, required=declared is None)
    class_name = _class_name(config, index) if index is not None else None
    family = declared if class_name is None else _family(name, config, class_name, declared)
    family.check_scheduler(config.scheduler, f"{setting}.scheduler", name)
    multiple, rule = family.size_multiple(*_latent_geometry(pinned))
    return ModelEntry(
        name,
        config,
        fingerprint,
        family,
        class_name or family.pipeline_classes[0],
        size_multiple=multiple,
        size_rule=rule,
        scheduler_class=SCHEDULER_CLASSES[config.scheduler] if config.scheduler else _saved_scheduler(index),
        has_safety_checker=_has_safety_checker(index),
        commit=commit,
    )


def _has_safety_checker(index: Optional[dict]) -> Optional[bool]:
    """Whether the model ships a safety checker; None when its index could not be read.
    SD 1.x indexes name it as ["stable_diffusion", "StableDiffusionSafetyChecker"]; a
    pipeline saved without one has [null, null] there."""
    if index is None:
        return None
    checker = index.get("safety_checker")
    return isinstance(checker, list) and any(part is not None for part in checker)




def recorded_models(manifests: list[dict]) -> Optional[dict[str, dict]]:
    """The models of the output's latest run that recorded them (its manifest's ``models``):
    how ``device: auto`` ran there, for :func:`place` where no actors decide it (``verify``,
    ``inspect``, ``validate``)."""
    return next((m.get("models") for m in reversed(manifests) if m.get("models")), None)


@dataclass(frozen=True)
class Workload:
    """What the driver knows of a job's size before it runs: the default image shape and the
    images of it each engine actor will make (rows x images per row / actors; None when the
    table's row count is unknown). ``compile: auto`` decides from it."""

    width: int
    height: int
    steps: int
    images_per_actor: Optional[float]


def workload(spec: JobSpec, rows: Optional[int]) -> Workload:
    """The job's :class:`Workload` from ``spec``'s defaults and its table's row count."""
    d = spec.defaults
    images = rows * d.num_images / spec.runtime.num_actors if rows is not None else None
    return Workload(d.width, d.height, d.steps, images)


def place(catalog: Catalog, gpus: float, recorded: Optional[dict[str, dict]] = None, work: Optional[Workload] = None) -> Catalog:
    """The catalog with each model's ``device`` and ``dtype`` made concrete, as the engine
    will run it; both decide pixels, so they enter every request id (and every image row).

    ``device: auto`` follows the engine actors' GPU reservation (``gpus`` > 0: cuda), or,
    when ``gpus`` is None (``imagegen verify`` and ``validate``, which start no actors),
    the device the output's latest run recorded for that model (``recorded``: the
    manifest's ``models``), else cpu. ``dtype: auto`` is float16 on cuda and float32 on
    cpu, the engine's rule. An explicit device is kept (a CPU engine on logical GPUs is how
    several-GPU layouts are tested on machines without one).

    The engine options are made concrete too, for the device (they change speed, not
    request ids): on CUDA an unset ``max_batch_pixels`` becomes
    :data:`~pipeline.engine.gpu_rates.GPU_MAX_BATCH_PIXELS`, and ``compile: auto`` becomes
    true for the default model when ``work`` gives each actor enough images of its shape
    to repay compiling (:func:`~pipeline.engine.gpu_rates.compile_choice`, which reads
    whether the shared compile store is warm); false otherwise, on CPU, and without
    ``work`` (``imagegen serve``, ``verify``)."""

    def placed(entry: ModelEntry) -> ModelEntry:
        config = entry.config
        device = config.device
        if device == "auto":
            if gpus is not None:
                device = "cuda" if gpus > 0 else "cpu"
            else:
                device = (recorded or {}).get(entry.name, {}).get("device") or "cpu"
        dtype = config.dtype if config.dtype != "auto" else ("float16" if device == "cuda" else "float32")
        concrete = config.model_copy(update={"device": device, "dtype": dtype})
        options = {"compile": _compile(entry, concrete, work if entry.name == catalog.default_model else None)}
        if device == "cuda" and config.engine.max_batch_pixels is None:
            options["max_batch_pixels"] = GPU_MAX_BATCH_PIXELS
        concrete = concrete.model_copy(update={"engine": config.engine.model_copy(update=options)})
        return dataclasses.replace(entry, config=concrete)

    return dataclasses.replace(catalog, models={name: placed(entry) for name, entry in catalog.models.items()})


def _compile(entry: ModelEntry, config: ModelConfig, work: Optional[Workload]) -> bool:
    """``compile`` made concrete: as set, or ``auto``'s answer (logged with its reason)."""
    if config.engine.compile != "auto":
        return config.engine.compile
    if config.device != "cuda":
        return False
    if work is None:
        return False  # serve and the read-only commands: no job to repay a compile
    from pipeline.engine import compile_cache

    choice = compile_choice(entry.family.name, work.width, work.height, work.steps, work.images_per_actor, compile_cache.is_warm(config))
    log.info("model %s: compile: auto -> %s: %s", entry.name, str(choice.compile).lower(), choice.reason)
    return choice.compile


def _family(name: str, config: ModelConfig, class_name: str, declared: Optional[Family]) -> Family:
    try:
        family = family_of_class(class_name)
    except UnknownFamily as exc:
        raise ModelError(f"model {name!r} ({config.ref}): {exc}") from None
    if declared is not None and declared != family:
        raise ModelError(
            f"model {name!r} ({config.ref}) is a {class_name} ({family.name}), but its family is set to {declared.name}; "
            f"remove model.family or set it to {family.name}"
        )
    return family


def _latent_geometry(config: ModelConfig) -> tuple[int, int]:
    """(the VAE's downsampling, the transformer's patch size) of the model, as diffusers
    computes them from the saved configs; the usual (8, 2) where they cannot be read."""
    ref = weight_sources.parse_ref(config.ref)
    if ref.kind == "tiny":
        return TINY_MODELS[ref.location][2:]
    try:
        vae = _read_model_json(config, "vae/config.json")
        vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except Exception:  # noqa: BLE001 - unreadable here; the engine's size check still guards the rows
        return _USUAL_GEOMETRY
    try:
        patch_size = int(_read_model_json(config, "transformer/config.json").get("patch_size", 1))
    except Exception:  # noqa: BLE001 - no transformer: a UNet model
        patch_size = 1
    return vae_scale_factor, patch_size


def _saved_scheduler(index: Optional[dict]) -> Optional[str]:
    """The scheduler class the model was saved with (its ``model_index.json`` says), or None."""
    library_and_class = index.get("scheduler") if index else None
    return library_and_class[1] if isinstance(library_and_class, list) and len(library_and_class) == 2 else None


def _read_model_json(config: ModelConfig, relative: str) -> dict:
    """A JSON file of the model's folder (local, remote or on the hub)."""
    ref = weight_sources.parse_ref(config.ref)
    if ref.kind == "hub":
        return _hub_model_index(ref.location, config.revision, relative)
    fs, root = filesystem.open_url(ref.location, config.storage_options)
    return json.loads(filesystem.read_bytes(fs, filesystem.join(root, relative)))


def read_pipeline_class(config: ModelConfig, required: bool = True) -> Optional[str]:
    """``_class_name`` of the model's ``model_index.json``. When it cannot be read (a hub
    id without network access): :class:`ModelError` if ``required``, else None."""
    index = read_model_index(config, required)
    return _class_name(config, index) if index is not None else None


def read_model_index(config: ModelConfig, required: bool = True) -> Optional[dict]:
    """The model's ``model_index.json`` (made up from :data:`TINY_MODELS` for a tiny
    model). When it cannot be read (a hub id without network access):
    :class:`ModelError` if ``required``, else None."""
    ref = weight_sources.parse_ref(config.ref)
    if ref.kind == "tiny":
        class_name, scheduler_class = TINY_MODELS[ref.location][:2]
        return {"_class_name": class_name, "scheduler": ["diffusers", scheduler_class]}
    try:
        index = _read_model_json(config, "model_index.json")
    except Exception as exc:  # noqa: BLE001 - any failure means the same advice
        if not required:
            return None
        raise ModelError(
            f"cannot read model_index.json of model {config.ref!r} ({type(exc).__name__}: {exc}); "
            f"set model.family to one of {', '.join(FAMILIES)} to run it without reading it first"
        ) from None
    if not isinstance(index, dict):
        raise ModelError(f"model_index.json of model {config.ref!r} is not a JSON object; is it a diffusers pipeline folder?")
    return index


def _class_name(config: ModelConfig, index: dict) -> str:
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"model_index.json of model {config.ref!r} names no _class_name; is it a diffusers pipeline folder?")
    return class_name


def _hub_model_index(repo: str, revision: str, filename: str = "model_index.json") -> dict:
    """The hub model's ``model_index.json`` (or another JSON file of it): from the local hub
    cache when there, else one request (huggingface_hub's own download retries for half a
    minute when offline)."""
    from huggingface_hub import get_session, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    try:
        with open(hf_hub_download(repo, filename, revision=revision, local_files_only=True)) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - not cached: ask the hub
        pass
    response = get_session().get(hf_hub_url(repo, filename, revision=revision), headers=build_hf_headers(), timeout=10)
    response.raise_for_status()
    return response.json()
