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
