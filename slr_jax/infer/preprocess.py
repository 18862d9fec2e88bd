"""From a photograph or a dataset example to the network's normalised inputs (NHWC).

Follows the reference's pre-processing (``tools/infer_voc.py``): every scale ``s`` resizes the
uint8 photograph with PIL bicubic to ``(round(H*s), round(W*s))`` (NumPy rounding; scale-1
sizes are not resampled), then ImageNet-normalises it in float64. Padding (exact, to the
square ``test.bucket_sizes``, or approximate, ``test.bucket_step``) extends a view at the bottom
and right so that views of similar sizes share one compiled program (``predict``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from slr_jax.constants import BUCKET_PAD_MODES, IMAGENET_MEAN, IMAGENET_STD, RESIZE_METHODS
from slr_jax.data.images import to_rgb_array
from slr_jax.errors import InferenceError
from slr_jax.ops import resize_bilinear_align_corners

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# The largest photograph inference takes (pixels): 2048 x 2048. Bigger ones are refused with a
# message; the multi-scale views (up to 2x per side) of such an image are already 16.8 MP.
MAX_IMAGE_PIXELS = 2048 * 2048


def normalise_image(image_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float32 normalised; float64 maths as the reference."""
    scaled = np.asarray(image_uint8, np.float64) / 255.0
    return ((scaled - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def denormalise_to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) normalised float -> uint8 RGB: ``round(255 * (x * std + mean))``, clipped."""
    raw = np.asarray(image, np.float32) * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
    return np.clip(np.round(255.0 * raw), 0, 255).astype(np.uint8)


def reference_scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(round(H * s), round(W * s)) with NumPy rounding, as the reference's ``pil_rescale``."""
    height, width = (int(np.round(size[0] * scale)), int(np.round(size[1] * scale)))
    if height < 1 or width < 1:
        raise InferenceError(
            f"scale {scale} shrinks a {size[0]}x{size[1]} image to {height}x{width}; use larger "
            "scales for images this small."
        )
    return height, width


def _pil_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of (H, W, 3) uint8 (as one RGB image) or float (channel by channel)."""
    target = (size[1], size[0])
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BICUBIC))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
                target, Image.Resampling.BICUBIC
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def scaled_input(image: np.ndarray, scale: float, resize: str) -> np.ndarray:
    """The normalised (h, w, 3) float32 network input of one scale.

    ``image``: (H, W, 3) uint8 RGB (the reference path: PIL bicubic on the photograph, then
    normalise) or float32 already normalised (PIL bicubic channel by channel in float, i.e.
    without the 8-bit rounding). ``resize='align_corners'`` uses the model's bilinear resize
    on the normalised image instead (no PIL; not the reference).
    """
    if resize not in RESIZE_METHODS:
        raise InferenceError(f"unknown resize method {resize!r}; expected one of {RESIZE_METHODS}.")
    size = reference_scaled_size(image.shape[:2], scale)
    if image.dtype == np.uint8 and resize == "pil_bicubic":
        return normalise_image(_pil_bicubic(image, size))
    normalised = normalise_image(image) if image.dtype == np.uint8 else image
    if size == normalised.shape[:2]:
        return normalised
    if resize == "pil_bicubic":
        return _pil_bicubic(normalised, size)
    resized = resize_bilinear_align_corners(jnp.asarray(normalised)[None], size)[0]
    return np.asarray(resized, np.float32)


def check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InferenceError(
            f"image must be one (H, W, 3) RGB array, got shape {image.shape}; pass one image at "
            "a time (drop the batch axis, convert grey or RGBA images to RGB)."
        )
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise InferenceError(
            f"image must be uint8 RGB or float ImageNet-normalised, got dtype {image.dtype}."
        )
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
    return image


def bucket_size(size: int, step: int) -> int:
    """The padded length of an axis of ``size`` pixels: the smallest ``k * step + 1 >= size``.

    ``step`` 0 means no bucketing (``size`` itself). Lengths of the form ``4k + 1`` keep
    SLRNet's stride-4 grid on input pixels ``4i`` of the padded view as of the unpadded one.
    """
    if step <= 0:
        return int(size)
    return max(1, -(-(int(size) - 1) // step)) * step + 1


def square_bucket(size: tuple[int, int], buckets: Sequence[int]) -> int | None:
    """The exact-padding bucket of an image of ``size`` (H, W): the smallest of ``buckets``
    that holds its longer side, None when none does (or ``buckets`` is empty)."""
    longer = max(int(size[0]), int(size[1]))
    fitting = [int(b) for b in buckets if int(b) >= longer]
    return min(fitting) if fitting else None


def check_bucket_sizes(buckets: Any) -> tuple[int, ...]:
    """``config.test.bucket_sizes`` as a tuple of positive ints (empty: no exact padding)."""
    try:
        sizes = tuple(buckets)
    except TypeError:
        sizes = None
    if sizes is None or any(
        isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in sizes
    ):
        raise InferenceError(
            f"bucket_sizes must be a list of positive integers (square sizes in px), got "
            f"{buckets!r}; e.g. (64, 128, 256, 512, 1024, 2048), or () for no padding."
        )
    return tuple(sorted(int(b) for b in sizes))


def pad_view(view: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(h, w, 3) normalised view -> (size[0], size[1], 3), padded at the bottom and right.

    ``mode``: a NumPy pad mode of :data:`BUCKET_PAD_MODES` (``constant`` pads with 0, the
    ImageNet mean colour after normalisation). The valid region stays at ``[:h, :w]``.
    """
    if mode not in BUCKET_PAD_MODES:
        raise InferenceError(f"unknown bucket_pad {mode!r}; expected one of {BUCKET_PAD_MODES}.")
    extra = (int(size[0]) - view.shape[0], int(size[1]) - view.shape[1])
    if min(extra) < 0:
        raise InferenceError(f"cannot pad a {view.shape[:2]} view to the smaller size {size}.")
    if extra == (0, 0):
        return view
    return np.pad(view, ((0, extra[0]), (0, extra[1]), (0, 0)), mode=mode)


def example_fields(example: Mapping[str, Any]) -> dict[str, Any] | None:
    """One example (or an eval batch of one) -> name, uint8 image, labels, mask; None = padding."""

    def single(key):
        value = example.get(key)
        if value is None:
            return None
        value = np.asarray(value)
        return value[0] if batched and value.ndim > 0 else value

    image = np.asarray(example["image"]) if "image" in example else None
    if image is None:
        raise InferenceError("each example needs an 'image' (H, W, 3) entry.")
    batched = image.ndim == 4
    if batched and image.shape[0] != 1:
        raise InferenceError(
            f"examples must come one at a time (batch size 1), got a batch of {image.shape[0]}."
        )
    valid = single("is_valid")
    if valid is not None and not bool(valid):
        return None
    name = single("name")
    if name is None:
        raise InferenceError("each example needs a 'name' to name its output files.")
    name = name.decode() if isinstance(name.item(), bytes) else str(name.item())
    image = single("image")
    raw = single("raw_image")
    if image.dtype == np.uint8:
        image_uint8 = image
    elif raw is not None:
        image_uint8 = np.clip(np.round(255.0 * raw.astype(np.float32)), 0, 255).astype(np.uint8)
    else:
        image_uint8 = denormalise_to_uint8(image)
    return {
        "name": name,
        "image_uint8": check_image(image_uint8),
        "labels": single("labels"),
        "mask": single("mask"),
    }


def _scalar_text(value: Any) -> str:
    """A str / bytes / one-element array entry of an example (or eval batch of one) as str."""
    value = np.ravel(np.asarray(value))[0] if np.ndim(value) else value
    return value.decode() if isinstance(value, bytes) else str(value)


def example_error(example: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, why) of an example that could not be read (its ``error`` entry: an unreadable
    photograph or dataset file), None for a readable one."""
    error = example.get("error")
    if error is None or not np.size(error) or not _scalar_text(error):
        return None
    name = _scalar_text(example["name"]) if "name" in example else "?"
    return name, _scalar_text(error)


def collect_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (non-recursively) in folders, sorted per folder."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InferenceError(
                    f"folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})."
                )
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InferenceError(f"{path} is neither an image file nor a folder.")
    if not paths:
        raise InferenceError("no images given; pass --images FOLDER or --images a.jpg b.png.")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise InferenceError(
                f"{stems[path.stem]} and {path} would both write {path.stem}.png; rename one or "
                "run them separately."
            )
        stems[path.stem] = path
    return paths


def read_photograph(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a photograph as a viewer shows it (EXIF orientation applied,
    16-bit grey scaled to 8 bits: ``slr_jax.data.images``); InferenceError when it cannot be
    decoded or has more than :data:`MAX_IMAGE_PIXELS` pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InferenceError(
                    f"{path} is {width}x{height} ({width * height / 1e6:.1f} MP), more than the "
                    f"{MAX_IMAGE_PIXELS / 1e6:.1f} MP inference takes (its views at scale 2 hold "
                    "4x as many pixels); resize it to at most 2048 px on the longer side."
                )
            return to_rgb_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InferenceError):
            raise
        raise InferenceError(
            f"cannot read image {path} ({type(error).__name__}: {error}); it is not a readable "
            "JPG/PNG, remove it or convert it."
        ) from None


def photographs(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """``{'name': stem, 'image': (H, W, 3) uint8}`` of every path, read when it is reached; an
    unreadable file gives ``{'name': stem, 'error': message}`` instead, so the images after
    it are still processed."""
    for path in paths:
        try:
            yield {"name": path.stem, "image": read_photograph(path)}
        except InferenceError as error:
            yield {"name": path.stem, "error": str(error)}
