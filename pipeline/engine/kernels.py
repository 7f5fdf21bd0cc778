"""How the engine's denoiser and VAE run on the device: the attention kernel, VAE decoding
in chunks, compiling with a dynamic batch, the local compile cache and the clock of
compiles, and recognising out-of-memory errors. Pure torch, no
diffusers pipeline logic: the engine applies these to the modules it loaded."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# The SDPA kernels a spec may pin, by their EngineOptions.attention names.
_PINNED_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def set_attention(denoiser, name: str, device: str) -> None:
    """Route the denoiser's attention through ``name`` (see ``EngineOptions.attention``).
    Raises :class:`ModelError` when that kernel cannot run this model on ``device``."""
    from pipeline.errors import ModelError

    if name == "sdpa":
        return  # diffusers' default processors call torch's SDPA, which picks the kernel per call
    if name == "eager":
        try:
            denoiser.set_default_attn_processor()
        except (AttributeError, ValueError):
            raise ModelError(
                f"attention: eager works for UNet models (Stable Diffusion 1.x/2.x, XL) only, not {type(denoiser).__name__}; use attention: sdpa"
            ) from None
        return
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _PINNED_KERNELS[name])
    _try_kernel(denoiser, backend, name, device)
    forward = denoiser.forward

    # The whole forward runs under the pin: diffusers' UNet processors do not go through
    # its attention dispatcher, so its set_attention_backend would leave them alone.
    # torch.compile traces through sdpa_kernel (the compile test runs with flash pinned).
    @functools.wraps(forward)
    def pinned(*args, **kwargs):
        with sdpa_kernel([backend]):
            return forward(*args, **kwargs)

    denoiser.forward = pinned


def _try_kernel(denoiser, backend, name: str, device: str) -> None:
    """Run ``backend`` once at every head size of the denoiser's attention, in its dtype,
    so that a kernel that cannot serve this model fails at load, not on the first batch."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from pipeline.errors import ModelError

    dtype = denoiser.dtype
    head_sizes = {m.to_q.out_features // m.heads for m in denoiser.modules() if hasattr(m, "heads") and hasattr(m, "to_q")}
    for head_size in sorted(head_sizes) or [64]:
        query = torch.randn(1, 2, 64, head_size, device=device, dtype=dtype)
        key = torch.randn(1, 2, 77, head_size, device=device, dtype=dtype)  # 77: CLIP's text length
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")  # torch warns once per reason a kernel was skipped
                F.scaled_dot_product_attention(query, key, key)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0].rstrip(".")
            raise ModelError(
                f"attention: {name} cannot run this model on {device} in {str(dtype).removeprefix('torch.')} "
                f"(head size {head_size}): {reason}. Use attention: sdpa, which lets torch pick a kernel that can"
                + ("; flash on CUDA needs model.dtype float16 or bfloat16" if name == "flash" and device == "cuda" else "")
            ) from None


def decode_in_chunks(decode, size: int):
    """``vae.decode`` that decodes at most ``size`` latents at a time: peak VAE memory is
    that of ``size`` images, at the cost of one VAE call per chunk."""
    import functools

    import torch
    from diffusers.models.autoencoders.vae import DecoderOutput

    @functools.wraps(decode)
    def chunked(z, return_dict: bool = True, **kwargs):
        if z.shape[0] <= size:
            return decode(z, return_dict=return_dict, **kwargs)
        sample = torch.cat([decode(part, return_dict=False, **kwargs)[0] for part in z.split(size)])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    return chunked


def use_compile_cache(cache_dir: str) -> None:
    """Keep inductor's compiled graphs (and Triton's kernels) under ``cache_dir``/inductor,
    so a restarted actor loads them instead of compiling again.

    torch 2.13 reads the location from ``TORCHINDUCTOR_CACHE_DIR`` only
    (``torch._inductor.runtime.cache_dir_utils.cache_dir``; ``torch._inductor.config`` has
    no setting for it), so that variable is set here, for this process and the compile
    workers it starts. It is overwritten, not defaulted: torch writes its own default
    (under /tmp) into it the first time it looks, and the spec is where the cache lives.
    The FX graph cache itself is on by default (``torch._inductor.config.fx_graph_cache``)."""
    import os

    location = os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
    log.info("torch.compile: compiled graphs cached in %s", location)


def compile_batch_dynamic(module):
    """``torch.compile(module)`` that builds one graph per input shape *except the batch*:
    dimension 0 of every tensor argument is marked dynamic before each call, so a call of
    another size (the last call of a bucket, a batch halved after running out of memory, a
    chunk of the VAE) reuses the graph instead of compiling again. Height and width stay
    static: kernels specialised to an image size are the fast ones.

    ``maybe_mark_dynamic``, not ``mark_dynamic``: a batch of 1 (a call without
    classifier-free guidance) is specialised by torch and must not be an error. The mark is
    set from a hook on the compiled wrapper, outside the traced code (dynamo refuses to
    trace the marking itself)."""
    import torch

    def mark_batch(_module, args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)

    compiled = torch.compile(module)
    compiled.register_forward_pre_hook(mark_batch, with_kwargs=True)
    return compiled


class CompileClock:
    """Dynamo's compiles in this process, from its compile start/end callbacks
    (``torch._dynamo.callback``): how many, their seconds, and how many of them found their
    graph in inductor's FX-graph cache (local, or loaded from the shared store) instead of
    building it. Process-wide (dynamo's callbacks are); readers take differences.

    Seconds are those dynamo spends compiling a frame (tracing, then inductor building or
    loading the graph); the first run of the compiled code (CUDA graph capture, autotuning
    at run time) is not in them."""

    _instance: "CompileClock | None" = None

    def __init__(self) -> None:
        self.compiles = 0
        self.from_cache = 0
        self.seconds = 0.0
        self._started: list[tuple[float, int, int]] = []

    @classmethod
    def get(cls) -> "CompileClock":
        """The process's clock, its callbacks registered on first use, and again after
        ``torch._dynamo.reset()`` (which drops every callback)."""
        from torch._dynamo.callback import callback_handler

        clock = cls._instance = cls._instance or cls()
        if clock._start not in callback_handler.start_callbacks:
            clock._started.clear()
            callback_handler.register_start_callback(clock._start)
            callback_handler.register_end_callback(clock._end)
        return clock

    @staticmethod
    def _cache_counts() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    def _start(self, _args) -> None:
        import time

        self._started.append((time.perf_counter(), *self._cache_counts()))

    def _end(self, _args) -> None:
        import time

        if not self._started:
            return
        began, hits, misses = self._started.pop()
        now_hits, now_misses = self._cache_counts()
        self.compiles += 1
        self.from_cache += int(now_hits > hits and now_misses == misses)
        self.seconds += time.perf_counter() - began

    def reading(self) -> tuple[int, int, float]:
        """``(compiles, of them from the cache, seconds)`` so far."""
        return self.compiles, self.from_cache, self.seconds

    @classmethod
    def totals(cls) -> tuple[int, int, float]:
        """The process's reading; zeros when nothing compiled (no clock was started)."""
        return cls._instance.reading() if cls._instance is not None else (0, 0, 0.0)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc)
