"""What the engine is asked for and what it answers: plain data, shared by the engine,
the families' call conventions (:mod:`pipeline.engine.family_calls`) and the stage that
turns Arrow blocks into requests (:mod:`pipeline.engine.table_generation`). Its own module so that
those import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides one image's pixels, given the engine's model and scheduler."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    # T5 tokens (SD3, FLUX); None takes the family's default.
    max_sequence_length: Optional[int] = None
    # The LoRA adapter (its digest names it in the pipeline) and its weight; None: no adapter.
    lora: Optional[str] = None
    lora_scale: float = 1.0


@dataclass
class GenerationResult:
    """One image (``HxWx3`` uint8) or the error that stopped it."""

    pixels: Optional[np.ndarray] = None
    seconds: float = 0.0
    prompt_tokens: Optional[int] = None
    prompt_truncated: Optional[bool] = None
    # The model's safety checker flagged the image (diffusers blacked it out); None: no checker ran.
    nsfw_detected: Optional[bool] = None
    error_type: Optional[str] = None
    error_message: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.pixels is not None


class ImageIsNaN(RuntimeError):
    """The pipeline produced NaN pixels (often float16 overflow in the VAE)."""


class ImageFlagged(RuntimeError):
    """The model's safety checker flagged the image and ``model.safety_checker`` is ``error``."""


class AdapterError(RuntimeError):
    """A LoRA adapter that cannot be used with this engine's model."""
