"""The tiny random-weight pipelines used by tests and the demo: one per family.

Built offline from configs (denoiser, VAE, CLIP and T5 text encoders, and tokenizers
written here), with fixed seeds, so every machine builds the same weights. Each is saved
with ``save_pretrained`` into a cache folder and loaded back through the same
``from_pretrained`` path as real weights: what the tests exercise is the real loading code.

Each mirrors the shape of its real family (SDXL's two CLIP encoders and size conditioning,
SD3's CLIP-L + CLIP-G + T5 and flow matching, FLUX.1-dev's embedded guidance) at a few MB,
so a 64x64 image takes well under a second on a CPU. The sizes differ from the real ones:
the VAEs downsample by 2, not 8, and SD3's position table covers images up to 384 pixels.
"""

from __future__ import annotations

import os
from typing import Callable

# Bump a version when its builder's weights change: it is part of the model fingerprint,
# so images made by an older tiny model are never mistaken for the new one's.
TINY_MODELS: dict[str, str] = {
    "tiny": "tiny-sd-1",
    "tiny-sdxl": "tiny-sdxl-1",
    "tiny-sd3": "tiny-sd3-1",
    "tiny-flux": "tiny-flux-1",
}
TINY_VERSION = TINY_MODELS["tiny"]
TINY_MAX_TOKENS = 77
# T5 needs no bound of its own: families pass max_sequence_length; this only silences
# the tokenizer's "longer than the model" notice up to FLUX's largest length.
TINY_T5_MAX_TOKENS = 512
# What tiny adapters adapt: a UNet's attention projections (as diffusers' own LoRA tests
# do); for the transformers also the text stream's projections and the MLP and output
# layers, without which their single block barely notices an adapter.
LORA_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out"],
}


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


def _clip_config(with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_byte_vocab()),
        max_position_embeddings=TINY_MAX_TOKENS,
        **({"projection_dim": 32} if with_projection else {}),
    )


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over printable ASCII, one piece per character, word-initial
    or not: T5 counts come out near one token per character, so long prompts meet small
    ``max_sequence_length`` values quickly. Built from scores in code (sentencepiece is
    not needed) and saved as ``tokenizer.json``, which ``from_pretrained`` reads back."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_T5_MAX_TOKENS)


def _t5_encoder(d_model: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(_t5_tokenizer()),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _sd_vae(**extra):
    """The SD/SDXL style VAE (4 latent channels, quant convs), seeded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        **extra,
    )


def _flow_vae():
    """The SD3/FLUX style VAE: no quant convs, shift and scale factors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_sd():
    """A StableDiffusionPipeline with ~2M random parameters; 64x64 images in tens of ms on CPU."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    vae = _sd_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
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


def build_tiny_sdxl():
    """A StableDiffusionXLPipeline: two CLIP encoders (the second with a projection, whose
    pooled output joins the size conditioning of a ``text_time`` UNet), Euler scheduler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_embed_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # Six size numbers (original size, crop corner, target size), each embedded, plus
        # the second encoder's pooled projection.
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        # Both encoders' hidden states, concatenated.
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = _sd_vae(sample_size=128)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(with_projection=True))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=byte_tokenizer(),
        tokenizer_2=byte_tokenizer(),
        scheduler=scheduler,
    )


def build_tiny_sd3():
    """A StableDiffusion3Pipeline: MMDiT transformer, CLIP-L and CLIP-G (both with
    projections, pooled outputs concatenated), a T5 encoder, flow-matching Euler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        # CLIP states (32 + 32, zero-padded to T5's width) and T5 states share this width.
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config(with_projection=True))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(with_projection=True))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_flow_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=_t5_encoder(d_model=64),
        tokenizer=byte_tokenizer(),
        tokenizer_2=byte_tokenizer(),
        tokenizer_3=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_tiny_flux():
    """A FluxPipeline like FLUX.1-dev: guidance is an input of the transformer
    (``guidance_embeds=True``), CLIP gives the pooled vector, T5 the sequence."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        # Latents are packed in 2x2 patches: 4 latent channels in, 16 transformer channels.
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    return FluxPipeline(
        transformer=transformer,
        vae=_flow_vae(),
        text_encoder=text_encoder,
        text_encoder_2=_t5_encoder(d_model=32),
        tokenizer=byte_tokenizer(),
        tokenizer_2=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


_BUILDERS: dict[str, Callable] = {
    "tiny": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
}


def _builder(name: str) -> Callable:
    if name not in _BUILDERS:
        from pipeline.errors import ModelError

        raise ModelError(f"no tiny model named {name!r}; the tiny models are {', '.join(TINY_MODELS)}")
    return _BUILDERS[name]


def ensure_tiny(cache_dir: str, name: str = "tiny") -> str:
    """The folder holding the saved tiny pipeline ``name`` (a key of :data:`TINY_MODELS`),
    building it on first use (safe when several processes race for it). The folder is
    named by the builder's version, so a new version is built beside an old one."""
    from pipeline.storage.filesystem import fill_folder_once

    build = _builder(name)
    target = os.path.join(cache_dir, "models", TINY_MODELS[name])
    return fill_folder_once(target, lambda staging: build().save_pretrained(staging, safe_serialization=True), "model_index.json")


def build_tiny_lora(name: str, target_dir: str, seed: int = 0, rank: int = 4) -> str:
    """Write a LoRA adapter for the tiny model ``name`` into ``target_dir`` and return the
    path of its ``.safetensors`` file, which the pipeline's ``load_lora_weights`` accepts.

    The adapter covers the UNet or transformer (:data:`LORA_TARGETS`), not the text
    encoders. Both LoRA matrices are random (seeded by ``seed``), unlike peft's default
    zero ``B`` that makes a fresh adapter a no-op: this one visibly changes images.
    """
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _builder(name)()
    denoiser_name = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=LORA_TARGETS[denoiser_name]))
    weight_name = f"{name}-lora-r{rank}-s{seed}.safetensors"
    type(pipe).save_lora_weights(
        target_dir,
        **{f"{denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser)},
        weight_name=weight_name,
        safe_serialization=True,
    )
    return os.path.join(target_dir, weight_name)
