"""Floating-point operations per generated image, counted by ``torch.utils.flop_counter``.

Two ways, which agree (the benchmark prints both where it can):

- :func:`pipeline_flops`: ``FlopCounterMode`` over one full pipeline call (one prompt,
  classifier-free guidance, the pipeline's scheduler): exact for what the pipeline runs.
  Needs real tensors, so at full size it takes minutes on a CPU and about a second on a GPU.
- :func:`component_flops`: the same model built on the meta device (no memory, no
  arithmetic), each part run once and multiplied out: text encoders for the prompt and the
  negative prompt, one denoiser evaluation on the CFG pair times the number of evaluations
  the scheduler makes for ``steps`` (PNDM makes steps + 1), one VAE decode. Runs at full
  size on any machine in seconds.

Counted: matrix products, convolutions and attention (2 FLOPs per multiply-add), the
operations that bound a GPU's arithmetic rate; norms, activations and the scheduler's
element-wise updates are not, as usual for MFU. Off CUDA, attention is held to SDPA's math
kernel while counting, because the CPU's fused kernel has no FLOP formula in torch and
would count as zero.
"""

from __future__ import annotations

import contextlib

PROMPT = "a photograph of an astronaut riding a horse"


def _counting_attention(device_type: str):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type == "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH]) if hasattr(torch.nn, "attention") else contextlib.nullcontext()


def pipeline_flops(pipe, resolution: int, steps: int, guidance_scale: float = 7.5) -> int:
    """FLOPs of one full call of ``pipe`` making one image (CFG on, negative prompt "")."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), _counting_attention(pipe.device.type), counter:
        pipe(
            PROMPT,
            negative_prompt="",
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        )
    return int(counter.get_total_flops())


def component_flops(model: str, size: str, resolution: int, steps: int) -> dict[str, int]:
    """FLOPs of one image by part (``text``, ``denoiser``, ``vae``, ``total``), counted on
    the meta device; ``denoiser_evaluations`` says how many denoiser passes that is."""
    import torch
    from architectures import build_pipeline
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        pipe = build_pipeline(model, size)
    pipe.scheduler.set_timesteps(steps)
    evaluations = len(pipe.scheduler.timesteps)
    latent = resolution // pipe.vae_scale_factor
    tokens = torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.long, device="meta")  # prompt + negative

    def count(fn) -> int:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), _counting_attention("meta"), counter:
            fn()
        return int(counter.get_total_flops())

    text = count(lambda: pipe.text_encoder(tokens, output_hidden_states=True))
    if hasattr(pipe, "text_encoder_2"):
        text += count(lambda: pipe.text_encoder_2(tokens, output_hidden_states=True))
    unet = pipe.unet
    sample = torch.zeros(2, unet.config.in_channels, latent, latent, device="meta")
    states = torch.zeros(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(2, pooled, device="meta"),
            "time_ids": torch.zeros(2, 6, device="meta"),
        }
    step = count(lambda: unet(sample, torch.tensor(999, device="meta"), encoder_hidden_states=states, **extra))
    z = torch.zeros(1, pipe.vae.config.latent_channels, latent, latent, device="meta")
    vae = count(lambda: pipe.vae.decode(z))
    denoiser = step * evaluations
    return {
        "text": text,
        "denoiser": denoiser,
        "denoiser_evaluations": evaluations,
        "denoiser_per_evaluation": step,
        "vae": vae,
        "total": text + denoiser + vae,
    }
