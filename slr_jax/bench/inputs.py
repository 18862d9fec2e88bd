"""The benchmark's inputs: a random training batch (the parity tool's images) and a
photograph for inference."""

from __future__ import annotations

import numpy as np

from slr_jax.parity.inputs import make_inputs as parity_inputs


def make_inputs(batch: int, crop: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A random training batch in the layout of ``docs/design.md`` (NumPy, NHWC): smoothed
    noise images (``parity.make_inputs``), one or two image labels each, no pixel labels."""
    inputs = parity_inputs("wsss", batch, crop, num_classes, seed)
    labels = np.zeros((batch, num_classes - 1), np.float32)
    for i in range(batch):
        labels[i, [i % (num_classes - 1), (3 * i + 7) % (num_classes - 1)]] = 1.0
    return dict(
        inputs,
        labels=labels,
        mask=np.full((batch, crop, crop), 255, np.int32),
        is_labeled=np.zeros(batch, bool),
    )


def make_photo(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: smooth random colours (the inference input)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (max(size // 16, 2), max(size // 16, 2), 3))
    from PIL import Image

    return (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(coarse[..., c].astype(np.float32)).resize(
                        (size, size), Image.Resampling.BILINEAR
                    )
                )
                for c in range(3)
            ],
            axis=-1,
        )
        .clip(0, 255)
        .astype(np.uint8)
    )


def voc_like_sizes(count: int = 1449, seed: int = 0) -> list[tuple[int, int]]:
    """(H, W) of ``count`` images sized like VOC 2012 val (1,449 images; no VOC data here):
    the longer side 500 px for 97% of them, else 300-499; the shorter side 375 or 333 px for
    over half, else 150-500; landscape 70%, portrait otherwise."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(count):
        longer = 500 if rng.random() < 0.97 else int(rng.integers(300, 500))
        pick = rng.random()
        shorter = 375 if pick < 0.35 else 333 if pick < 0.55 else int(rng.integers(150, 501))
        shorter = min(shorter, longer)
        sizes.append((shorter, longer) if rng.random() < 0.7 else (longer, shorter))
    return sizes
