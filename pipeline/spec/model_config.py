"""The spec's model sections: which diffusers pipeline (:class:`ModelConfig`), how the
engine runs it (:class:`EngineOptions`), the LoRA adapters rows may name
(:class:`LoraConfig`), and the CLIP model that scores images (:class:`ScoringConfig`)."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

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

    **Tolerance.** No option enters the request id, so each must keep images close to the
    plain path (``attention: sdpa``, every other option off) in the same dtype; how close
    is measured, not promised: README, "Engine options", gives the largest difference of a
    pixel channel per option and where it was measured. On CPU in float32 every option
    stays within 2/255 (tests/test_engine_options.py checks it). In half precision on CUDA
    the H200 measured up to 7/255 (``fast``) and 8/255 (compiled) in bfloat16 with random
    weights; there the difference is bounded by no test, only measured
    (benchmarks/gpu_check.py). Each run's manifest records the resolved options of each
    model (``models.NAME.engine``), so how every image was made is known.

    **Defaults** are the measured choice per device. CPU: every option off but
    ``encode_prompts_once``. CUDA (H200, 2026-12-04, BENCHMARKS.md): ``channels_last``
    stays off (slower for UNet and VAE on both SD 1.5 and SDXL), ``max_batch_pixels``
    unset becomes 16 images at 512x512 (4 at 1024x1024), and ``compile: auto`` compiles
    the default model when the job gives each actor enough images of its shape to repay
    the compile (+37% on SD 1.5 for 41.5 s of compiling on an empty cache).

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

    ``compile``: ``torch.compile`` of the denoiser (``compile_vae``: of the VAE decoder
    too; not measured to pay yet). ``auto`` (default) is decided on the driver before the
    job (:func:`pipeline.engine.resolve_catalog.place`, logged with its reason): on CUDA,
    on when each actor's share of the default shape's images repays the compile at the
    measured H200 rates (:func:`pipeline.engine.gpu_rates.compile_choice`: about 900 SD 1.5
    images at 512x512 on an empty cache, about 100 when the shared store is warm); off
    on CPU, for ``imagegen serve`` and for an engine built without a job. ``true`` /
    ``false`` force it. One graph per image size: the batch dimension is dynamic, so
    calls of other sizes do not compile again. The compile's seconds are counted apart
    (``Engine.compile_seconds``; the run summary, the manifest and ``inspect`` report
    them). Compiled graphs are kept in ``model.cache_dir``/inductor on each node and
    shared through a store (:mod:`pipeline.engine.compile_cache`):
    ``compile_cache_url`` (object storage every node reaches, with
    ``model.storage_options``), else ``model.cache_dir``/compiled on the node; an engine
    loads what is there before its first call, so restarted actors, other nodes and later
    runs load graphs instead of compiling them.

    ``max_batch_pixels``: the most pixels (images x width x height) one diffusers call
    takes, so each size gets its own batch from one memory budget (``4194304`` is 16
    images at 512x512, 4 at 1024x1024). Unset: that on CUDA (the measured best, see
    Defaults), and on CPU a call takes every row of its bucket in the actor's batch
    (``runtime.batch_size``). Either way a call that runs out of memory is retried in
    halves, and that size's calls stay at most half as large from then on.
    """

    encode_prompts_once: bool = True
    attention: AttentionKernel = "sdpa"
    channels_last: bool = False
    fuse_qkv: bool = False
    vae_chunk_size: Optional[int] = Field(None, ge=1)
    compile: Union[Literal["auto"], bool] = "auto"
    compile_vae: bool = False
    compile_cache_url: Optional[StorageURL] = None
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
