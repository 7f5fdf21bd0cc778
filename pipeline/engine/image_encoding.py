"""Image array -> encoded bytes (PNG/WebP/JPEG) and their digest. Runs on the encoder's
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
