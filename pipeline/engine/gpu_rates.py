"""What the engine was measured to do on a GPU, and what follows from it: the images/s
``imagegen validate`` estimates with, and whether ``compile: auto`` compiles.

Every figure here is from one NVIDIA H200 SXM, 2026-12-04, torch 2.11.0+cu130, diffusers
0.42.1, random-weight SD 1.5 and SDXL (real architectures), 25 steps with CFG; the tables,
the scripts that made them and their conditions are in BENCHMARKS.md ("GPU engine: the H200
figures"). Another GPU has other rates; ``plan.throughput`` in a spec replaces them.
Pure data and arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# The pixel budget of one diffusers call on CUDA when the spec sets none: 16 images at
# 512x512 (SD 1.5: 5.77 img/s against 6.00 at 32, 5.43 at 8), 4 at 1024x1024 (SDXL: 0.94
# img/s against 0.51 at 1).
GPU_MAX_BATCH_PIXELS = 16 * 512 * 512


@dataclass(frozen=True)
class MeasuredRate:
    """One engine actor on one H200, one bucket shape: images/s eager (the defaults) and
    compiled, and the seconds the first compile of that shape took on an empty cache.
    ``compiled_measured`` says whether the compiled rate was measured or assumed (the SD
    1.5 gain applied)."""

    family: str
    width: int
    height: int
    steps: int
    eager_images_per_s: float
    compiled_images_per_s: float
    compile_seconds: float
    compiled_measured: bool


# SD 1.5: eager = engine defaults (fp16) at batch 16; compiled = bf16 + torch.compile at
# batch 16 (7.88; its options also held channels_last and fuse_qkv, which the new
# defaults drop); 41.5 s compiling (the whole call's first compile, empty cache).
# SDXL: eager = bf16 `fast` at batch 4 (0.944; channels_last was on, measured slower,
# so the defaults are at least this fast). Compiled not measured: SD 1.5's gain (x1.366)
# applied, and the longest compile measured (64.5 s, the SD 1.5 UNet alone at batch 32).
H200_RATES: tuple[MeasuredRate, ...] = (
    MeasuredRate("sd", 512, 512, 25, 5.766, 7.876, 41.5, True),
    MeasuredRate("sdxl", 1024, 1024, 25, 0.944, 0.944 * 7.876 / 5.766, 64.5, False),
)

# Seconds a compile takes when the shared store already holds the shape's artifacts
# (tracing, then loading instead of building). Not measured on a GPU yet:
# benchmarks/gpu_check.py measures it (compile_warm_s); until then an assumption.
WARM_COMPILE_SECONDS = 5.0


def measured_rate(family: str, width: int, height: int, steps: int) -> Optional[tuple[MeasuredRate, float]]:
    """The family's nearest measured shape and the factor its per-image time is scaled by
    to reach this one (pixels x steps: a denoising step's cost grows about linearly in
    pixels); None for a family never measured on a GPU (SD3, FLUX)."""
    candidates = [r for r in H200_RATES if r.family == family]
    if not candidates:
        return None
    work = width * height * steps
    nearest = min(candidates, key=lambda r: abs(math.log(r.width * r.height * r.steps / work)))
    return nearest, work / (nearest.width * nearest.height * nearest.steps)


@dataclass(frozen=True)
class CompileChoice:
    """``compile: auto``'s answer for one model, and why (logged on the driver)."""

    compile: bool
    reason: str
    # Images of the shape each actor must make for compiling to pay back (None: unknown).
    break_even_images: Optional[float] = None


def compile_choice(family: str, width: int, height: int, steps: int, images_per_actor: Optional[float], warm: bool) -> CompileChoice:
    """Compile when each actor makes enough images of the shape to repay compiling it:
    ``images x (eager s/image - compiled s/image) > compile seconds``, with the compile
    seconds of an empty cache, or :data:`WARM_COMPILE_SECONDS` when ``warm`` (the shared
    store holds this model's artifacts). Off for a family without GPU figures and when the
    job's size is unknown (``images_per_actor`` None)."""
    found = measured_rate(family, width, height, steps)
    if found is None:
        return CompileChoice(False, f"no GPU figures for family {family}: set model.engine.compile: true to compile")
    rate, scale = found
    saved = scale * (1 / rate.eager_images_per_s - 1 / rate.compiled_images_per_s)  # seconds an image
    cost = WARM_COMPILE_SECONDS if warm else rate.compile_seconds
    break_even = cost / saved
    cache = "a warm shared compile cache" if warm else "an empty compile cache"
    if images_per_actor is None:
        return CompileChoice(False, f"the job's size is unknown; compiling pays after {break_even:.0f} images of {width}x{height} per actor", break_even)
    pays = images_per_actor > break_even
    return CompileChoice(
        pays,
        f"{images_per_actor:.0f} images of {width}x{height}, {steps} steps per actor "
        f"{'repay' if pays else 'do not repay'} compiling with {cache} ({cost:.0f} s; pays after {break_even:.0f})",
        break_even,
    )
