"""Prompt-image scores: a CLIP model kept resident beside the diffusion models.

Each engine actor (and Serve replica) loads the spec's ``scoring`` model once, on the
engine's device, and scores every diffusers call's images against their prompts on the
image encoder's threads (:class:`pipeline.engine.table_generation.ImageEncoder`), so the next
diffusers call starts while the last one is scored, as it does while the last one is
PNG-encoded. On a GPU the scorer's kernels share the device's stream with the next call:
it delays that call by the scorer's GPU time (a CLIP forward over the call's images),
never by waiting for it.

The score is ``100 x cos(image embedding, text embedding)``, the usual CLIP score, left
unclipped (torchmetrics' ``CLIPScore`` clips negatives to 0; a negative score here reads
as 0 there). The prompt is cut to the text encoder's length (77 tokens for CLIP), and
each image says whether its prompt was (``clip_prompt_truncated``). Each distinct prompt
of a call goes through the text encoder once.

Weights come through :mod:`pipeline.engine.weight_sources` as the pipelines' do (a tiny one
built offline, a local folder, an ``s3://`` prefix, a hub id), safetensors only; the
scorer's fingerprint is computed on the driver and written beside each score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.engine import weight_sources
from pipeline.engine.tiny_clip import TINY_SCORERS, ensure_tiny_clip
from pipeline.spec.model_config import ScoringConfig

CLIP_WEIGHTS = weight_sources.WeightsKind(
    field="scoring.ref",
    marker="config.json",
    saved_by="a CLIP model saved with transformers' save_pretrained (config.json, model.safetensors, tokenizer and preprocessor files)",
    tiny=TINY_SCORERS,
    build_tiny=ensure_tiny_clip,
)


def scorer_fingerprint(config: ScoringConfig) -> str:
    """Check the scorer's ref and weights on the driver (a pickle-only folder is refused:
    the scorer loads safetensors only) and return its fingerprint."""
    weight_sources.check_weights_format(config, CLIP_WEIGHTS)
    return weight_sources.fingerprint(config, CLIP_WEIGHTS)


@dataclass(frozen=True)
class Scores:
    """One call's scores, in the order of its images, and the seconds scoring took."""

    clip_scores: list[float]
    prompt_truncated: list[bool]
    seconds: float


class ClipScorer:
    """A resident CLIP model: :meth:`score` takes images and their prompts.

    Thread-safe for one caller at a time per thread (inference only, no state between
    calls); the encoder's pool calls it from its threads.
    """

    def __init__(self, config: ScoringConfig, device: str, fingerprint: str):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.fingerprint = fingerprint
        self.device = device
        dtype_name = config.dtype if config.dtype != "auto" else ("float16" if device == "cuda" else "float32")
        location = weight_sources.materialize(config, CLIP_WEIGHTS)
        revision = {"revision": config.revision} if weight_sources.parse_ref(config.ref, CLIP_WEIGHTS).kind == "hub" else {}
        model = transformers.CLIPModel.from_pretrained(location, dtype=getattr(torch, dtype_name), use_safetensors=True, **revision)
        self.model = model.to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(location, **revision)
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> Scores:
        """Scores of ``images`` (``HxWx3`` uint8) against ``prompts`` (one per image)."""
        import torch
        import torch.nn.functional as F

        started = time.perf_counter()
        distinct = list(dict.fromkeys(prompts))
        lengths = [len(ids) for ids in self.tokenizer(distinct, truncation=False)["input_ids"]]
        text = self.tokenizer(distinct, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            image_embeds = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
            text_embeds = _embedding(self.model.get_text_features(**text.to(self.device)))
        image_embeds = F.normalize(image_embeds.float(), dim=-1)
        text_embeds = F.normalize(text_embeds.float(), dim=-1)
        position = {p: k for k, p in enumerate(distinct)}
        rows = torch.tensor([position[p] for p in prompts], device=text_embeds.device)
        cosines = (image_embeds * text_embeds[rows]).sum(dim=-1)
        too_long = {p: n > self.max_tokens for p, n in zip(distinct, lengths)}
        return Scores(
            clip_scores=[100.0 * c for c in cosines.cpu().tolist()],
            prompt_truncated=[too_long[p] for p in prompts],
            seconds=time.perf_counter() - started,
        )


def _embedding(output):
    """transformers 5 returns the projected embedding as ``pooler_output`` of a model
    output; earlier versions return the tensor itself."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output
