"""One step of the GPU check (benchmarks/gpu_check.sh runs them all, each in its own process
under its own time limit): the engine's defaults against plain diffusers, each option's
pixel difference, a cold compile over ragged batches, and a compile that loads what the
cold one shared.

Every row is appended to ``OUT/check.jsonl`` as soon as it is measured (one JSON object a
line, flushed), so a step stopped at its limit keeps what it measured.

    python benchmarks/gpu_check.py STEP --out DIR --cache DIR [--cpu-smoke]

STEP: ``engine`` (plain diffusers, one prompt a call, against the engine's CUDA defaults at
their default batch), ``pixels`` (each option against the engine's plain path, same dtype:
the largest difference of a pixel channel, /255), ``compile-cold`` (empty caches: compiles
over ragged batches, their seconds, the compiled rate and pixel difference; shares the
artifacts), ``compile-warm`` (an empty local cache, the shared artifacts of compile-cold:
compiles found in the cache and their seconds), ``compile-vae`` (compile-cold with the VAE
decoder compiled too).

GPU: SD 1.5 (benchmarks/architectures.py, random weights) at 512x512, 25 steps, batch 16.
``--cpu-smoke``: the tiny model at 32x32, 2 steps, batch 4, on CPU: the same code paths, so
the script is run before a GPU is at hand; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Rows:
    """``OUT/check.jsonl``, a row appended and flushed as soon as it is measured."""

    def __init__(self, out: str, step: str):
        Path(out).mkdir(parents=True, exist_ok=True)
        self.path, self.step = Path(out) / "check.jsonl", step

    def add(self, **row) -> None:
        row = {"step": self.step, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def setting(args) -> SimpleNamespace:
    """The model and sizes of this machine's check."""
    import torch

    cache = os.path.join(args.cache, "model-cache")
    if args.cpu_smoke:
        from pipeline.engine.tiny_models import ensure_tiny

        ensure_tiny(cache)
        return SimpleNamespace(ref="tiny", cache=cache, device="cpu", dtype="float32", resolution=32, steps=2, batch=4, ragged=[4, 3, 1], iterations=2)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --cpu-smoke")
    from architectures import ensure_model

    folder = ensure_model("sd15", "full", os.path.join(args.cache, "bench-cache"), "cuda")
    return SimpleNamespace(ref=folder, cache=cache, device="cuda", dtype="float16", resolution=512, steps=25, batch=16, ragged=[16, 11, 8, 1], iterations=2)


def requests(s, n: int, offset: int = 0):
    from pipeline.engine.requests import GenerationRequest

    return [GenerationRequest(f"a detailed photograph, scene {offset + i}", "", offset + i, s.resolution, s.resolution, s.steps, 7.5) for i in range(n)]


def engine(s, cache_dir: str | None = None, dtype: str | None = None, **options):
    """The engine as a job on this device runs it by default (CUDA: the default pixel
    budget), with ``options`` on top."""
    from pipeline.engine.engine import Engine
    from pipeline.engine.gpu_rates import GPU_MAX_BATCH_PIXELS
    from pipeline.spec.model_config import EngineOptions, ModelConfig

    defaults = {"max_batch_pixels": GPU_MAX_BATCH_PIXELS} if s.device == "cuda" else {}
    config = ModelConfig(ref=s.ref, cache_dir=cache_dir or s.cache, device=s.device, dtype=dtype or s.dtype, engine=EngineOptions(**{**defaults, "compile": False, **options}))
    return Engine(config)


def timed_rate(e, s) -> float:
    """Images/s of calls of ``s.batch`` (median of ``s.iterations``), after the call made."""
    seconds = []
    for i in range(s.iterations):
        began = time.perf_counter()
        e.generate(requests(s, s.batch, 1000 * (i + 1)))
        seconds.append(time.perf_counter() - began)
    return s.batch / statistics.median(seconds)


def max_diff(results, reference) -> int:
    import numpy as np

    return int(max(np.abs(r.pixels.astype(int) - p.astype(int)).max() for r, p in zip(results, reference, strict=True)))


def plain_reference(s, n: int, dtype: str | None = None):
    """The plain path's images (every option off) of the first ``n`` requests."""
    e = engine(s, dtype=dtype, encode_prompts_once=False, max_batch_pixels=None)
    pixels = [r.pixels for r in e.generate(requests(s, n))]
    del e
    return pixels


def step_engine(s, rows: Rows) -> None:
    from gpu_engine import Memory, run_baseline

    if s.device == "cuda":
        base = run_baseline("sd15", s.ref, s.device, "float16", s.resolution, s.steps, s.iterations, Memory(s.device))
        rows.add(variant="plain diffusers, one prompt a call", dtype="float16", batch=1, images_per_s=base.images_per_s, first_call_s=base.first_call_s)
    e = engine(s)
    e.generate(requests(s, s.batch))  # warm-up
    rows.add(variant="engine defaults (compile off: a short job)", dtype=str(e.dtype), batch=s.batch, images_per_s=timed_rate(e, s))


# Each option alone against the plain path in the same dtype: what README's tolerance is.
PIXEL_OPTIONS = [
    {"encode_prompts_once": True},
    {"attention": "flash"},
    {"attention": "efficient"},
    {"attention": "cudnn"},
    {"channels_last": True},
    {"fuse_qkv": True},
    {"vae_chunk_size": 2},
]


def step_pixels(s, rows: Rows) -> None:
    from pipeline.errors import ImagegenError

    n = 4
    for dtype in (s.dtype, "bfloat16"):  # bfloat16 on CPU too: how far half precision moves an option, roughly
        reference = plain_reference(s, n, dtype)
        for options in PIXEL_OPTIONS:
            try:
                e = engine(s, dtype=dtype, **{"encode_prompts_once": False, "max_batch_pixels": None, **options})
            except ImagegenError as exc:
                rows.add(options=options, dtype=dtype, status=f"not available: {str(exc)[:120]}")
                continue
            rows.add(options=options, dtype=dtype, images=n, max_diff_255=max_diff(e.generate(requests(s, n)), reference))
            del e


def step_compile(s, rows: Rows, node: str, **extra) -> None:
    """Compile over ragged batches with ``node``'s own local cache and the check's shared
    store; rows: compiles after each call, the compiled rate, the pixel difference."""
    import torch

    shared = os.path.join(s.cache, "..", "compile-shared")
    reference = plain_reference(s, 4)
    e = engine(s, cache_dir=os.path.join(s.cache, "..", node), compile=True, compile_cache_url=os.path.abspath(shared), **extra)
    made = 0
    for size in s.ragged:
        began = time.perf_counter()
        results = e.generate(requests(s, size, made))
        if made == 0:
            rows.add(node=node, options=extra, what="pixels", max_diff_255=max_diff(results[:4], reference))
        made += size
        rows.add(
            node=node, options=extra, what="call", images=size, call_s=round(time.perf_counter() - began, 3),
            compiles=e.compiles, compiles_from_cache=e.compiles_from_cache, compile_s=round(e.compile_seconds, 2),
        )
    rows.add(node=node, options=extra, what="rate", batch=s.batch, images_per_s=timed_rate(e, s), compiles=e.compiles, dtype=str(e.dtype))
    if s.device == "cuda":
        rows.add(node=node, what="memory", peak_gb=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["engine", "pixels", "compile-cold", "compile-warm", "compile-vae"])
    parser.add_argument("--out", required=True, help="where check.jsonl is appended to")
    parser.add_argument("--cache", required=True, help="models and compile caches, shared by the steps of one check; empty at its start")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny model on CPU: runs the code, measures nothing about GPUs")
    args = parser.parse_args()
    import diffusers
    import torch
    import transformers

    for library in (diffusers, transformers):
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()
    rows = Rows(args.out, args.step)
    s = setting(args)
    rows.add(what="machine", device=torch.cuda.get_device_name() if s.device == "cuda" else "cpu", torch=torch.__version__, diffusers=diffusers.__version__,
             model=s.ref if s.ref == "tiny" else "sd15 (random weights)", resolution=s.resolution, steps=s.steps)  # fmt: skip
    if args.step == "engine":
        step_engine(s, rows)
    elif args.step == "pixels":
        step_pixels(s, rows)
    elif args.step == "compile-cold":
        step_compile(s, rows, "node-a")
    elif args.step == "compile-warm":
        step_compile(s, rows, "node-b")
    else:
        step_compile(s, rows, "node-c", compile_vae=True)


if __name__ == "__main__":
    main()
