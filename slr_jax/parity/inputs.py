"""The random batch both frameworks see: smoothed noise images in our layout (NHWC), and image
labels chosen from the network's own predictions."""

from __future__ import annotations

import numpy as np

from slr_jax.parity.settings import IMAGENET_MEAN, IMAGENET_STD


def make_inputs(setting: str, batch: int, crop: int, num_classes: int, seed: int) -> dict:
    """Random NumPy batch in our layout (NHWC) without labels (see ``add_labels``)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 1, (batch, crop, crop, 3)).astype(np.float32)
    # Smooth the raw image a little so PAMR sees structure rather than pure noise.
    raw = (raw + np.roll(raw, 1, 1) + np.roll(raw, 1, 2)) / 3.0
    image = (raw - IMAGENET_MEAN) / IMAGENET_STD
    return dict(image=image, raw_image=raw)


def add_labels(inputs: dict, setting: str, class_peaks: np.ndarray) -> dict:
    """Image labels: the 1 or 2 foreground classes the network predicts most strongly
    (``class_peaks`` (B, C-1), the spatial max of its test masks), so that pseudo labels contain
    every labelled class and the seg loss is not zeroed by its per-image weight. For the semi
    settings every other example is pixel-labelled with blocks of its classes."""
    batch, crop = inputs["image"].shape[:2]
    labels = np.zeros_like(class_peaks, dtype=np.float32)
    mask = np.full((batch, crop, crop), 255, np.int32)
    for i in range(batch):
        classes = np.argsort(-class_peaks[i])[: 1 + i % 2]
        labels[i, classes] = 1
        m = np.zeros((crop, crop), np.int32)
        for j, c in enumerate(classes):
            y0 = crop // 4 + j * crop // 4
            m[y0 : y0 + crop // 3, crop // 5 : crop // 5 + crop // 2] = c + 1
        m[: crop // 10] = 255
        mask[i] = m
    semi = setting in ("semi", "semi_wo_cls")
    is_labeled = (np.arange(batch) % 2 == 0) if semi else np.zeros(batch, bool)
    mask[~is_labeled] = 255
    return dict(inputs, labels=labels, mask=mask, is_labeled=is_labeled)
