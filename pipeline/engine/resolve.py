"""Resolving the job's models and LoRA adapters, once on the driver before any work.

For each model: its fingerprint (weights), its family and pipeline class (which row
parameters it takes), checked to load from safetensors unless pickles are allowed. For
each adapter: its content digest. The :class:`Catalog` is plain data, shipped to the
validator (request ids, row checks) and the engine actors (which model and adapter a row
names), so nothing is looked up twice or differently in two places.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from pipeline.engine import adapters, model_ref
from pipeline.errors import ModelError
from pipeline.spec.catalog import AdapterEntry, Catalog, ModelEntry
from pipeline.spec.config import JobSpec
from pipeline.spec.families import FAMILIES, UnknownFamily, family_of_class
from pipeline.spec.model_config import ModelConfig
from pipeline.storage import filesystem

# The pipeline class each tiny model is built as (pipeline.engine.tiny_models); read from here so the
# driver need not build a model to learn its family.
TINY_CLASSES = {
    "tiny": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-flux": "FluxPipeline",
}


def build_catalog(spec: JobSpec) -> Catalog:
    """Resolve every model and adapter of ``spec``; :class:`ModelError` names the first
    that cannot be used and says what to do."""
    models = {name: _model_entry(name, config) for name, config in spec.named_models().items()}
    loras = {name: AdapterEntry(name, config, adapters.digest(name, config)) for name, config in spec.loras.items()}
    return Catalog(models, spec.default_model(), loras)


def _model_entry(name: str, config: ModelConfig) -> ModelEntry:
    model_ref.check_weights_format(config)
    ref = model_ref.parse_ref(config.ref)
    commit = model_ref.hub_commit(ref.location, config.revision) if ref.kind == "hub" else None
    fingerprint = model_ref.fingerprint(config, commit)
    declared = FAMILIES[config.family] if config.family else None
    class_name = read_pipeline_class(config.model_copy(update={"revision": commit}) if commit else config, required=declared is None)
    if class_name is None:
        return ModelEntry(name, config, fingerprint, declared, declared.pipeline_classes[0], commit)
    try:
        family = family_of_class(class_name)
    except UnknownFamily as exc:
        raise ModelError(f"model {name!r} ({config.ref}): {exc}") from None
    if declared is not None and declared != family:
        raise ModelError(
            f"model {name!r} ({config.ref}) is a {class_name} ({family.name}), but its family is set to {declared.name}; "
            f"remove model.family or set it to {family.name}"
        )
    return ModelEntry(name, config, fingerprint, family, class_name, commit)


def place(catalog: Catalog, gpus: float, recorded: Optional[dict[str, dict]] = None) -> Catalog:
    """The catalog with each model's ``device`` and ``dtype`` made concrete, as the engine
    will run it; both decide pixels, so they enter every request id (and every image row).

    ``device: auto`` follows the engine actors' GPU reservation (``gpus`` > 0: cuda), or,
    when ``gpus`` is None (``imagegen verify`` and ``validate``, which start no actors),
    the device the output's latest run recorded for that model (``recorded``: the
    manifest's ``models``), else cpu. ``dtype: auto`` is float16 on cuda and float32 on
    cpu, the engine's rule. An explicit device is kept (a CPU engine on logical GPUs is how
    several-GPU layouts are tested on machines without one)."""

    def placed(entry: ModelEntry) -> ModelEntry:
        config = entry.config
        device = config.device
        if device == "auto":
            if gpus is not None:
                device = "cuda" if gpus > 0 else "cpu"
            else:
                device = (recorded or {}).get(entry.name, {}).get("device") or "cpu"
        dtype = config.dtype if config.dtype != "auto" else ("float16" if device == "cuda" else "float32")
        return dataclasses.replace(entry, config=config.model_copy(update={"device": device, "dtype": dtype}))

    return dataclasses.replace(catalog, models={name: placed(entry) for name, entry in catalog.models.items()})


def read_pipeline_class(config: ModelConfig, required: bool = True) -> Optional[str]:
    """``_class_name`` of the model's ``model_index.json``. When it cannot be read (a hub
    id without network access): :class:`ModelError` if ``required``, else None."""
    ref = model_ref.parse_ref(config.ref)
    if ref.kind == "tiny":
        return TINY_CLASSES[ref.location]
    try:
        if ref.kind == "hub":
            index = _hub_model_index(ref.location, config.revision)
        else:
            fs, root = filesystem.open_url(ref.location, config.storage_options)
            index = json.loads(filesystem.read_bytes(fs, filesystem.join(root, "model_index.json")))
    except Exception as exc:  # noqa: BLE001 - any failure means the same advice
        if not required:
            return None
        raise ModelError(
            f"cannot read model_index.json of model {config.ref!r} ({type(exc).__name__}: {exc}); "
            f"set model.family to one of {', '.join(FAMILIES)} to run it without reading it first"
        ) from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(class_name, str):
        raise ModelError(f"model_index.json of model {config.ref!r} names no _class_name; is it a diffusers pipeline folder?")
    return class_name


def _hub_model_index(repo: str, revision: str) -> dict:
    """The hub model's ``model_index.json``: from the local hub cache when there, else one
    request (huggingface_hub's own download retries for half a minute when offline)."""
    from huggingface_hub import get_session, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    try:
        with open(hf_hub_download(repo, "model_index.json", revision=revision, local_files_only=True)) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - not cached: ask the hub
        pass
    response = get_session().get(hf_hub_url(repo, "model_index.json", revision=revision), headers=build_hf_headers(), timeout=10)
    response.raise_for_status()
    return response.json()
