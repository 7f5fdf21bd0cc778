"""The job spec: pydantic models of its sections and the cross-field checks.

A spec is built once (:func:`pipeline.spec.load.load_spec`) and passed around whole; nothing reads options
from the environment. Every section forbids unknown fields, so a typo is an error that
names the field and lists the allowed ones instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pipeline.spec.model_config import LoraConfig, ModelConfig, ScoringConfig
from pipeline.spec.section import Section, StorageURL
from pipeline.spec.serve_config import ServeConfig

InputFormat = Literal["parquet", "csv", "tsv", "jsonl", "json"]
ImageFormat = Literal["png", "webp", "jpeg"]

# File name endings that decide the input format when `input.format` is not given.
_FORMAT_BY_SUFFIX: dict[str, InputFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}


def format_suffixes(fmt: str) -> tuple[str, ...]:
    """The name endings of ``fmt``'s files: a folder's other files are not read as ``fmt``."""
    return tuple(suffix for suffix, known in _FORMAT_BY_SUFFIX.items() if known == fmt)

# The per-row parameters: a prompt-table column of the same name (or mapped through
# `input.columns`) overrides the default for that row.
ROW_PARAMETERS = (
    "width",
    "height",
    "steps",
    "guidance_scale",
    "negative_prompt",
    "num_images",
    "seed",
    "max_sequence_length",
    "model",
    "lora",
    "lora_scale",
)


class InputConfig(Section):
    """Where the prompt table is and how its columns map to requests.

    ``url`` is a file or a folder of files (local path, ``s3://``, or any fsspec URL).
    ``format`` is taken from the file name ending when not given. Columns named like a
    ``defaults`` field (``width``, ``seed``...) override that default per row; ``columns``
    maps a parameter to a differently named column. Every other column is passed through
    to the output unchanged.
    """

    url: StorageURL
    format: Optional[InputFormat] = None
    prompt_column: str = "prompt"
    id_column: Optional[str] = None
    # Without id_column: a row is its content and occurrence (pipeline.spec.occurrences), or
    # (position, as before request-id scheme 3) its file and row number.
    identity: Literal["content", "position"] = "content"
    columns: dict[str, str] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _known_parameters(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ROW_PARAMETERS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; allowed: {', '.join(ROW_PARAMETERS)}")
        return value

    @model_validator(mode="after")
    def _infer_format(self) -> "InputConfig":
        if self.format is None:
            suffix = Path(self.url.rstrip("/")).suffix.lower()
            inferred = _FORMAT_BY_SUFFIX.get(suffix)
            if inferred is None:
                raise ValueError(
                    f"cannot tell the format of {self.url!r} from its name; "
                    f"set input.format to one of: {', '.join(sorted(set(_FORMAT_BY_SUFFIX.values())))}"
                )
            object.__setattr__(self, "format", inferred)
        return self

    def column_for(self, parameter: str) -> str:
        """The input column that carries ``parameter`` (mapped, or the parameter's own name)."""
        return self.columns.get(parameter, parameter)


class Defaults(Section):
    """Generation parameters for rows that do not carry their own.

    ``seed`` is the job seed: a row without a ``seed`` column value gets a seed derived
    from this and the row's identity (its id, else its file and position), never from
    where it lands in a batch. Image ``k`` of a row made with ``num_images > 1`` uses
    seed ``base + k``.

    ``model`` names the model (a key of ``models``) of rows without a ``model`` value; it
    may be left unset when the spec has one model. ``lora`` is the adapter of rows without
    a ``lora`` value (unset: none). ``max_sequence_length`` (T5 tokens) applies to SD3
    and FLUX models; unset, each takes its family's default (256 and 512). A default that
    a row's family does not take (``negative_prompt`` for FLUX, ``max_sequence_length``
    for SD and SDXL) is not applied to that row; the same value in the row's own column
    is an error, since it would be silently ignored.
    """

    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    num_images: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    max_sequence_length: Optional[int] = Field(None, ge=1)
    model: Optional[str] = None
    lora: Optional[str] = None


class Limits(Section):
    """Bounds every row is checked against; a row outside them becomes an error row."""

    max_width: int = Field(2048, ge=8)
    max_height: int = Field(2048, ge=8)
    max_steps: int = Field(200, ge=1)
    max_num_images: int = Field(16, ge=1)
    max_guidance_scale: float = Field(50.0, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)
    size_multiple: int = Field(8, ge=1)


class OutputConfig(Section):
    """Where and how the image dataset is written.

    ``mode``: ``incremental`` (default) adds to what earlier runs committed and skips
    request ids already there, so rerunning after a crash, or over a grown table, makes only
    what is missing; ``overwrite`` clears the output first; ``error_if_exists`` refuses an
    output that already holds a run.

    ``rows_per_part`` bounds a Parquet part: larger parts mean fewer files, smaller ones
    lose less work to a crash. Keep parts under ~100 MB so object stores take each one in
    a single (atomic) PUT.

    ``license`` goes into the dataset card (``README.md``) as a Hugging Face license id
    (``cc-by-4.0``, ``openrail``...); ``other`` until you decide, as the images' terms
    follow the model's license.

    ``lock_lease_s`` is the lease of the output's lock (``_lock.json``): the run renews it
    every third of this, retrying failed writes, and a run from another machine may take
    the output over once it has run out (a run killed on this machine is taken over at
    once). Longer survives longer storage outages; shorter frees the output of a lost
    machine sooner.

    ``retention_hours``: files a run sets aside (parts no commit record accepts, records a
    repair or rewrite replaced) wait this long in ``_trash/`` before a run deletes them;
    ``imagegen vacuum`` deletes them now. 0 deletes them at the next run's start.
    """

    url: StorageURL = Field("./output", validate_default=True)
    mode: Literal["incremental", "overwrite", "error_if_exists"] = "incremental"
    format: ImageFormat = "png"
    quality: int = Field(95, ge=1, le=100)
    rows_per_part: int = Field(256, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    license: str = "other"
    lock_lease_s: float = Field(120.0, ge=1)
    retention_hours: float = Field(168.0, ge=0)


class RuntimeConfig(Section):
    """How the job is laid out on Ray.

    ``address``: unset starts a local Ray; ``auto`` joins the running cluster; or a
    ``ray://`` URL; or a cluster's dashboard URL (``http://HEAD:8265``), which only
    ``imagegen submit`` reads: the job it submits runs with ``auto``. ``gpus_per_actor`` unset means 1 when the model runs on CUDA (explicitly,
    or ``auto`` with GPUs in the cluster) and 0 otherwise. ``task_cpus`` is the CPU request
    of each read/validate, encode and write task. Every stage's CPU request is explicit: with Ray's default of 1 CPU per actor, a small machine can give every CPU to
    the actors and starve the read task forever. ``progress_interval_s`` is the time
    between progress lines when stderr is not a terminal (logs, CI); on a terminal one
    progress line is redrawn in place. ``batch_size`` is the rows an engine actor takes at
    once (one Ray Data block); the engine splits them into uniform diffusers calls of at
    most ``model.engine.max_batch_pixels``. ``auto`` (the default) sizes blocks from the
    table's row count so that each actor gets about 8, within 64-256 rows
    (:func:`pipeline.spec.bucketing.block_rows`): Ray's overhead is per block, so tiny blocks put
    it on the GPUs' path, while big ones make a long tail of the last blocks with most
    actors idle, and more rows lost to a crash. ``model_memory_gb`` bounds the models one engine
    actor keeps loaded when the spec has several (least recently used out first); unset,
    half the actor's device memory (GPU memory on CUDA, RAM on CPU).

    ``call_deadline_factor`` and ``call_deadline_floor_s`` bound each engine call: one
    that runs longer than ``call_deadline_factor`` times the slowest recent call (per row,
    for a full block), and longer than ``call_deadline_floor_s``, is taken for hung: its
    block goes to another actor and its actor is restarted. The floor alone applies until
    a first call has finished; it must cover what a call may load (another model on first
    use, a first compile): raise it when models load from slow storage.
    """

    address: Optional[str] = None
    num_actors: int = Field(1, ge=1)
    gpus_per_actor: Optional[float] = Field(None, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: Union[Literal["auto"], int] = "auto"
    task_cpus: float = Field(0.5, gt=0)
    progress_interval_s: float = Field(10.0, gt=0)
    model_memory_gb: Optional[float] = Field(None, gt=0)
    call_deadline_factor: float = Field(5.0, ge=1)
    call_deadline_floor_s: float = Field(600.0, gt=0)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _rows_or_auto(cls, value: Any) -> Union[str, int]:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("should be auto or a whole number of rows >= 1")


class ThroughputEntry(Section):
    """Measured speed of one bucket: images per second of one engine actor (one GPU when
    the model runs on CUDA) at this size and step count. ``model`` is a ``model.ref``;
    unset, the entry applies to any model without an entry of its own."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    steps: int = Field(ge=1)
    images_per_s: float = Field(gt=0)
    model: Optional[str] = None


class PlanConfig(Section):
    """Inputs of ``imagegen validate``'s estimate of GPU-hours and cost.

    ``throughput`` entries add to the built-in table of :mod:`pipeline.batch.plan` (an entry for
    the same model, size and steps replaces the built-in one); a bucket without an entry
    is scaled from the nearest entry of its model by pixels x steps. ``price_per_gpu_hour``
    (in your currency) turns GPU-hours into a cost; unset, no cost is shown.
    """

    throughput: list[ThroughputEntry] = Field(default_factory=list)
    price_per_gpu_hour: Optional[float] = Field(None, ge=0)


class JobSpec(Section):
    """A whole job: input, model (or several ``models``), LoRA adapters, defaults, limits,
    output, runtime, the online front (serve), the inputs of the estimate ``imagegen
    validate`` prints (plan), and the CLIP model that scores images (scoring, optional).

    One model: the ``model`` section; its name in the output is its ``ref``. Several:
    ``models: {name: {ref, dtype, ...}}``, a ``model`` column picking one per row and
    ``defaults.model`` the rest. Use one form or the other, not both.
    """

    input: InputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    loras: dict[str, LoraConfig] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    # Optional: without it no image is scored (clip_score stays null).
    scoring: Optional[ScoringConfig] = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        d, lim = self.defaults, self.limits
        problems = []
        for name, value, limit in (
            ("width", d.width, lim.max_width),
            ("height", d.height, lim.max_height),
            ("steps", d.steps, lim.max_steps),
            ("num_images", d.num_images, lim.max_num_images),
            ("guidance_scale", d.guidance_scale, lim.max_guidance_scale),
        ):
            if value > limit:
                problems.append(f"defaults.{name}={value} is above limits.max_{name}={limit}")
        for name in ("width", "height"):
            value = getattr(d, name)
            if value % lim.size_multiple:
                problems.append(f"defaults.{name}={value} is not a multiple of limits.size_multiple={lim.size_multiple}")
        if self.models and "model" in self.model_fields_set:
            problems.append("set either model (one model) or models (several, by name), not both")
        names = list(self.named_models())
        if d.model is not None and d.model not in names:
            problems.append(f"defaults.model={d.model!r} is not a model of this spec; allowed: {', '.join(names)}")
        if d.model is None and len(names) > 1:
            problems.append(f"defaults.model is needed with several models (rows without a model column use it); allowed: {', '.join(names)}")
        if d.lora is not None and d.lora not in self.loras:
            allowed = ", ".join(self.loras) or "none: add a loras section"
            problems.append(f"defaults.lora={d.lora!r} is not in loras; allowed: {allowed}")
        devices = {m.device for m in self.named_models().values()}
        if "cuda" in devices and self.runtime.gpus_per_actor == 0:
            problems.append("model.device is cuda but runtime.gpus_per_actor is 0; give each actor a GPU or use device cpu")
        if len(devices) > 1:
            problems.append(f"all models must share one device (the engine actors' resources are one); got {sorted(devices)}")
        for quality, steps in self.serve.quality_steps.items():
            if steps > lim.max_steps:
                problems.append(f"serve.quality_steps.{quality}={steps} is above limits.max_steps={lim.max_steps}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def named_models(self) -> dict[str, ModelConfig]:
        """The spec's models by name: ``models``, or the one ``model`` named by its ref."""
        return dict(self.models) if self.models else {self.model.ref: self.model}

    def default_model(self) -> str:
        """The name of the model of rows that do not pick one."""
        return self.defaults.model or next(iter(self.named_models()))

    def redacted(self) -> dict[str, Any]:
        """The spec as plain data with storage credentials removed, for manifests and logs."""
        data = self.model_dump(mode="json")
        sections = [data["input"], data["output"], data["model"], *data["models"].values(), *data["loras"].values()]
        sections += [data["scoring"]] if data["scoring"] else []
        for section in sections:
            section["storage_options"] = {k: "<redacted>" for k in section["storage_options"]}
        return data

    def fingerprint(self) -> str:
        """A digest of everything in the spec but credentials: two runs of one spec share it."""
        canonical = json.dumps(self.redacted(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
