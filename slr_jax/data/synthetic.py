"""Synthetic shapes: a tiny, deterministic, download-free segmentation dataset.

Every image shows one to three objects on a cluttered background. A foreground class is a fixed
pair (shape kind, texture), ``class_signature``: shape kinds ellipse, rectangle, triangle, ring,
cross, diamond; textures stripes (class-specific angle and period), checkers, dots, grid lines
or plain. Classes share a shape kind only with different textures and a texture only with
different shapes, so shape + texture identify the class, while colour does not: every object,
the background and the clutter draw their colours from one distribution. The background holds
unlabelled blobs and strokes of random colours, half of them carrying the classes' textures, plus
a colour ramp and pixel noise, so neither colour nor texture at a pixel tells object from
background. Objects cover about 4-15% of the image each and lie at least 3 px apart; outlines
between labels are 255 (ignore) like the object outlines of PASCAL VOC. ``write_synthetic_voc``
lays the examples out as a VOC 2012 folder so that the same reader (``slr_jax.data.voc``) serves
the demo, the tests and real data.

Floors for a trained model (``trivial_baseline_scores``) at the demo's settings (configs/demo.py:
256 train / 32 val images of 64 px, 6 classes incl. background, seed 0), val mIoU:
all background 0.1440 (background is 86.4% of the labelled val pixels); nearest mean class
colour 0.0848 on the arrays generated here, 0.0854 on the JPEGs ``write_synthetic_voc`` writes;
with the demo's plain clutter (``clutter_texture_prob=0``) 0.0879 and 0.0885 (the JPEGs are what
the demo's folder pipeline reads). The class mean colours are nearly equal, so colour is
worth less than predicting background everywhere; a model has to use shape and texture.
docs/data.md has the details and the commands.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from slr_jax.constants import IGNORE_LABEL, voc_palette
from slr_jax.metrics import ConfusionAccumulator

# Version 1 gave every class its own colour; version 2 is the shape + texture set above.
GENERATOR_VERSION = 2
# The version is part of the name (the file's content is the arguments alone, which is what
# slr_jax.data.pipeline compares), so a folder of another generator is never taken as current.
INFO_FILE = f"synthetic_info_v{GENERATOR_VERSION}.json"
LEGACY_INFO_FILES = ("synthetic_info.json",)  # version 1

SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "ring", "cross", "diamond")
# Area of each shape kind with half-height and half-width 1 (see _shape_region).
_RING_HOLE = 0.55
_CROSS_ARM = 0.38
_UNIT_AREA = {
    "ellipse": np.pi,
    "rectangle": 4.0,
    "triangle": 2.0,
    "ring": np.pi * (1.0 - _RING_HOLE**2),
    "cross": 8.0 * _CROSS_ARM - 4.0 * _CROSS_ARM**2,
    "diamond": 2.0,
}
# (family, angle in degrees, period in pixels). The first ten are the most distinct and are what
# up to 21 classes use; the stripes after them make every signature unique up to 254 classes.
_BASE_TEXTURES = (
    ("stripes", 0, 4),
    ("checkers", 0, 4),
    ("dots", 0, 5),
    ("stripes", 45, 4),
    ("stripes", 90, 4),
    ("grid", 0, 5),
    ("stripes", 135, 4),
    ("plain", 0, 0),
    ("checkers", 45, 6),
    ("stripes", 0, 8),
)
TEXTURES = _BASE_TEXTURES + tuple(
    ("stripes", angle, period) for period in (3, 5, 7) for angle in range(0, 180, 15)
)
MAX_CLASSES = 255  # uint8 masks; every signature below is unique up to here
# Default share of clutter items drawn in a class texture (the rest are plain).
CLUTTER_TEXTURE_PROB = 0.5


def texture_name(texture: tuple[str, int, int]) -> str:
    """'stripes45/4' for (family, angle, period); 'plain' for the untextured one."""
    family, angle, period = texture
    return family if family == "plain" else f"{family}{angle}/{period}"


def _signature_indices(class_id: int) -> tuple[int, int]:
    """(shape index, texture index) of foreground class ``class_id`` (1..254).

    Class i = class_id - 1 gets shape i % K and texture (i % K + i // K) % T: classes of one
    shape have consecutive, hence different, textures (i // K < T for every uint8 class), and
    the first K classes differ in both shape and texture.
    """
    if not 1 <= class_id < MAX_CLASSES:
        raise ValueError(
            f"class_id must be a foreground class 1..{MAX_CLASSES - 1}, got {class_id}."
        )
    i = class_id - 1
    shape = i % len(SHAPE_KINDS)
    return shape, (shape + i // len(SHAPE_KINDS)) % len(TEXTURES)


def class_signature(class_id: int) -> tuple[str, str]:
    """(shape kind, texture name) that identifies foreground class ``class_id`` (1..254)."""
    shape, texture = _signature_indices(class_id)
    return SHAPE_KINDS[shape], texture_name(TEXTURES[texture])


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 RGB in [0, 1]; one distribution for objects, clutter and background."""
    hue, sat, val = rng.uniform(0.0, 1.0), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95)
    return np.asarray(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _texture_pattern(texture: tuple[str, int, int], rows: np.ndarray, cols: np.ndarray):
    """float32 in {0, 1}, shaped like ``rows``: ``texture`` at pixel coordinates (rows, cols)."""
    family, angle, period = texture
    if family == "plain":
        return np.zeros(rows.shape, np.float32)
    theta = np.deg2rad(angle)
    # a runs across the stripes (angle 0: horizontal stripes), b along them.
    a = rows * np.cos(theta) - cols * np.sin(theta)
    b = rows * np.sin(theta) + cols * np.cos(theta)
    if family == "stripes":
        pattern = np.floor(2.0 * a / period) % 2 == 0
    elif family == "checkers":
        pattern = (np.floor(2.0 * a / period) + np.floor(2.0 * b / period)) % 2 == 0
    elif family == "dots":
        da, db = a % period - period / 2.0, b % period - period / 2.0
        pattern = da**2 + db**2 <= (0.3 * period) ** 2
    elif family == "grid":
        pattern = (a % period < 1.0) | (b % period < 1.0)
    else:
        raise ValueError(f"Unknown texture family {family!r}.")
    return pattern.astype(np.float32)


def _paint(
    image: np.ndarray,
    region: np.ndarray,
    texture: tuple[str, int, int],
    rng: np.random.Generator,
    grid: tuple[np.ndarray, np.ndarray],
    avoid: np.ndarray | None = None,
) -> None:
    """Fills ``region`` of ``image`` (H, W, 3) with a random colour carrying ``texture``.

    The texture shifts the colour by a random contrast towards the far end of the brightness
    range, with a random phase, so it is visible on any colour. With ``avoid`` (3,), the colour
    is drawn again (up to 10 times) while it lies within 0.3 of ``avoid`` in RGB.
    """
    rows, cols = grid
    colour = _random_colour(rng)
    for _ in range(10):
        if avoid is None or np.linalg.norm(colour - avoid) >= 0.3:
            break
        colour = _random_colour(rng)
    contrast = rng.uniform(0.25, 0.4) * (-1.0 if colour.mean() > 0.55 else 1.0)
    phase_r, phase_c = rng.uniform(0.0, 16.0, size=2)
    pattern = _texture_pattern(texture, rows[region] + phase_r, cols[region] + phase_c)
    image[region] = colour + contrast * pattern[:, None]


def _shape_region(kind: str, rng: np.random.Generator, grid, height: int, width: int):
    """(H, W) bool region of one randomly placed ``kind`` covering about 5-13% of the image."""
    rows, cols = grid
    area = rng.uniform(0.05, 0.13) * height * width
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(4.0 / 3.0)))  # half-width / half-height
    half_h = min(np.sqrt(area / (_UNIT_AREA[kind] * aspect)), height / 2.0 - 0.5)
    half_w = min(aspect * half_h, width / 2.0 - 0.5)
    half_h, half_w = max(half_h, 1.5), max(half_w, 1.5)
    centre_r = rng.uniform(half_h, height - half_h) - 0.5
    centre_c = rng.uniform(half_w, width - half_w) - 0.5
    dr, dc = (rows - centre_r) / half_h, (cols - centre_c) / half_w
    if kind == "ellipse":
        return dr**2 + dc**2 <= 1.0
    if kind == "rectangle":
        return (np.abs(dr) <= 1.0) & (np.abs(dc) <= 1.0)
    if kind == "triangle":  # apex at the top: the half-width grows linearly towards the base
        return (dr >= -1.0) & (dr <= 1.0) & (np.abs(dc) <= (dr + 1.0) / 2.0)
    if kind == "ring":
        radius = dr**2 + dc**2
        return (radius <= 1.0) & (radius >= _RING_HOLE**2)
    if kind == "cross":
        arm_r, arm_c = np.abs(dr) <= _CROSS_ARM, np.abs(dc) <= _CROSS_ARM
        return (arm_r & (np.abs(dc) <= 1.0)) | (arm_c & (np.abs(dr) <= 1.0))
    if kind == "diamond":
        return np.abs(dr) + np.abs(dc) <= 1.0
    raise ValueError(f"Unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}.")


def _clutter_region(rng: np.random.Generator, grid, height: int, width: int) -> np.ndarray:
    """(H, W) bool unlabelled clutter: an irregular blob (union of bumps) or a thin stroke."""
    rows, cols = grid
    centre_r, centre_c = rng.uniform(0, height), rng.uniform(0, width)
    if rng.uniform() < 0.3:  # stroke: a thin bar at a random angle
        theta = rng.uniform(0.0, np.pi)
        length = rng.uniform(0.3, 0.6) * min(height, width)
        thickness = rng.uniform(0.03, 0.06) * min(height, width) + 1.0
        along = (rows - centre_r) * np.sin(theta) + (cols - centre_c) * np.cos(theta)
        across = (rows - centre_r) * np.cos(theta) - (cols - centre_c) * np.sin(theta)
        return (np.abs(along) <= length / 2.0) & (np.abs(across) <= thickness / 2.0)
    radius = np.sqrt(rng.uniform(0.01, 0.05) * height * width / np.pi)
    field = np.zeros(rows.shape, np.float32)
    for _ in range(int(rng.integers(3, 6))):
        off_r, off_c = rng.normal(0.0, 0.7 * radius, size=2)
        sigma = rng.uniform(0.35, 0.7) * radius
        dist2 = (rows - centre_r - off_r) ** 2 + (cols - centre_c - off_c) ** 2
        field += np.exp(-dist2 / (2.0 * sigma**2))
    return field >= 0.5


def _grow(region: np.ndarray, steps: int) -> np.ndarray:
    """(H, W) bool ``region`` grown by ``steps`` 4-neighbour dilations."""
    grown = region.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:, :] |= grown[:-1, :]
        step[:-1, :] |= grown[1:, :]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


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
    clutter_texture_prob: float = CLUTTER_TEXTURE_PROB,
) -> dict:
    """One example: {'name': str, 'image': (H, W, 3) uint8, 'mask': (H, W) uint8}.

    Depends only on (index, size, num_classes, seed), so examples do not change when more are
    requested. Mask values: 0 background (clutter included), 1..num_classes-1 objects, 255 on
    object outlines. Object class c is drawn as ``class_signature(c)`` in a random colour.
    ``clutter_texture_prob`` is the chance that a clutter item carries one of the classes'
    textures (else it is plain); the random draws do not depend on it, so two values give the
    same layout, colours and objects and differ only in the clutter's texture.
    """
    if not 0.0 <= clutter_texture_prob <= 1.0:
        raise ValueError(f"clutter_texture_prob must lie in [0, 1], got {clutter_texture_prob}.")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng([seed, index])
    grid = tuple(g.astype(np.float32) for g in np.mgrid[0:height, 0:width])
    rows, cols = grid

    # Background: a random colour with a linear ramp in a random direction.
    background = _random_colour(rng)
    ramp_angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (rows * np.sin(ramp_angle) + cols * np.cos(ramp_angle)) / max(height, width)
    image = (background + (rng.uniform(0.0, 0.25) * ramp)[..., None]).astype(np.float32)
    # Clutter: 1-2 + Poisson(H * W / 700) items (7.4 on average at 64 px), a fraction
    # clutter_texture_prob of them (half by default) in the textures of the classes.
    class_textures = sorted({_signature_indices(c)[1] for c in range(1, num_classes)})
    for _ in range(int(rng.integers(1, 3)) + int(rng.poisson(height * width / 700.0))):
        region = _clutter_region(rng, grid, height, width)
        textured = rng.uniform() < clutter_texture_prob
        texture = TEXTURES[class_textures[int(rng.integers(len(class_textures)))]]
        _paint(image, region, texture if textured else ("plain", 0, 0), rng, grid)

    # Objects at least 3 px apart, so that neither objects of one class nor their outlines merge;
    # an object that finds no room in 20 tries is left out (never the first one).
    mask = np.zeros((height, width), np.uint8)
    taken = np.zeros((height, width), bool)  # objects so far, grown by 3 px
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        class_id = int(rng.integers(1, num_classes))
        shape, texture = _signature_indices(class_id)
        for _ in range(20):
            region = _shape_region(SHAPE_KINDS[shape], rng, grid, height, width)
            if not (region & taken).any():
                break
        else:
            continue
        _paint(image, region, TEXTURES[texture], rng, grid, avoid=background)
        mask[region] = class_id
        taken |= _grow(region, 3)
    image += rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    if ignore_boundary:
        mask[_boundary(mask)] = IGNORE_LABEL
    image_u8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return {"name": f"shapes{seed}_{index:06d}", "image": image_u8, "mask": mask}


def make_synthetic_examples(
    num_examples: int,
    size: int | Sequence[int],
    num_classes: int,
    seed: int,
    *,
    clutter_texture_prob: float = CLUTTER_TEXTURE_PROB,
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
    return [
        make_synthetic_example(
            i, size, num_classes, seed, clutter_texture_prob=clutter_texture_prob
        )
        for i in range(num_examples)
    ]


def write_synthetic_voc(
    root: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    size: int | Sequence[int],
    num_classes: int,
    seed: int,
    clutter_texture_prob: float = CLUTTER_TEXTURE_PROB,
) -> Path:
    """Writes the synthetic dataset as a VOC 2012 folder and returns ``root``.

    Layout: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` and ``SegmentationClassAug/*.png``
    (palette PNGs), ``ImageSets/Segmentation/{train,train_aug,val}.txt``. train_aug lists the
    same images as train, so the SBD code path is exercised too. Train uses ``seed`` and val
    ``seed + 1``. A folder already written with the same arguments by this generator version
    (``INFO_FILE``) is left as it is; otherwise the examples are written (again) and the info
    file last, after removing the old one and any earlier version's.
    """
    root = Path(root)
    info = {
        "num_train": num_train,
        "num_val": num_val,
        "size": size if isinstance(size, int) else list(size),
        "num_classes": num_classes,
        "seed": seed,
        "clutter_texture_prob": clutter_texture_prob,
    }
    info_path = root / INFO_FILE
    if info_path.is_file():
        try:
            if json.loads(info_path.read_text()) == info:
                return root
        except json.JSONDecodeError:
            pass  # A half-written folder: write it again.
    for stale in (INFO_FILE, *LEGACY_INFO_FILES):  # an interrupted rewrite must not pass as done
        (root / stale).unlink(missing_ok=True)
    texture = {"clutter_texture_prob": clutter_texture_prob}
    splits = {
        "train": make_synthetic_examples(num_train, size, num_classes, seed, **texture),
        "val": make_synthetic_examples(num_val, size, num_classes, seed + 1, **texture),
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
    ``slr_jax.metrics.segmentation_scores`` of the val confusion matrix ('miou', 'iou', ...).
    """
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
