"""The tiny random-weight Stable Diffusion used by tests and the demo.

Built offline from configs (UNet, VAE, CLIP text encoder, and a byte-level BPE tokenizer
written here), with fixed seeds, so every machine builds the same weights. It is saved
with ``save_pretrained`` into a cache folder and loaded back through the same
``from_pretrained`` path as real weights: what the tests exercise is the real loading code.
"""

from __future__ import annotations

import os

# Bump when anything below changes the weights: it is part of the model fingerprint, so
# images made by an older tiny model are never mistaken for the new one's.
TINY_VERSION = "tiny-sd-1"
TINY_MAX_TOKENS = 77


def _byte_vocab() -> dict[str, int]:
    """CLIP-style byte-level vocabulary without merges: every byte, alone or word-final."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return vocab


def byte_tokenizer(model_max_length: int = TINY_MAX_TOKENS):
    """A CLIP tokenizer over the byte-level vocabulary: any text, no downloaded vocabulary
    files, padded to ``model_max_length`` like CLIP's own."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=model_max_length)


def build_tiny_sd():
    """A StableDiffusionPipeline with ~2M random parameters; 64x64 images in tens of ms on CPU."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_TOKENS,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_tiny(cache_dir: str) -> str:
    """The folder holding the saved tiny pipeline, building it on first use (safe when
    several processes race for it)."""
    from pipeline.storage import fill_folder_once

    target = os.path.join(cache_dir, "models", TINY_VERSION)
    return fill_folder_once(target, lambda staging: build_tiny_sd().save_pretrained(staging, safe_serialization=True), "model_index.json")
