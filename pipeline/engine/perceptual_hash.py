"""The 64-bit perceptual hash of an image (``phash``, the near-duplicate search's key).
Computed on the encoder's threads with the encoding, from the generated pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image


def phash64(pixels: np.ndarray) -> int:
    """The image's 64-bit perceptual hash as an unsigned integer: ``imagehash.phash``
    (grayscale, 32x32, DCT, the 8x8 lowest frequencies against their median), its bits in
    imagehash's order, so ``int(str(imagehash.phash(image)), 16)`` of the same pixels is
    the same number. Near-duplicates differ in few bits (Hamming distance); unrelated
    images in about 32. Computed from the generated pixels, before any lossy encoding:
    a JPEG or WebP file may hash a bit or two away."""
    import imagehash

    return int(str(imagehash.phash(Image.fromarray(pixels))), 16)
