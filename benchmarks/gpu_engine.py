"""GPU engine benchmark: plain diffusers against this project's engine, SD 1.5 and SDXL.

Builds each model from its public config with random weights (benchmarks/architectures.py;
timing does not depend on weight values), saves it once into a cache folder, and then
measures, in the same process and run:

- ``baseline``: what a user writes first: ``DiffusionPipeline.from_pretrained(dtype=float16)``,
  ``.to(device)``, one prompt per call, every default (the model's scheduler, SDPA,
  no compile), PIL images out;
- the engine (``pipeline.engine.engine.Engine``) in named variants of ``model.dtype`` and
  ``EngineOptions``, over a sweep of batch sizes until memory runs out.

Per row: images/s (median of the timed calls, after one warm-up call), the ratio to the
baseline, peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS),
the first call's wall time and the part of it the engine spent compiling (apart from the
throughput), the largest pixel difference against the engine's plain path in the same
dtype (the tolerance EngineOptions promises, checked on the first batch size), and MFU =
images/s x FLOPs per image / peak FLOP/s. FLOPs per image are counted with
``torch.utils.flop_counter`` (benchmarks/flops.py) over one full pipeline call of the same
model at the same settings, and cross-checked against a count on meta tensors.

On CPU every dtype becomes float32 (half precision there is emulated) and the numbers say
nothing about GPU speed: ``--size tiny`` there is a smoke run of the script.

    python benchmarks/gpu_engine.py --size tiny                     # CPU smoke run, minutes
    python benchmarks/gpu_engine.py --size tiny --models sd15 --options fast
    python benchmarks/gpu_engine.py --size full --flops-only        # FLOPs per image, any machine
    python benchmarks/gpu_engine.py --size full --models sd15 --json out/sd15.json
    python benchmarks/gpu_engine.py --size full --models sdxl --batch-sizes 1,4,8,16 \\
        --variant 'flash=bfloat16:attention=flash,channels_last=true'
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from architectures import default_resolution, ensure_model  # noqa: E402
from flops import component_flops, pipeline_flops  # noqa: E402

# Dense bf16/fp16 tensor-core rate of an H100/H200 SXM by NVIDIA's datasheet (the H200 has
# the H100's arithmetic; the 1979 TFLOP/s headline assumes 2:4 sparsity).
H100_H200_PEAK_FLOPS = 989e12

# Named engine variants: model.dtype and EngineOptions fields. "baseline" is plain diffusers.
# `fast` is what the H200 measured to pay (2026-12-04, BENCHMARKS.md): float16 and
# torch.compile, channels_last off (slower on both models and both parts). `cl-fused` and
# `cl-fused-compiled` are the bundles measured then as `fast` and `compiled` (bf16,
# channels_last, fused QKV, VAE chunks), kept to compare with those figures.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("float16", {"compile": False}),
    "bf16": ("bfloat16", {"compile": False}),
    "eager": ("bfloat16", {"attention": "eager", "compile": False}),
    "fast": ("float16", {"compile": True}),
    "cl-fused": ("bfloat16", {"channels_last": True, "fuse_qkv": True, "vae_chunk_size": "CHUNK", "compile": False}),
    "cl-fused-compiled": ("bfloat16", {"channels_last": True, "fuse_qkv": True, "vae_chunk_size": "CHUNK", "compile": True}),
}
DEFAULT_OPTIONS = {"full": "baseline,fp16,bf16,fast,cl-fused", "tiny": "baseline,fp16,eager,cl-fused"}

log = logging.getLogger("gpu_engine")


@dataclass
class Row:
    model: str
    variant: str
    dtype: str
    options: dict[str, Any]
    batch: int
    status: str = "ok"
    images_per_s: Optional[float] = None
    call_seconds: list[float] = field(default_factory=list)
    peak_memory_gb: Optional[float] = None
    first_call_s: Optional[float] = None
    compile_s: Optional[float] = None
    max_diff_255: Optional[int] = None
    nan_images: int = 0
    ratio: Optional[float] = None
    mfu: Optional[float] = None


def prompts(n: int) -> list[str]:
    """Distinct prompts, so that no variant gains from repeated text."""
    subjects = ["an astronaut", "a red fox", "a lighthouse", "a bowl of ramen", "a violin", "a glacier", "a tram", "an owl"]
    return [f"a detailed photograph of {subjects[i % len(subjects)]}, scene {i}" for i in range(n)]


def requests(n: int, resolution: int, steps: int):
    from pipeline.engine.requests import GenerationRequest

    return [GenerationRequest(p, "", i, resolution, resolution, steps, 7.5) for i, p in enumerate(prompts(n))]


class Memory:
    """Peak memory over a region: CUDA's allocator counter, or on Linux CPU the process's
    peak RSS (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_gb(self) -> Optional[float]:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()) if Path("/proc/self/status").exists() else None
        return int(match.group(1)) / 2**20 if match else None


class Retries(logging.Handler):
    """Counts the engine's 'retrying in halves' warnings: a batch that ran in halves after
    running out of memory did not run at the size being measured."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in halves" in record.getMessage():
            self.count += 1


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_baseline(model: str, folder: str, device: str, dtype_name: str, resolution: int, steps: int, iterations: int, memory: Memory) -> Row:
    """Plain diffusers: one prompt per call, defaults, PIL images out."""
    import torch
    from diffusers import DiffusionPipeline

    row = Row(model, "baseline", dtype_name, {}, 1)
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=getattr(torch, dtype_name)).to(device)
    pipe.set_progress_bar_config(disable=True)  # no effect on speed; keeps the output readable
    texts = prompts(iterations + 1)

    def call(i: int) -> float:
        began = time.perf_counter()
        pipe(texts[i], height=resolution, width=resolution, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(i))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    row.first_call_s = call(0)
    memory.reset()
    row.call_seconds = [call(i + 1) for i in range(iterations)]
    row.peak_memory_gb = memory.peak_gb()
    row.images_per_s = 1 / statistics.median(row.call_seconds)
    pipe = None  # the closure holds it too: drop the weights before the next row loads its own
    free_memory()
    return row


def plain_images(folder: str, cache: str, device: str, dtype_name: str, batch: int, resolution: int, steps: int):
    """The engine's plain path (every option off) on the first ``batch`` requests: what each
    variant's images are compared with."""
    from pipeline.engine.engine import Engine
    from pipeline.spec.model_config import EngineOptions, ModelConfig

    engine = Engine(ModelConfig(ref=folder, cache_dir=cache, device=device, dtype=dtype_name, engine=EngineOptions(encode_prompts_once=False)))
    pixels = [r.pixels for r in engine.generate(requests(batch, resolution, steps))]
    del engine
    free_memory()
    return pixels


def run_variant(model: str, name: str, dtype_name: str, options: dict[str, Any], folder: str, cache: str, device: str, args, resolution: int, reference):
    """One engine, every batch size in turn (ascending) until one runs out of memory; yields
    each row as it is measured."""
    import numpy as np

    from pipeline.engine.engine import Engine
    from pipeline.errors import ImagegenError
    from pipeline.spec.model_config import EngineOptions, ModelConfig

    memory = Memory(device)
    expected = reference()  # made first: two resident engines would crowd the variant's memory
    try:
        engine = Engine(ModelConfig(ref=folder, cache_dir=cache, device=device, dtype=dtype_name, engine=EngineOptions(**options)))
    except ImagegenError as exc:  # a kernel this device lacks: say so in the table, measure the rest
        yield Row(model, name, dtype_name, options, args.batch_sizes[0], status=f"not available: {exc}")
        return
    retries = Retries()
    logging.getLogger("pipeline.engine.engine").addHandler(retries)
    try:
        for batch in args.batch_sizes:
            row = Row(model, name, dtype_name, options, batch)
            made = requests(batch, resolution, args.steps)
            compiled_before, retried_before = engine.compile_seconds, retries.count
            began = time.perf_counter()
            results = engine.generate(made)
            row.first_call_s = time.perf_counter() - began
            row.compile_s = engine.compile_seconds - compiled_before if options.get("compile") else None
            failed = [r for r in results if not r.ok and r.error_type != "ImageIsNaN"]
            if failed:
                row.status = f"failed: {failed[0].error_type}: {failed[0].error_message[:80]}"
            elif retries.count > retried_before:
                row.status = "ran in halves (out of memory)"
            if row.status != "ok":
                yield row
                return
            row.nan_images = sum(r.error_type == "ImageIsNaN" for r in results)
            if batch == args.batch_sizes[0]:
                diffs = [np.abs(r.pixels.astype(int) - p.astype(int)).max() for r, p in zip(results, expected) if r.ok and p is not None]
                row.max_diff_255 = int(max(diffs)) if diffs else None
            memory.reset()
            for _ in range(args.iterations):
                began = time.perf_counter()
                engine.generate(made)  # returns host arrays: the device work is done
                row.call_seconds.append(time.perf_counter() - began)
            row.peak_memory_gb = memory.peak_gb()
            row.images_per_s = batch / statistics.median(row.call_seconds)
            if retries.count > retried_before:
                row.status = "ran in halves (out of memory)"
                yield row
                return
            yield row
    finally:
        logging.getLogger("pipeline.engine.engine").removeHandler(retries)
        del engine
        free_memory()


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``NAME=DTYPE[:KEY=VALUE,...]``, values as YAML (``true``, ``8``, ``flash``)."""
    import yaml

    name, sep, rest = text.partition("=")
    dtype_name, _, pairs = rest.partition(":")
    if not sep or dtype_name not in ("float32", "float16", "bfloat16"):
        raise SystemExit(f"--variant {text!r}: expected NAME=DTYPE[:KEY=VALUE,...] with DTYPE float32, float16 or bfloat16")
    options = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        options[key.strip()] = yaml.safe_load(value)
    return name, (dtype_name, options)


def peak_flops(device: str, given: Optional[float]) -> tuple[Optional[float], str]:
    import torch

    if given:
        return given * 1e12, f"{given:g} TFLOP/s (given)"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if "H100" in name or "H200" in name:
            return H100_H200_PEAK_FLOPS, f"989 TFLOP/s, dense bf16/fp16 of {name} (datasheet)"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "none on CPU (MFU not computed)"


def count_flops(model: str, folder: str, device: str, resolution: int, args) -> dict[str, Any]:
    """FLOPs per image: one full pipeline call under FlopCounterMode where that is quick
    (GPU, or the tiny size), and the meta-tensor count by parts always."""
    import torch
    from diffusers import DiffusionPipeline

    counts: dict[str, Any] = {"components": component_flops(model, args.size, resolution, args.steps)}
    if device == "cuda" or args.size == "tiny":
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        counts["pipeline_call"] = pipeline_flops(pipe, resolution, args.steps)
        del pipe
        free_memory()
    counts["per_image"] = counts.get("pipeline_call", counts["components"]["total"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--steps", type=int, help="default 25 (full) or 4 (tiny)")
    parser.add_argument("--resolution", type=int, help="default 512 / 1024 (full), 128 (tiny)")
    parser.add_argument("--batch-sizes", help="ascending, comma-separated; default 1,4,8,16,32 (full) or 1,4 (tiny)")
    parser.add_argument(
        "--options",
        help=f"variants to run, from: baseline, {', '.join(VARIANTS)}, and any --variant; default {DEFAULT_OPTIONS['full']} "
        f"(full) or {DEFAULT_OPTIONS['tiny']} (tiny: compiling takes a minute or more per batch size on a CPU)",
    )
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DTYPE[:KEY=VALUE,...]", help="an extra engine variant, run after --options")
    parser.add_argument("--vae-chunk-size", type=int, help="vae_chunk_size of the cl-fused variants; default 8 (full), 2 (tiny)")
    parser.add_argument("--iterations", type=int, help="timed calls per row, the median is reported; default 3 (full) or 5 (tiny)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s for MFU; default 989 on H100/H200")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "imagegen-bench"))
    parser.add_argument("--json", help="write every number here as JSON (rewritten after each row)")
    parser.add_argument("--flops-only", action="store_true", help="print FLOPs per image counted on meta tensors and stop: seconds at full size, on any machine")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    for library in (diffusers, transformers):  # load-time bars would bury the results
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline.engine.engine").setLevel(logging.INFO)  # compile times
    tiny = args.size == "tiny"
    args.steps = args.steps or (4 if tiny else 25)
    args.iterations = args.iterations or (5 if tiny else 3)
    args.options = args.options or DEFAULT_OPTIONS[args.size]
    args.batch_sizes = sorted(int(b) for b in (args.batch_sizes or ("1,4" if tiny else "1,4,8,16,32")).split(","))
    chunk = args.vae_chunk_size or (2 if tiny else 8)
    variants = {name: (dtype_name, {k: (chunk if v == "CHUNK" else v) for k, v in options.items()}) for name, (dtype_name, options) in VARIANTS.items()}
    extra = dict(parse_variant(v) for v in args.variant)
    variants.update(extra)
    chosen = [n for n in args.options.split(",") if n] + [n for n in extra if n not in args.options.split(",")]
    unknown = [n for n in chosen if n != "baseline" and n not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: baseline, {', '.join(variants)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak, peak_note = peak_flops(device, args.peak_tflops)

    def resolved(dtype_name: str) -> str:
        return dtype_name if device == "cuda" else "float32"  # half precision on CPU is emulated

    rows: list[Row] = []
    flops: dict[str, Any] = {}
    started = time.perf_counter()
    machine = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peak_flops": peak,
        "peak_flops_note": peak_note,
    }
    settings = {"size": args.size, "steps": args.steps, "batch_sizes": args.batch_sizes, "iterations": args.iterations, "vae_chunk_size": chunk}

    def record(row: Row, baseline: Optional[Row], per_image: float) -> None:
        """Add a row and rewrite the JSON: a run stopped at a time limit keeps what it measured."""
        if row.images_per_s and baseline is not None and baseline.images_per_s:
            row.ratio = row.images_per_s / baseline.images_per_s
        if row.images_per_s and peak:
            row.mfu = row.images_per_s * per_image / peak
        rows.append(row)
        print(f"{row.model} {row.variant} batch {row.batch}: {row.images_per_s or 0:.3f} img/s, {row.status}", flush=True)
        machine.update(date=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", wall_s=round(time.perf_counter() - started, 1))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"machine": machine, "settings": settings, "flops": flops, "rows": [asdict(r) for r in rows]}, indent=1))

    if args.flops_only:
        for model in args.models.split(","):
            resolution = args.resolution or default_resolution(model, args.size)
            parts = component_flops(model, args.size, resolution, args.steps)
            print(f"{model} at {resolution}x{resolution}, {args.steps} steps, CFG: {tera(parts['total'])} TFLOP per image = "
                  f"text {tera(parts['text'])} + denoiser {parts['denoiser_evaluations']} x {tera(parts['denoiser_per_evaluation'])} "
                  f"(CFG pair) + VAE decode {tera(parts['vae'])}")
        return
    for model in args.models.split(","):
        resolution = args.resolution or default_resolution(model, args.size)
        folder = ensure_model(model, args.size, args.cache, device)
        flops[model] = count_flops(model, folder, device, resolution, args)
        per_image = flops[model]["per_image"]
        print(f"{model}: {tera(per_image)} TFLOP per image at {resolution}x{resolution}, {args.steps} steps, CFG "
              f"(meta-tensor count by parts: {tera(flops[model]['components']['total'])}, "
              f"{flops[model]['components']['denoiser_evaluations']} denoiser evaluations)", flush=True)
        baseline = None
        if "baseline" in chosen:
            baseline = run_baseline(model, folder, device, resolved("float16"), resolution, args.steps, args.iterations, Memory(device))
            record(baseline, None, per_image)
        references: dict[str, Any] = {}
        done: set = set()
        for name in chosen:
            if name == "baseline":
                continue
            dtype_name, options = variants[name]
            dtype_name = resolved(dtype_name)
            key = (dtype_name, json.dumps(options, sort_keys=True))
            if key in done:  # on CPU fp16 and bf16 are the same float32 run
                print(f"{model} {name}: same as a variant already run on this device, skipped", flush=True)
                continue
            done.add(key)

            def reference(dtype_name=dtype_name):
                if dtype_name not in references:
                    references[dtype_name] = plain_images(folder, args.cache, device, dtype_name, args.batch_sizes[0], resolution, args.steps)
                return references[dtype_name]

            for row in run_variant(model, name, dtype_name, options, folder, args.cache, device, args, resolution, reference):
                record(row, baseline, per_image)

    print(f"\n{machine['date']}; {machine['device']}; torch {machine['torch']}, diffusers {machine['diffusers']}; "
          f"size {args.size}, {args.steps} steps, CFG; peak {peak_note}; {machine['wall_s']} s in all\n")
    print_table(rows)


def tera(flops: float) -> str:
    return f"{flops / 1e12:.2f}" if flops >= 1e11 else f"{flops / 1e12:.5f}"


def print_table(rows: list[Row]) -> None:
    header = ["model", "variant", "dtype", "batch", "img/s", "x baseline", "peak GB", "first call s", "compile s", "max diff /255", "MFU", "status"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")

    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in rows:
        status = r.status if not r.nan_images else f"{r.status}, {r.nan_images} NaN images"
        print("| " + " | ".join([
            r.model, r.variant, r.dtype, str(r.batch), f(r.images_per_s, ".3f"), f(r.ratio, ".2f"), f(r.peak_memory_gb, ".2f"),
            f(r.first_call_s, ".1f"), f(r.compile_s, ".1f"), f(r.max_diff_255, "d"), f(r.mfu, ".1%"), status,
        ]) + " |")


if __name__ == "__main__":
    main()
