"""Stable Diffusion 1.5 and SDXL built from their public configs, with random weights.

Timing does not depend on weight values, so a pipeline with the published architecture and
random weights runs as fast as the real one (save for NaN-heavy outputs, which the
benchmark counts). The configs are those of ``runwayml/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, CLIP ViT-L/14 and OpenCLIP
ViT-bigG/14 text encoders, default schedulers); only the tokenizers differ: a byte-level
CLIP tokenizer (no vocabulary download), padded to 77 tokens like CLIP's, so every
sequence length is the real one. ``tiny`` keeps each architecture's shape (block types,
depth pattern, conditioning) with far fewer channels and layers, for a CPU smoke run.

Each pipeline is saved once with ``save_pretrained`` into a cache folder and loaded back by
whoever measures it, through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import os

CLIP_VOCAB = 49408
CLIP_TOKENS = 77
# Bump when a config below changes, so a cached folder of the old shape is not reused.
VERSION = 1


def default_resolution(model: str, size: str) -> int:
    if size == "tiny":
        return 128
    return {"sd15": 512, "sdxl": 1024}[model]


def ensure_model(model: str, size: str, cache_dir: str, device: str = "cpu") -> str:
    """The folder holding the saved pipeline, built on ``device`` (fast random init on a GPU)
    on first use. Full-size weights are saved in float16 to halve disk and load time."""
    from pipeline.storage.filesystem import fill_folder_once

    target = os.path.join(cache_dir, "models", f"bench-{model}-{size}-v{VERSION}")

    def build(staging: str) -> None:
        import torch

        with torch.device(device):
            pipe = build_pipeline(model, size)
        if size == "full":
            pipe.to(torch.float16)
        pipe.save_pretrained(staging, safe_serialization=True)

    return fill_folder_once(target, build, "model_index.json")


def build_pipeline(model: str, size: str):
    """A random-weight pipeline of ``model`` (``sd15``/``sdxl``) at ``size`` (``full``/``tiny``),
    deterministic given torch's default device."""
    builders = {"sd15": _sd15, "sdxl": _sdxl}
    if model not in builders or size not in ("full", "tiny"):
        raise ValueError(f"unknown model {model!r} or size {size!r}; models: sd15, sdxl; sizes: full, tiny")
    return builders[model](size == "tiny")


def _sd15(tiny: bool):
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.engine.tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer(CLIP_TOKENS)
    width = 64 if tiny else 768  # text hidden size = the UNet's cross-attention width
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64) if tiny else (320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,  # SD 1.x's name for 8 heads per block
        norm_num_groups=32,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )
    vae = _vae(tiny, scaling_factor=0.18215, force_upcast=True)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_l(tiny, len(tokenizer), width))
    with torch.device("cpu"):  # schedulers keep their tables on the CPU, whatever the build device
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
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


def _sdxl(tiny: bool):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.engine.tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer(CLIP_TOKENS)
    width_l, width_g = (32, 64) if tiny else (768, 1280)
    time_dim = 8 if tiny else 256
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128) if tiny else (320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if tiny else (1, 2, 10),
        attention_head_dim=(2, 4, 8) if tiny else (5, 10, 20),  # heads per block: head size 16 / 64
        cross_attention_dim=width_l + width_g,  # both text encoders' states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + width_g,  # 6 size/crop numbers + pooled text
        norm_num_groups=32,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )
    vae = _vae(tiny, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_l(tiny, len(tokenizer), width_l))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer) if tiny else CLIP_VOCAB,
            hidden_size=width_g,
            intermediate_size=4 * width_g,
            num_hidden_layers=2 if tiny else 32,
            num_attention_heads=4 if tiny else 20,
            projection_dim=width_g,
            hidden_act="gelu",
            max_position_embeddings=CLIP_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    with torch.device("cpu"):  # schedulers keep their tables on the CPU, whatever the build device
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            interpolation_type="linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            use_karras_sigmas=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=byte_tokenizer(CLIP_TOKENS),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _clip_l(tiny: bool, tiny_vocab: int, width: int):
    """CLIP ViT-L/14's text tower (SD 1.5's encoder, SDXL's first)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=tiny_vocab if tiny else CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2 if tiny else 12,
        num_attention_heads=4 if tiny else 12,
        projection_dim=width,
        hidden_act="quick_gelu",
        max_position_embeddings=CLIP_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae(tiny: bool, scaling_factor: float, force_upcast: bool):
    """The KL autoencoder both models share in shape: 8x downsampling, 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
