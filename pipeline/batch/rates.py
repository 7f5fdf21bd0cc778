"""What a plan's buckets are estimated at: images per second per engine actor, from the
spec's and the built-in throughput table (:func:`rate_for`) or, for a real model on a GPU,
the measured H200 figures with compile time (:func:`gpu_rate`). Pure: no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pipeline.engine.gpu_rates import WARM_COMPILE_SECONDS, compile_choice, measured_rate
from pipeline.spec.catalog import ModelEntry
from pipeline.spec.config import PlanConfig, ThroughputEntry

# Images per second of ONE engine actor, per bucket. The only measured figures so far are
# in BENCHMARKS.md, on a 2-core x86_64 VM without GPU, torch 2.13.0 CPU, the tiny model:
# - "Pipeline overhead": the Ray job at 128x128, 4 steps, 2 actors: 1.44 images/s in steady
#   state, so 0.72 per actor;
# - "Online front": the engine called directly at 64x64, 4 steps, batch 8, one thread:
#   5.18 images/s.
# For a real model without an entry here or in the spec, the H200 figures of
# pipeline.engine.gpu_rates apply (SD 1.5, SDXL; see gpu_rate).
DEFAULT_THROUGHPUT: tuple[ThroughputEntry, ...] = (
    ThroughputEntry(model="tiny", width=128, height=128, steps=4, images_per_s=0.72),
    ThroughputEntry(model="tiny", width=64, height=64, steps=4, images_per_s=5.18),
)


@dataclass(frozen=True)
class Rate:
    """A bucket's images per second per actor, and where the figure comes from."""

    images_per_s: float
    basis: str  # "measured", or "scaled from WxH, N steps"


@dataclass
class Bucket:
    """Images of one (model, size, steps): a diffusers call's shape, and a throughput entry's key."""

    model: str
    width: int
    height: int
    steps: int
    rows: int = 0
    images: int = 0
    rate: Optional[Rate] = None
    compile_seconds: float = 0.0  # per engine actor: compiling this shape before its first call

    @property
    def gpu_hours(self) -> Optional[float]:
        """Hours generating, compile time not included (see :attr:`pipeline.batch.plan.Plan.gpu_hours`)."""
        return self.images / self.rate.images_per_s / 3600 if self.rate else None


def throughput_table(config: PlanConfig) -> list[ThroughputEntry]:
    """The built-in entries with the spec's added; a spec entry replaces a built-in one of
    the same model, size and steps."""
    key = lambda e: (e.model, e.width, e.height, e.steps)  # noqa: E731
    table = {key(e): e for e in DEFAULT_THROUGHPUT}
    table.update({key(e): e for e in config.throughput})
    return list(table.values())


def rate_for(table: list[ThroughputEntry], model: str, width: int, height: int, steps: int) -> Optional[Rate]:
    """The bucket's rate: an exact entry for the model (else for any model), or the nearest
    such entry scaled by pixels x steps (denoising cost grows about linearly in both; the
    estimate is rough away from the measured point). None when no entry applies."""
    candidates = [e for e in table if e.model == model] or [e for e in table if e.model is None]
    if not candidates:
        return None
    work = width * height * steps
    nearest = min(candidates, key=lambda e: abs(math.log(e.width * e.height * e.steps / work)))
    if (nearest.width, nearest.height, nearest.steps) == (width, height, steps):
        return Rate(nearest.images_per_s, "measured")
    scaled = nearest.images_per_s * nearest.width * nearest.height * nearest.steps / work
    return Rate(scaled, f"scaled from {nearest.width}x{nearest.height}, {nearest.steps} steps")


def gpu_rate(entry: ModelEntry, bucket: Bucket, num_actors: int) -> tuple[Optional[Rate], float]:
    """A bucket's rate from the H200 figures (:mod:`pipeline.engine.gpu_rates`), compiled or
    eager as ``compile`` (``auto`` decided as the job would, from the bucket's images per
    actor and whether the shared compile store is warm), and the seconds each actor spends
    compiling it. ``(None, 0)`` for a model set to run on CPU or a family never measured."""
    from pipeline.engine import compile_cache

    config = entry.config
    found = measured_rate(entry.family.name, bucket.width, bucket.height, bucket.steps)
    if config.device == "cpu" or found is None:
        return None, 0.0
    measured, scale = found
    config = config.model_copy(update={"device": "cuda", "dtype": config.dtype if config.dtype != "auto" else "float16"})
    warm = compile_cache.is_warm(config)
    compiled = config.engine.compile
    if compiled == "auto":
        compiled = compile_choice(entry.family.name, bucket.width, bucket.height, bucket.steps, bucket.images / num_actors, warm).compile
    images_per_s = (measured.compiled_images_per_s if compiled else measured.eager_images_per_s) / scale
    where = "measured" if scale == 1 else f"scaled from {measured.width}x{measured.height}, {measured.steps} steps"
    how = ("compiled" + ("" if measured.compiled_measured else ", gain assumed")) if compiled else "eager"
    seconds = (WARM_COMPILE_SECONDS if warm else measured.compile_seconds) if compiled else 0.0
    return Rate(images_per_s, f"H200 {where}, {how}"), seconds
