"""Image array -> encoded bytes, digest and perceptual hash. Runs on the encoder's
threads, off the GPU's path."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

# PIL's names for the formats a spec may ask for.
_PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode an ``HxWx3`` uint8 array. ``quality`` applies to webp and jpeg; PNG is
    lossless (compress level 6, zlib's default: the usual size/speed balance)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    options = {"compress_level": 6} if fmt == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buffer, format=_PIL_FORMAT[fmt], **options)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def phash64(pixels: np.ndarray) -> int:
    """The image's 64-bit perceptual hash as an unsigned integer: ``imagehash.phash``
    (grayscale, 32x32, DCT, the 8x8 lowest frequencies against their median), its bits in
    imagehash's order, so ``int(str(imagehash.phash(image)), 16)`` of the same pixels is
    the same number. Near-duplicates differ in few bits (Hamming distance); unrelated
    images in about 32. Computed from the generated pixels, before any lossy encoding:
    a JPEG or WebP file may hash a bit or two away."""
    import imagehash

    return int(str(imagehash.phash(Image.fromarray(pixels))), 16)
