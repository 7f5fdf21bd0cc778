"""How many images one diffusers call takes: the pixel budget, and the cap a size keeps
after it ran out of memory.

Block sizes (rows per engine actor call) and bucket keys are :mod:`pipeline.spec.bucketing`;
this is the finer rule inside an engine: a block's rows of one size are cut into calls of at
most :meth:`CallSizes.size` images. Pure: no torch.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


class CallSizes:
    """Images per diffusers call, per image size, for one engine.

    Memory for activations grows with images x pixels, so one pixel budget
    (``engine.max_batch_pixels``) gives each size its own batch: 16 images at 512x512 are 4
    at 1024x1024. A call that ran out of memory caps its size at half of what failed for the
    rest of the engine's life (:meth:`ran_out_of_memory`), so the next call does not fail
    again. Unbounded (the whole group) when neither applies.
    """

    def __init__(self, max_batch_pixels: Optional[int]):
        self.max_batch_pixels = max_batch_pixels
        # (width, height) -> the most images per call that did not run out of memory.
        self._caps: dict[tuple[int, int], int] = {}

    def size(self, width: int, height: int) -> int:
        budget = self.max_batch_pixels
        size = max(1, budget // (width * height)) if budget else 1 << 30
        return min(size, self._caps.get((width, height), size))

    def ran_out_of_memory(self, width: int, height: int, images: int) -> None:
        """A call of ``images`` images of this size ran out of memory: half of it from now on."""
        key = (width, height)
        self._caps[key] = min(self._caps.get(key, images), images // 2)
        log.warning("out of memory at %d images of %dx%d; calls of that size now take at most %d", images, width, height, self._caps[key])
