"""The engine: one diffusers pipeline, loaded once and kept resident, turning requests
into uint8 images. Knows nothing of Ray, HTTP or Parquet; the batch job and the Serve
deployment both hold one.

Trade-offs worth knowing:

- **One generator per image, on the CPU.** Each image's initial noise comes from its own
  ``torch.Generator`` seeded with the row's seed, so an image does not depend on which
  rows shared its batch. CPU generators make the noise identical on any device; on CPU
  the batch still changes pixels by at most 1/255 through kernel blocking.
- **Failures are per row.** A failed call is retried on each half of its group, down to
  single rows (this also answers CUDA out-of-memory by shrinking the batch). A row that
  fails alone, or whose image comes out NaN, gets an error result; its neighbours are
  still generated.
- **LoRA adapters are loaded once and switched per call.** A group (one diffusers call)
  shares one adapter setting; each adapter named by a request is loaded into the pipeline
  on first use under its digest and stays, inactive when a call names no adapter
  (``disable_lora``). An adapter that does not fit the model fails its rows with a
  :class:`AdapterError` and is not retried in halves.
- **Safety checker verdicts are kept.** A model that ships a safety checker (SD 1.x)
  has diffusers black out the images it flags; each result says whether its image was
  flagged (``nsfw_detected``), and ``model.safety_checker`` decides whether a flagged
  image is kept (``flag``), becomes an error (``error``), or the checker is not loaded
  at all (``off``).
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from pipeline.engine import compile_cache, family_calls, weight_sources
from pipeline.engine.call_size import CallSizes
from pipeline.engine.kernels import CompileClock, compile_batch_dynamic, decode_in_chunks, is_out_of_memory, set_attention, use_compile_cache
from pipeline.engine.requests import AdapterError, GenerationRequest, GenerationResult, ImageFlagged, ImageIsNaN
from pipeline.spec.bucketing import group_by_bucket, halves
from pipeline.spec.families import SCHEDULER_CLASSES
from pipeline.spec.model_config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)


def resolve_device(config: ModelConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import ModelError

        raise ModelError("model.device is cuda but this worker sees no GPU; use device auto or cpu, or give actors GPUs")
    return config.device


def _load_pipeline(location: str, kwargs: dict):
    """The text-to-image pipeline saved at ``location`` and its family.

    ``AutoPipelineForText2Image`` maps a saved image-to-image or inpainting pipeline onto
    its text-to-image sibling over the same weights. Should it refuse a class that one of
    our families covers, the plain ``DiffusionPipeline`` loader gets a try. A class no
    family covers raises :class:`ModelError`: before any weights are read when Auto
    refuses it too, after loading when Auto knows it (PixArt, say).
    """
    import diffusers

    from pipeline.errors import ModelError
    from pipeline.spec.families import UnknownFamily, family_of_class

    def family(class_name: str):
        try:
            return family_of_class(class_name)
        except UnknownFamily as exc:
            raise ModelError(f"{exc}; point model.ref at a model saved from one of those pipeline classes") from None

    try:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(location, **kwargs)
    except ValueError:
        revision = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
        family(diffusers.DiffusionPipeline.load_config(location, **revision)["_class_name"])
        pipe = diffusers.DiffusionPipeline.from_pretrained(location, **kwargs)
    return pipe, family(type(pipe).__name__)


class Engine:
    """A resident diffusers pipeline.

    Construction loads the weights (the slow part: build it once per process). Then
    :meth:`generate` takes any list of requests and returns one result per request,
    in order, never raising for a single row's failure.
    """

    def __init__(self, config: ModelConfig, adapters: Optional[Mapping[str, LoraConfig]] = None):
        import diffusers
        import torch
        import transformers

        # Load-time bars and notices are noise in a job log of many actors.
        for library in (diffusers, transformers):
            library.logging.set_verbosity_error()
            library.logging.disable_progress_bar()
        self.config = config
        # LoRA adapters requests may name, by digest; loaded on first use.
        self.adapters = dict(adapters or {})
        self._loaded_adapters: set[str] = set()
        self._adapter_setting: Optional[tuple[str, float]] = None
        self.call_sizes = CallSizes(config.engine.max_batch_pixels)
        self.device = resolve_device(config)
        dtype_name = config.dtype if config.dtype != "auto" else ("float16" if self.device == "cuda" else "float32")
        self.dtype = getattr(torch, dtype_name)
        location = weight_sources.materialize(config)
        kwargs = {"dtype": self.dtype, "use_safetensors": not config.allow_pickle}
        if weight_sources.parse_ref(config.ref).kind == "hub":
            kwargs["revision"] = config.revision
        if config.safety_checker == "off":
            kwargs["safety_checker"] = None  # not loaded at all (pipelines without one ignore it)
        self.pipe, self.family = _load_pipeline(location, kwargs)
        if config.scheduler:
            self.family.check_scheduler(config.scheduler, "model.scheduler", config.ref)
            scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[config.scheduler])
            self.pipe.scheduler = scheduler_class.from_config(self.pipe.scheduler.config)
        self.pipe.to(self.device)
        self._apply_options(config)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_name = type(self.pipe.scheduler).__name__

    def _apply_options(self, config: ModelConfig) -> None:
        import torch

        options = config.engine
        denoiser_name = "unet" if hasattr(self.pipe, "unet") else "transformer"
        denoiser = getattr(self.pipe, denoiser_name)
        if options.fuse_qkv and hasattr(self.pipe, "fuse_qkv_projections"):
            self.pipe.fuse_qkv_projections()
            self._qkv_fused = True
        set_attention(denoiser, options.attention, self.device)
        if options.channels_last:
            for module in (denoiser, self.pipe.vae):
                module.to(memory_format=torch.channels_last)
        if options.vae_chunk_size is not None:
            self.pipe.vae.decode = decode_in_chunks(self.pipe.vae.decode, options.vae_chunk_size)
        # What this engine's calls spent in torch.compile: compiles (graphs built or loaded),
        # those found in the cache, seconds. All stay 0 without `compile`.
        self.compiles = self.compiles_from_cache = 0
        self.compile_seconds = 0.0
        self._compiling = options.compile is True  # "auto" is the driver's to resolve; unresolved, it is off
        if self._compiling:
            use_compile_cache(config.cache_dir)
            compile_cache.load(config)
            CompileClock.get()
            setattr(self.pipe, denoiser_name, compile_batch_dynamic(denoiser))
            if options.compile_vae:
                self.pipe.vae.decoder = compile_batch_dynamic(self.pipe.vae.decoder)
        self._encode_once = options.encode_prompts_once

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request; uniform ones share diffusers calls of at most
        :meth:`call_size` images."""
        results: list[Optional[GenerationResult]] = [None] * len(requests)
        for group in group_by_bucket(requests):
            size = self.call_size(requests[group[0]])
            for start in range(0, len(group), size):
                self._run(requests, group[start : start + size], results)
        return results  # type: ignore[return-value]

    def call_size(self, request: GenerationRequest) -> int:
        """The most images one diffusers call of ``request``'s size takes (the pixel budget
        and out-of-memory caps of :class:`~pipeline.engine.call_size.CallSizes`)."""
        return self.call_sizes.size(request.width, request.height)

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens each prompt takes in the family's longest text encoder, special tokens
        included, before truncation."""
        return family_calls.prompt_tokens(self.pipe, self.family, prompts)

    def token_limit(self, request: GenerationRequest) -> int:
        """The token count beyond which ``request``'s prompt is truncated."""
        return family_calls.token_limit(self.pipe, self.family, request)

    def _run(self, requests, group: list[int], results) -> None:
        batch = [requests[i] for i in group]
        try:
            self._use_adapter(batch[0].lora, batch[0].lora_scale)
        except AdapterError as exc:
            for index in group:
                results[index] = GenerationResult(error_type=type(exc).__name__, error_message=str(exc))
            return
        start = time.perf_counter()
        try:
            images, flagged = self._call(batch)
        except Exception as exc:  # noqa: BLE001 - one bad row must not take its batch down
            self._after_failure(exc)
            if is_out_of_memory(exc) and len(group) > 1:
                self.call_sizes.ran_out_of_memory(batch[0].width, batch[0].height, len(group))
            if len(group) > 1:
                log.warning("a call of %d images failed (%s: %s); retrying in halves", len(group), type(exc).__name__, exc)
                for half in halves(group):
                    self._run(requests, half, results)
                return
            results[group[0]] = GenerationResult(error_type=type(exc).__name__, error_message=str(exc) or repr(exc))
            return
        seconds = (time.perf_counter() - start) / len(group)
        tokens = self.count_tokens([r.prompt for r in batch])
        limit = self.token_limit(batch[0])
        # diffusers' verdicts, one per image; None when the pipeline ran no checker.
        verdicts = [bool(v) for v in flagged] if flagged is not None else [None] * len(group)
        for index, image, n_tokens, nsfw in zip(group, images, tokens, verdicts):
            if np.isnan(image).any():
                error = ImageIsNaN("the image came out NaN; try model.dtype float32 or bfloat16")
                results[index] = GenerationResult(seconds=seconds, error_type=type(error).__name__, error_message=str(error))
                continue
            if nsfw and self.config.safety_checker == "error":
                error = ImageFlagged(
                    "the model's safety checker flagged this image as possibly NSFW, and model.safety_checker is error, so no pixels "
                    "are stored; change the prompt or seed, or set model.safety_checker: flag to keep diffusers' black image with nsfw_detected true"
                )
                results[index] = GenerationResult(seconds=seconds, nsfw_detected=True, error_type=type(error).__name__, error_message=str(error))
                continue
            results[index] = GenerationResult(
                pixels=(image * 255).round().clip(0, 255).astype(np.uint8),
                seconds=seconds,
                prompt_tokens=n_tokens,
                prompt_truncated=n_tokens > limit,
                nsfw_detected=nsfw,
            )

    def _call(self, batch: list[GenerationRequest]) -> tuple[np.ndarray, Optional[list]]:
        """The call's images (``NxHxWx3`` floats in [0, 1]) and the safety checker's
        verdict per image (None when the pipeline has no checker, or it is off)."""
        import torch

        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        before = CompileClock.get().reading() if self._compiling else None
        try:
            with torch.inference_mode():
                kwargs = family_calls.call_kwargs(self.pipe, self.family, batch, self._encode_once)
                output = self.pipe(**kwargs, generator=generators, output_type="np")
        finally:
            if before is not None:
                self._count_compiles(before)
        return np.asarray(output.images), getattr(output, "nsfw_content_detected", None)

    def _count_compiles(self, before: tuple[int, int, float]) -> None:
        """Add a call's compiles to this engine's counts; share what it built fresh."""
        compiles, from_cache, seconds = (now - then for now, then in zip(CompileClock.get().reading(), before))
        if not compiles:
            return
        self.compiles += compiles
        self.compiles_from_cache += from_cache
        self.compile_seconds += seconds
        log.info("torch.compile: %d graph(s) in %.1f s (%d from the cache)", compiles, seconds, from_cache)
        if compiles > from_cache:
            compile_cache.save(self.config)

    def _use_adapter(self, digest: Optional[str], scale: float) -> None:
        """Make ``digest`` at ``scale`` the pipeline's one active adapter (None: no adapter)."""
        setting = (digest, scale) if digest else None
        if setting == self._adapter_setting:
            return
        if digest is None:
            self.pipe.disable_lora()
        else:
            if digest not in self._loaded_adapters:
                self._load_adapter(digest)
            self.pipe.enable_lora()
            self.pipe.set_adapters([_adapter_name(digest)], adapter_weights=[scale])
        self._adapter_setting = setting

    def _load_adapter(self, digest: str) -> None:
        from safetensors.torch import load_file

        from pipeline.engine import adapters

        config = self.adapters.get(digest)
        if config is None:
            raise AdapterError(f"no adapter with digest {digest} was given to this engine; it must come from the spec's loras")
        try:
            state = load_file(adapters.materialize(config, digest, self.config.cache_dir))
            if getattr(self, "_qkv_fused", False):
                # Adapters target the separate q/k/v projections that fusing replaced.
                self.pipe.unfuse_qkv_projections()
                self._qkv_fused = False
            self.pipe.load_lora_weights(state, adapter_name=_adapter_name(digest))
        except Exception as exc:  # noqa: BLE001 - any failure here means the adapter does not fit
            raise self._unfit(config, f"{type(exc).__name__}: {exc}") from None
        # diffusers skips (with a warning) weights that match no layer: an adapter for another
        # family loads as nothing at all.
        loaded = {name for names in self.pipe.get_list_adapters().values() for name in names}
        if _adapter_name(digest) not in loaded:
            raise self._unfit(config, "none of its weights match a layer of this model")
        self._loaded_adapters.add(digest)

    def _unfit(self, config: LoraConfig, reason: str) -> AdapterError:
        return AdapterError(
            f"LoRA {config.url} cannot be loaded into model {self.config.ref} ({type(self.pipe).__name__}): {reason}. "
            "Check that the adapter was trained for this model family"
        )

    def _after_failure(self, exc: Exception) -> None:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()


def _adapter_name(digest: str) -> str:
    return f"lora_{digest}"
