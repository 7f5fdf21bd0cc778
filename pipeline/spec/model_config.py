"""The spec's model sections: which diffusers pipeline (:class:`ModelConfig`), how the
engine runs it (:class:`EngineOptions`), the LoRA adapters rows may name
(:class:`LoraConfig`), and the CLIP model that scores images (:class:`ScoringConfig`)."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from pipeline.spec.families import FamilyName
from pipeline.spec.section import Section, StorageURL

# Which of these a model can use depends on its family (families.Family.schedulers).
SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lms", "unipc", "flow_euler"]

AttentionKernel = Literal["sdpa", "flash", "efficient", "cudnn", "eager"]


class EngineOptions(Section):
    """How the engine runs its model: speed and memory, never what an image is, so none
    enters the request id. Precision is not here: ``model.dtype`` changes pixels by more
    than these options may.

    **Tolerance.** Each option, and all of them together, keeps every image within 2/255
    (largest absolute difference of a pixel channel) of the plain path (``attention:
    sdpa``, every other option off), checked by tests/test_engine_options.py on the tiny
    model on CPU in float32. On CUDA in float16/bfloat16 the check has not been run yet:
    benchmarks/gpu_engine.py reports the same largest difference for each variant it
    times, and is where it gets measured.

    **Defaults** are what is safe and no slower on CPU, where the test suite runs. The GPU
    defaults are not measured yet (BENCHMARKS.md, "GPU engine"); after a GPU run we expect
    ``channels_last`` and ``fuse_qkv`` to become true, and ``compile`` for long jobs.

    ``encode_prompts_once``: each distinct prompt and negative prompt of a call goes
    through the text encoders once (every family; see ``pipeline/family_calls.py``).

    ``attention``: the denoiser's attention kernel. ``sdpa``: torch's
    ``scaled_dot_product_attention`` picks a kernel per call (diffusers' default). ``flash``,
    ``efficient``, ``cudnn``: SDPA held to that one kernel (FlashAttention-2, memory-efficient,
    cuDNN); the engine tries it on the model's head sizes at load and raises
    :class:`~pipeline.errors.ModelError` if it cannot run here (``efficient`` and ``cudnn``
    need CUDA; ``flash`` on CUDA needs float16/bfloat16). ``eager``: diffusers' plain
    matmul-softmax processor (UNet models only), the slow reference.

    ``channels_last``: UNet and VAE in channels-last memory format (pays on CUDA tensor
    cores). ``fuse_qkv``: fused query/key/value projections (diffusers'
    ``fuse_qkv_projections``; needs an SDPA kernel).

    ``vae_chunk_size``: decode the latents of a call N images at a time, bounding VAE
    memory at large batch sizes (the VAE decode at 1024x1024 can take more memory than the
    denoiser); unset decodes the whole call at once. 1 is what diffusers calls VAE slicing.

    ``compile``: ``torch.compile`` of the denoiser. The first call at each new input shape
    pays the compile time (``Engine.compile_seconds`` adds it up, and it is logged);
    compiled graphs are cached under ``model.cache_dir``/inductor, so a restarted actor
    loads them instead of compiling again.

    ``max_batch_pixels``: the most pixels (images x width x height) one diffusers call
    takes, so each size gets its own batch from one memory budget (``4194304`` is 16
    images at 512x512, 4 at 1024x1024); set it from ``benchmarks/gpu_engine.py``'s best
    batch size. Unset, a call takes every row of its bucket in the actor's batch
    (``runtime.batch_size``). Either way a call that runs out of memory is retried in
    halves, and that size's calls stay at most half as large from then on.
    """

    encode_prompts_once: bool = True
    attention: AttentionKernel = "sdpa"
    channels_last: bool = False
    fuse_qkv: bool = False
    vae_chunk_size: Optional[int] = Field(None, ge=1)
    compile: bool = False
    max_batch_pixels: Optional[int] = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "vae_slicing" in data:
            raise ValueError("vae_slicing is now vae_chunk_size: write vae_chunk_size: 1 for what vae_slicing: true did, or drop the line")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "EngineOptions":
        if self.fuse_qkv and self.attention == "eager":
            raise ValueError("fuse_qkv needs an SDPA attention kernel (the eager processor ignores fused projections); use attention: sdpa or fuse_qkv: false")
        return self


class ModelConfig(Section):
    """The diffusers pipeline each engine actor keeps resident.

    ``ref`` is ``tiny`` (a random-weight Stable Diffusion built offline, for tests and the
    demo; ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-flux`` are the same for the other
    families), a local diffusers folder, an ``s3://`` (or other fsspec) prefix holding one,
    or a Hugging Face hub id (``org/name`` at ``revision``). All go through the same
    ``from_pretrained`` path. ``family`` (sd, sdxl, sd3, flux) decides which row parameters
    the model takes; unset, it is read from the model's ``model_index.json`` before the job
    starts (set it for a hub model when the driver has no network access).
    ``dtype: auto`` is float16 on CUDA and float32 on CPU.
    ``scheduler`` swaps the pipeline's scheduler for a named one; unset keeps the model's.
    Which names a model takes is its family's (SD, SDXL: ddim, pndm, euler, euler_a,
    dpmpp_2m, lms, unipc; SD3, FLUX: flow_euler): another is a spec error before any work.
    Weights load from safetensors only unless ``allow_pickle`` is set. ``storage_options``
    reach the remote prefix (credentials, ``endpoint_url``); remote weights are copied once
    into ``cache_dir`` per node.

    ``safety_checker`` decides what happens to the verdicts of a model that ships a safety
    checker (Stable Diffusion 1.x: ``safety_checker`` in ``model_index.json``), which
    diffusers runs inside each call, blacking out the images it flags. ``flag`` (default):
    keep diffusers' black image and record ``nsfw_detected``; ``error``: a flagged image
    becomes an error row (stage generate) and no pixels are stored; ``off``: the checker is
    not loaded nor run (``nsfw_detected`` stays null; the manifest and the dataset card
    say so). ``off`` enters the request id, since it changes the pixels of images the
    checker would have blacked out: a later run with the checker on does not take them for
    its own. A model without a checker ignores the setting (``nsfw_detected`` is null).
    """

    ref: str = "tiny"
    revision: str = "main"
    family: Optional[FamilyName] = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scheduler: Optional[SchedulerName] = None
    allow_pickle: bool = False
    safety_checker: Literal["flag", "error", "off"] = "flag"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    cache_dir: str = Field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "imagegen"))


class LoraConfig(Section):
    """A LoRA adapter rows can name in their ``lora`` column.

    ``url`` is a ``.safetensors`` file in diffusers' LoRA format (what
    ``load_lora_weights`` reads), local or remote (``s3://``...; copied once per node into
    the model cache). ``scale`` is the weight of rows that give no ``lora_scale``. The
    file's content digest enters the request id of every image made with it, so replacing
    the file makes new images instead of reusing old ones.
    """

    url: StorageURL
    scale: float = Field(1.0, ge=-10, le=10)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ScoringConfig(Section):
    """The CLIP model that scores each image against its prompt (the ``clip_score`` column).

    ``ref`` names it as ``model.ref`` names a pipeline: ``tiny-clip`` (random weights built
    offline, for tests), a local folder saved with transformers' ``save_pretrained``
    (``config.json``, safetensors weights, tokenizer and image processor), an ``s3://``
    (or other fsspec) prefix holding one (copied once per node into ``cache_dir``), or a
    hub id (``openai/clip-vit-large-patch14``) at ``revision``. Weights load from
    safetensors only. Each engine actor keeps it resident beside its diffusion models, on
    the same device, in ``dtype`` (``auto``: float16 on CUDA, float32 on CPU), and scores
    each diffusers call's images on the image encoder's threads while the next call runs.
    The score is 100 x the cosine of CLIP's image and text embeddings, not clipped at 0,
    with the prompt cut to CLIP's 77 tokens (``clip_prompt_truncated`` says when).
    """

    ref: str
    revision: str = "main"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str = Field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "imagegen"))
