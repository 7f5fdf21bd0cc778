"""Model families: which diffusers pipelines we run and which row parameters each takes.

Pure: no torch, no Ray. The validator asks a family which parameters a row may set (a
parameter the family does not take is a row error, never silently dropped); the engine
asks it nothing here but reaches the family's own call conventions through
:mod:`pipeline.engine.family_calls`.

A family is recognised from the pipeline class named in the model's ``model_index.json``
(``_class_name``), or set explicitly with ``model.family`` when that file cannot be read
before the job starts (a hub id on a machine without network access, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

FamilyName = Literal["sd", "sdxl", "sd3", "flux"]

# Row parameters that only some families take. Every family takes prompt, seed, width,
# height, steps, guidance_scale and num_images.
OPTIONAL_PARAMETERS = ("negative_prompt", "max_sequence_length")


@dataclass(frozen=True)
class Family:
    """What one family of pipelines takes.

    ``takes``: the :data:`OPTIONAL_PARAMETERS` its pipelines accept. ``guidance``:
    ``cfg`` (classifier-free guidance: a conditional and an unconditional pass per step)
    or ``embedded`` (FLUX's distilled guidance: the scale is an input of the transformer,
    one pass per step, and there is no negative prompt). ``max_sequence_length``: the
    default and upper bound of T5 tokens for families with a T5 text encoder, else None.
    """

    name: FamilyName
    label: str
    pipeline_classes: tuple[str, ...]
    takes: frozenset[str]
    guidance: Literal["cfg", "embedded"]
    max_sequence_length: Optional[int] = None
    max_sequence_length_limit: Optional[int] = None

    def takes_parameter(self, parameter: str) -> bool:
        return parameter not in OPTIONAL_PARAMETERS or parameter in self.takes


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), frozenset({"negative_prompt"}), "cfg"),
        Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), frozenset({"negative_prompt"}), "cfg"),
        Family(
            "sd3",
            "Stable Diffusion 3",
            ("StableDiffusion3Pipeline",),
            frozenset({"negative_prompt", "max_sequence_length"}),
            "cfg",
            max_sequence_length=256,
            max_sequence_length_limit=512,
        ),
        Family(
            "flux",
            "FLUX.1",
            ("FluxPipeline",),
            frozenset({"max_sequence_length"}),
            "embedded",
            max_sequence_length=512,
            max_sequence_length_limit=512,
        ),
    )
}


class UnknownFamily(ValueError):
    """A pipeline class that no family covers."""


def family_of_class(class_name: str) -> Family:
    """The family whose pipelines include ``class_name``; :class:`UnknownFamily` otherwise."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise UnknownFamily(f"pipeline class {class_name!r} is not supported; supported text-to-image pipelines: {supported}")
