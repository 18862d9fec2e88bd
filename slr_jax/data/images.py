"""Decoding an image file as an image viewer shows it, as (H, W, 3) uint8 RGB.

PIL's plain ``convert('RGB')`` is not enough: it ignores the EXIF orientation (a portrait
photo taken with the camera turned comes out sideways, so its label map would not line up
with the photo as viewers show it) and clips 16-bit grey images to white. Here the EXIF
orientation is applied, 16-bit and 32-bit grey images are scaled to 8 bits, and palette, grey,
alpha and CMYK images are converted to RGB.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

# EXIF tag of the orientation (1 = as stored; 2-8 = mirrored and/or rotated).
EXIF_ORIENTATION = 0x0112
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of ``image`` (1 when it has none)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (ValueError, TypeError, SyntaxError):  # a malformed EXIF block: as stored
        return 1


def _wide_grey_to_uint8(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 of a 16/32-bit grey image: 16-bit values scaled by 255/65535 (32-bit and
    float ones by their own range when it exceeds 8 bits)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        peak = float(values.max(initial=0.0))
        scale = 65535.0 if 255.0 < peak <= 65535.0 else max(peak, 255.0)
    return np.clip(np.round(values * (255.0 / scale)), 0, 255).astype(np.uint8)


def to_rgb_array(image: Image.Image, *, apply_exif: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image, oriented as its EXIF tag says (``apply_exif``)."""
    if apply_exif and exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY_MODES:
        grey = _wide_grey_to_uint8(image)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_rgb(source: str | BinaryIO | Any, *, apply_exif: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file or open binary file, as a viewer shows it.

    Raises what PIL raises for a missing or undecodable file (callers name the file)."""
    with Image.open(source) as image:
        return to_rgb_array(image, apply_exif=apply_exif)
