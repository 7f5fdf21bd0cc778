"""Tiny random-weight CLIP models for the quality columns, built offline like
:mod:`pipeline.engine.tiny_models`: a CLIP model that scores images (``scoring.ref:
tiny-clip``), and a Stable Diffusion safety checker whose verdicts a test sets.

Both see 32x32 images through a 2-layer vision transformer of width 32 and read text
with the byte-level tokenizer of the tiny pipelines (77 tokens), so scoring a call's
images costs milliseconds on a CPU. Saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import os

from pipeline.engine.tiny_models import _clip_config, build_tiny_sd, byte_tokenizer

# Bump a version when its builder's weights change: it is the scorer's fingerprint.
TINY_SCORERS: dict[str, str] = {"tiny-clip": "tiny-clip-1"}
_IMAGE_PX = 32


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=_IMAGE_PX, patch_size=4
    )


def _clip_model_config():
    from transformers import CLIPConfig

    return CLIPConfig(text_config=_clip_config().to_dict(), vision_config=_vision_config().to_dict(), projection_dim=32)


def _image_processor():
    """CLIP's preprocessing (resize, centre crop, CLIP's mean and std) at 32 pixels."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": _IMAGE_PX}, crop_size={"height": _IMAGE_PX, "width": _IMAGE_PX})


def build_tiny_clip():
    """A ``CLIPModel`` with random (seeded) weights and its ``CLIPProcessor``."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    model = CLIPModel(_clip_model_config()).eval()
    return model, CLIPProcessor(image_processor=_image_processor(), tokenizer=byte_tokenizer())


def ensure_tiny_clip(cache_dir: str, name: str = "tiny-clip") -> str:
    """The folder holding the saved tiny CLIP scorer ``name`` (a key of
    :data:`TINY_SCORERS`), building it on first use (safe when processes race for it)."""
    from pipeline.storage.filesystem import fill_folder_once

    if name not in TINY_SCORERS:
        from pipeline.errors import ModelError

        raise ModelError(f"no tiny scorer named {name!r}; the tiny scorers are {', '.join(TINY_SCORERS)}")

    def build(staging: str) -> None:
        model, processor = build_tiny_clip()
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)

    return fill_folder_once(os.path.join(cache_dir, "scorers", TINY_SCORERS[name]), build, "config.json")


def tiny_safety_checker(threshold: float):
    """A ``StableDiffusionSafetyChecker`` and its feature extractor that flag an image when
    the cosine of its embedding with one fixed concept direction exceeds ``threshold``.

    diffusers flags an image when ``round(cos - threshold, 3) > 0`` for any of its 17
    concepts (the 3 "special care" concepts only lower the bar); here all 17 share one
    direction and threshold and the special ones never fire. So ``-2`` flags every image,
    ``2`` none, and a value between two images' cosines (read from the checker's
    ``concept_embeds`` row 0 and its vision tower, as a test does) separates them.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(_clip_model_config()).eval()
    with torch.no_grad():
        direction = torch.randn(checker.concept_embeds.shape[1], generator=torch.Generator().manual_seed(1))
        checker.concept_embeds.copy_(direction.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(2.0)  # above any cosine: never fires
    return checker, _image_processor()


def save_tiny_sd_with_safety_checker(target_dir: str, threshold: float) -> str:
    """Save into ``target_dir`` the tiny Stable Diffusion pipeline (the same weights as
    ``model.ref: tiny``) with a :func:`tiny_safety_checker`, as SD 1.x checkpoints ship
    it (``safety_checker`` and ``feature_extractor`` in ``model_index.json``). Returns
    ``target_dir``, a folder ``model.ref`` takes."""
    pipe = build_tiny_sd()
    checker, extractor = tiny_safety_checker(threshold)
    pipe.register_modules(safety_checker=checker, feature_extractor=extractor)
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(target_dir, safe_serialization=True)
    return target_dir
