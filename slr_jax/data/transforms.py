"""The reference's training augmentation and normalisation, on NumPy arrays via PIL.

The reference transforms PIL images with torchvision: a random resized crop (bicubic image,
nearest mask), a horizontal flip, a colour jitter applied every time and ImageNet
normalisation. The same PIL operations are used here (PIL's bicubic resize antialiases when
shrinking, TensorFlow's does not), with every random draw taken from a NumPy ``Generator`` so a
pipeline can seed each example on its own. All arrays are HWC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from slr_jax import constants

IMAGENET_MEAN = np.asarray(constants.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(constants.IMAGENET_STD, np.float32)


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) drawn like torchvision's RandomResizedCrop.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in ``ratio``; after
    ``attempts`` boxes that do not fit, a centre crop with the ratio clamped into range.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resized_crop(
    image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], resample: int
) -> Image.Image:
    """Crops ``box`` = (top, left, h, w) from a PIL image and resizes it to ``size`` = (H, W)."""
    top, left, crop_h, crop_w = box
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    return cropped.resize((size[1], size[0]), resample)


def _adjust_hue(image: Image.Image, hue_shift: float) -> Image.Image:
    """Rotates hue by ``hue_shift`` turns (|shift| <= 0.5) in PIL's 8-bit HSV space."""
    hue, saturation, value = image.convert("HSV").split()
    # int() truncates toward zero like the uint8 cast torchvision applies to the shift.
    shifted = (np.asarray(hue, np.int32) + int(hue_shift * 255)) % 256
    hue = Image.fromarray(shifted.astype(np.uint8))
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def apply_colour_jitter(
    image: Image.Image,
    order: Sequence[int],
    factors: Sequence[float | None],
    hue_shift: float | None,
) -> Image.Image:
    """Applies fixed jitter draws to a PIL RGB image.

    ``order`` is a permutation of 0..3 (brightness, contrast, saturation, hue); ``factors`` the
    three enhancement factors and ``hue_shift`` the hue rotation in turns (None skips one).
    """
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in order:
        if op < 3 and factors[op] is not None:
            image = enhancers[op](image).enhance(float(factors[op]))
        elif op == 3 and hue_shift is not None:
            image = _adjust_hue(image, float(hue_shift))
    return image


def colour_jitter(
    image: Image.Image,
    rng: np.random.Generator,
    strengths: Sequence[float],
) -> Image.Image:
    """torchvision ColorJitter on a PIL RGB image: the four adjustments in a random order.

    Brightness/contrast/saturation factors uniform in [max(0, 1 - s), 1 + s], hue shift
    uniform in [-h, h]; a strength of 0 skips that adjustment.
    """
    brightness, contrast, saturation, hue = (float(s) for s in strengths)
    if min(brightness, contrast, saturation) < 0 or not 0.0 <= hue <= 0.5:
        raise ValueError(
            f"Colour jitter strengths must be >= 0 with hue <= 0.5, got {tuple(strengths)}."
        )
    order = rng.permutation(4)
    factors = [
        rng.uniform(max(0.0, 1.0 - s), 1.0 + s) if s > 0 else None
        for s in (brightness, contrast, saturation)
    ]
    hue_shift = rng.uniform(-hue, hue) if hue > 0 else None
    return apply_colour_jitter(image, order, factors, hue_shift)


def normalise(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (ImageNet-normalised float32, raw float32 in [0, 1]), both (H, W, 3)."""
    raw = image.astype(np.float32) / 255.0
    return (raw - IMAGENET_MEAN) / IMAGENET_STD, raw


def train_transform(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int | Sequence[int],
    scale: Sequence[float],
    ratio: Sequence[float],
    flip_prob: float,
    jitter: Sequence[float] | None,
) -> dict[str, np.ndarray]:
    """The reference training transform of one example.

    Args: ``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8. Returns {'image': (h, w, 3)
    float32 normalised, 'raw_image': (h, w, 3) float32 in [0, 1], 'mask': (h, w) int32} with
    (h, w) = ``crop_size``. ``scale``, ``ratio``, ``flip_prob``, ``jitter`` (brightness,
    contrast, saturation, hue; None turns the colour jitter off): ``config.dataset``'s
    ``scale_range``, ``ratio_range``, ``flip_prob``, ``color_jitter``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}.")
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    box = sample_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
    pil_image = resized_crop(Image.fromarray(image), box, size, Image.Resampling.BICUBIC)
    pil_mask = resized_crop(Image.fromarray(mask), box, size, Image.Resampling.NEAREST)
    if rng.uniform() < flip_prob:
        pil_image = pil_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pil_mask = pil_mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if jitter is not None:
        pil_image = colour_jitter(pil_image, rng, jitter)
    normalised, raw = normalise(np.asarray(pil_image, np.uint8))
    return {
        "image": normalised,
        "raw_image": raw,
        "mask": np.asarray(pil_mask, np.int32),
    }


def eval_transform(image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """No augmentation: {'image', 'raw_image'} (H, W, 3) float32 and 'mask' (H, W) int32."""
    normalised, raw = normalise(image)
    return {"image": normalised, "raw_image": raw, "mask": mask.astype(np.int32)}
