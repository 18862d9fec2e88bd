"""Synthetic shapes: a tiny, deterministic, download-free segmentation dataset.

Every image shows one to three filled shapes (ellipse, rectangle, triangle) on a noisy
background. Each foreground class has its own colour and its own stripe texture, so a small
network can learn it in a few hundred steps; shape boundaries are marked 255 (ignore) like the
object outlines of PASCAL VOC. ``write_synthetic_voc`` lays the examples out as a VOC 2012
folder so that the same reader (``slr_jax.data.voc``) serves the demo, the tests and real data.

Floors for a trained model (``trivial_baseline_scores``) at the demo's settings (configs/demo.py:
256 train / 32 val images of 64 px, 6 classes incl. background, seed 0), val mIoU:
all background 0.1395 (background is 83.7% of the labelled val pixels); nearest mean class
colour 0.7746 on the arrays generated here, 0.7639 on the JPEGs ``write_synthetic_voc`` writes
(what the demo's folder pipeline reads). Colour alone separates the classes well, so only a
model above ~0.77 has learnt more than colour. docs/data.md has the details.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from slr_jax.data.voc import IGNORE_LABEL, voc_palette

SHAPE_KINDS = ("ellipse", "rectangle", "triangle")
INFO_FILE = "synthetic_info.json"


def class_colour(class_id: int, num_classes: int) -> np.ndarray:
    """RGB colour (3,) float32 in [0, 1] of foreground class ``class_id`` (1..num_classes-1)."""
    hue = (class_id - 1) / max(num_classes - 1, 1)
    return np.asarray(colorsys.hsv_to_rgb(hue, 0.85, 0.95), np.float32)


def _stripe_texture(class_id: int, height: int, width: int) -> np.ndarray:
    """(H, W) float32 multiplicative texture in [0.7, 1]: stripes whose angle depends on class."""
    angle = np.pi * (class_id * 0.37 % 1.0)
    period = 3 + class_id % 4
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (cols * np.cos(angle) + rows * np.sin(angle)) / period
    return np.where(np.floor(phase) % 2 == 0, 1.0, 0.7).astype(np.float32)


def _shape_region(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) bool region of one randomly placed shape covering roughly 4-16% of the image."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    half_h = rng.uniform(0.12, 0.25) * height
    half_w = rng.uniform(0.12, 0.25) * width
    centre_r = rng.uniform(half_h, height - half_h)
    centre_c = rng.uniform(half_w, width - half_w)
    dr, dc = (rows - centre_r) / half_h, (cols - centre_c) / half_w
    if kind == "ellipse":
        return dr**2 + dc**2 <= 1.0
    if kind == "rectangle":
        return (np.abs(dr) <= 1.0) & (np.abs(dc) <= 1.0)
    # Triangle with its apex at the top: the half-width grows linearly towards the base.
    return (dr >= -1.0) & (dr <= 1.0) & (np.abs(dc) <= (dr + 1.0) / 2.0)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose label differs from a 4-neighbour's."""
    edge = np.zeros(mask.shape, bool)
    vertical = mask[1:, :] != mask[:-1, :]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def make_synthetic_example(
    index: int,
    size: int | Sequence[int],
    num_classes: int,
    seed: int,
    *,
    max_shapes: int = 3,
    ignore_boundary: bool = True,
) -> dict:
    """One example: {'name': str, 'image': (H, W, 3) uint8, 'mask': (H, W) uint8}.

    Depends only on (index, size, num_classes, seed), so examples do not change when more are
    requested. Mask values: 0 background, 1..num_classes-1 shapes, 255 on shape outlines.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng([seed, index])
    background = rng.uniform(0.3, 0.6, size=3).astype(np.float32)
    image = background + rng.normal(0.0, 0.08, size=(height, width, 3)).astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        class_id = int(rng.integers(1, num_classes))
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        region = _shape_region(kind, rng, height, width)
        texture = _stripe_texture(class_id, height, width)[..., None]
        shade = class_colour(class_id, num_classes) * texture
        shade = shade + rng.normal(0.0, 0.03, size=shade.shape).astype(np.float32)
        image = np.where(region[..., None], shade, image)
        mask[region] = class_id
    if ignore_boundary:
        mask[_boundary(mask)] = IGNORE_LABEL
    image_u8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return {"name": f"shapes{seed}_{index:06d}", "image": image_u8, "mask": mask}


def make_synthetic_examples(
    num_examples: int, size: int | Sequence[int], num_classes: int, seed: int
) -> list[dict]:
    """``num_examples`` examples of ``make_synthetic_example`` (deterministic in ``seed``).

    Returns a list of {'name': str, 'image': (H, W, 3) uint8, 'mask': (H, W) uint8}.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}.")
    if num_classes > 255:
        raise ValueError(f"num_classes must be <= 255 (uint8 masks), got {num_classes}.")
    sizes = (size,) if isinstance(size, int) else tuple(size)
    if len(sizes) not in (1, 2) or min(sizes) < 8:
        raise ValueError(f"size must be an int or (height, width), each >= 8; got {size!r}.")
    return [make_synthetic_example(i, size, num_classes, seed) for i in range(num_examples)]


def write_synthetic_voc(
    root: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    size: int | Sequence[int],
    num_classes: int,
    seed: int,
) -> Path:
    """Writes the synthetic dataset as a VOC 2012 folder and returns ``root``.

    Layout: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` and ``SegmentationClassAug/*.png``
    (palette PNGs), ``ImageSets/Segmentation/{train,train_aug,val}.txt``. train_aug lists the
    same images as train, so the SBD code path is exercised too. Train uses ``seed`` and val
    ``seed + 1``. A folder already written with the same arguments is left as it is.
    """
    root = Path(root)
    info = {
        "num_train": num_train,
        "num_val": num_val,
        "size": size if isinstance(size, int) else list(size),
        "num_classes": num_classes,
        "seed": seed,
    }
    info_path = root / INFO_FILE
    if info_path.is_file():
        try:
            if json.loads(info_path.read_text()) == info:
                return root
        except json.JSONDecodeError:
            pass  # A half-written folder: write it again.
    splits = {
        "train": make_synthetic_examples(num_train, size, num_classes, seed),
        "val": make_synthetic_examples(num_val, size, num_classes, seed + 1),
    }
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, examples in splits.items():
        for example in examples:
            name = example["name"]
            Image.fromarray(example["image"]).save(
                root / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0
            )
            mask = Image.fromarray(example["mask"])
            mask.putpalette(palette)  # 'L' -> 'P' keeping the class indices, as VOC stores them
            mask.save(root / "SegmentationClass" / f"{name}.png")
            mask.save(root / "SegmentationClassAug" / f"{name}.png")
        ids = "".join(f"{example['name']}\n" for example in examples)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
        if split == "train":
            (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(ids)
    info_path.write_text(json.dumps(info))
    return root


def _labelled_pixels(examples: Sequence[dict], num_classes: int, what: str):
    """(N, 3) float64 RGB and (N,) int64 labels of every non-ignored pixel of ``examples``."""
    if not examples:
        raise ValueError(f"trivial_baseline_scores needs at least one {what} example.")
    colours, labels = [], []
    for example in examples:
        image, mask = np.asarray(example["image"]), np.asarray(example["mask"])
        if image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != mask.shape:
            raise ValueError(
                f"{what} example {example.get('name', '?')!r}: expected 'image' (H, W, 3) and "
                f"'mask' (H, W), got {image.shape} and {mask.shape}."
            )
        keep = mask != IGNORE_LABEL
        bad = np.unique(mask[keep & (mask >= num_classes)])
        if bad.size:
            raise ValueError(
                f"{what} example {example.get('name', '?')!r} holds class(es) {bad.tolist()} "
                f"but num_classes is {num_classes}."
            )
        colours.append(image[keep].astype(np.float64))
        labels.append(mask[keep].astype(np.int64))
    return np.concatenate(colours), np.concatenate(labels)


def trivial_baseline_scores(
    train_examples: Sequence[dict], val_examples: Sequence[dict], num_classes: int
) -> dict:
    """Val scores of two segmenters that learn nothing about shapes, as a floor for a model.

    ``all_background`` predicts class 0 everywhere. ``nearest_colour`` gives each pixel the
    class whose mean RGB over the train pixels of that class (background included, 255 pixels
    left out) is nearest in Euclidean distance; a class with no train pixel is never predicted.
    Examples are dicts with 'image' (H, W, 3) uint8 and 'mask' (H, W) uint8 as
    ``make_synthetic_examples`` returns them.

    Returns {'all_background': scores, 'nearest_colour': scores, 'class_colours': (C, 3)
    float64 (NaN rows for classes absent from train)}, each ``scores`` being
    ``slr_jax.evaluate.segmentation_scores`` of the val confusion matrix ('miou', 'iou', ...).
    """
    from slr_jax.evaluate import ConfusionAccumulator

    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}.")
    colours, labels = _labelled_pixels(train_examples, num_classes, "train")
    _labelled_pixels(val_examples, num_classes, "val")  # validates before scoring
    counts = np.bincount(labels, minlength=num_classes)
    sums = np.stack([np.bincount(labels, colours[:, c], num_classes) for c in range(3)], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        class_colours = np.where(counts[:, None] > 0, sums / counts[:, None], np.nan)
    known = np.flatnonzero(counts > 0)

    background = ConfusionAccumulator(num_classes)
    nearest = ConfusionAccumulator(num_classes)
    for example in val_examples:
        mask = np.asarray(example["mask"])
        image = np.asarray(example["image"], np.float64)
        distances = ((image[..., None, :] - class_colours[known]) ** 2).sum(-1)
        background.update(np.zeros_like(mask), mask)
        nearest.update(known[np.argmin(distances, axis=-1)], mask)
    return {
        "all_background": background.result(),
        "nearest_colour": nearest.result(),
        "class_colours": class_colours,
    }
