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

from pipeline.errors import SpecError

FamilyName = Literal["sd", "sdxl", "sd3", "flux"]

# Row parameters that only some families take. Every family takes prompt, seed, width,
# height, steps, guidance_scale and num_images.
OPTIONAL_PARAMETERS = ("negative_prompt", "max_sequence_length")

# `model.scheduler` names -> diffusers scheduler classes.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
# Schedulers of noise-prediction (epsilon/v) models. Built from a flow-matching model's
# config they come out with prediction_type epsilon and make garbage without an error.
_DIFFUSION_SCHEDULERS = frozenset({"ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lms", "unipc"})
# Schedulers that integrate a flow-matching model's velocity (SD3, FLUX); FLUX also
# needs set_timesteps to take sigmas and mu, which FlowMatchEuler does.
_FLOW_SCHEDULERS = frozenset({"flow_euler"})


@dataclass(frozen=True)
class Family:
    """What one family of pipelines takes.

    ``takes``: the :data:`OPTIONAL_PARAMETERS` its pipelines accept. ``guidance``:
    ``cfg`` (classifier-free guidance: a conditional and an unconditional pass per step)
    or ``embedded`` (FLUX's distilled guidance: the scale is an input of the transformer,
    one pass per step, and there is no negative prompt). ``max_sequence_length``: the
    default and upper bound of T5 tokens for families with a T5 text encoder, else None.
    ``schedulers``: the ``model.scheduler`` names that can run its models (a spec naming
    another is refused before any work). ``size_rule``: how the pixel multiple a width or
    height must be is made from the model's VAE and transformer (see :meth:`size_multiple`).
    """

    name: FamilyName
    label: str
    pipeline_classes: tuple[str, ...]
    takes: frozenset[str]
    guidance: Literal["cfg", "embedded"]
    schedulers: frozenset[str]
    size_rule: Literal["unet", "patches", "packed"]
    max_sequence_length: Optional[int] = None
    max_sequence_length_limit: Optional[int] = None

    def takes_parameter(self, parameter: str) -> bool:
        return parameter not in OPTIONAL_PARAMETERS or parameter in self.takes

    def size_multiple(self, vae_scale_factor: int, patch_size: int) -> tuple[int, str]:
        """The number every width and height must be a multiple of for a model of this
        family whose VAE downsamples by ``vae_scale_factor`` and whose transformer takes
        ``patch_size`` patches, and why (for the error row). Off the multiple, diffusers
        refuses the call (SD, SDXL, SD3) or, worse, FLUX warns and rounds the size down, so
        the image would not have the size its row records."""
        if self.size_rule == "unet":
            # diffusers' SD and SDXL pipelines check `% 8` whatever the VAE.
            multiple = max(8, vae_scale_factor)
            return multiple, f"{self.label} pipelines take multiples of {multiple}"
        if self.size_rule == "patches":
            multiple = vae_scale_factor * patch_size
            return multiple, f"{self.label}: the VAE's {vae_scale_factor}x downsampling times the transformer's patch size {patch_size}"
        multiple = vae_scale_factor * 2
        return multiple, f"{self.label} packs latents in 2x2 patches: the VAE's {vae_scale_factor}x downsampling times 2"

    def check_scheduler(self, scheduler: Optional[str], setting: str, model: str) -> None:
        """Raise :class:`SpecError` naming ``setting`` when ``scheduler`` (a
        ``model.scheduler`` value; None keeps the model's own) cannot run this family."""
        if scheduler is None or scheduler in self.schedulers:
            return
        allowed = ", ".join(name for name in SCHEDULER_CLASSES if name in self.schedulers)
        kind = "flow-matching" if self.schedulers == _FLOW_SCHEDULERS else "noise-prediction"
        raise SpecError(
            f"{setting}: {scheduler!r} cannot run model {model!r}, a {self.label} model ({kind}: "
            f"other schedulers make noise without an error); allowed: {allowed}, or leave it unset to keep the model's own"
        )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), frozenset({"negative_prompt"}), "cfg", _DIFFUSION_SCHEDULERS, "unet"),
        Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), frozenset({"negative_prompt"}), "cfg", _DIFFUSION_SCHEDULERS, "unet"),
        Family(
            "sd3",
            "Stable Diffusion 3",
            ("StableDiffusion3Pipeline",),
            frozenset({"negative_prompt", "max_sequence_length"}),
            "cfg",
            _FLOW_SCHEDULERS,
            "patches",
            max_sequence_length=256,
            max_sequence_length_limit=512,
        ),
        Family(
            "flux",
            "FLUX.1",
            ("FluxPipeline",),
            frozenset({"max_sequence_length"}),
            "embedded",
            _FLOW_SCHEDULERS,
            "packed",
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
