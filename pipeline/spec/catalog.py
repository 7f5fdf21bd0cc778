"""The job's models and adapters as resolved data: :class:`Catalog`.

Built once on the driver by :func:`pipeline.engine.resolve_catalog.build_catalog` (which reads
model indexes and hashes adapter files) and shipped as plain data to the validator
(request ids, row checks) and the engine actors (which model and adapter a row names), so
nothing is looked up twice or differently in two places. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.spec.config import LoraConfig, ModelConfig
from pipeline.spec.families import Family
from pipeline.spec.model_config import ScoringConfig


@dataclass(frozen=True)
class ModelEntry:
    """One named model: its config and what the driver learnt about it.

    ``size_multiple``: what every width and height must be a multiple of for this model,
    and ``size_rule`` why (see :meth:`Family.size_multiple`). ``scheduler_class``: the
    diffusers scheduler class it runs with (``model.scheduler``'s, else the one it was
    saved with; None when that cannot be read before the job). ``has_safety_checker``:
    whether the model ships a safety checker (its ``model_index.json`` names one); None:
    unknown (a hub model whose index the driver could not read).
    """

    name: str
    config: ModelConfig
    fingerprint: str
    family: Family
    pipeline_class: str
    size_multiple: int = 8
    size_rule: str = ""
    scheduler_class: Optional[str] = None
    has_safety_checker: Optional[bool] = False
    # A hub model's revision resolved to its commit hash (None for other kinds): what the
    # fingerprint names and what the engine loads, so a moving branch cannot mix weights.
    commit: Optional[str] = None

    def loading_config(self) -> ModelConfig:
        """The config the engine loads: a hub model pinned to its resolved commit."""
        return self.config.model_copy(update={"revision": self.commit}) if self.commit else self.config


@dataclass(frozen=True)
class AdapterEntry:
    """One named LoRA adapter and the digest of its file."""

    name: str
    config: LoraConfig
    digest: str


@dataclass(frozen=True)
class ScorerEntry:
    """The spec's CLIP scorer and the fingerprint of its weights."""

    config: ScoringConfig
    fingerprint: str


@dataclass(frozen=True)
class Catalog:
    """Every model and adapter of a spec, by name; ``default_model`` is the rows' default;
    ``scorer`` the CLIP model that scores images (None without a scoring section)."""

    models: dict[str, ModelEntry]
    default_model: str
    loras: dict[str, AdapterEntry]
    scorer: Optional[ScorerEntry] = None

    def by_digest(self) -> dict[str, LoraConfig]:
        """Adapter configs by digest: what a generation request names."""
        return {entry.digest: entry.config for entry in self.loras.values()}
