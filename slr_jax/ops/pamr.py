"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, 2020), as SLRNet uses it (NHWC).

For every dilation ``d`` the 3x3 neighbourhood at offsets ``{-d, 0, d}^2`` is read with
replicate (edge) padding. The image's local standard deviation is taken over ALL
``9 * len(dilations)`` samples (centre included once per dilation, unbiased); the affinity of
each of the ``8 * len(dilations)`` neighbours is ``-|I_centre - I_nb| / (1e-8 + 0.1 * std)``
averaged over image channels and softmax-normalised over neighbours. Each iteration replaces
every mask value by the affinity-weighted sum of its neighbours' values (centre excluded).

Written with padded, shifted slices instead of the reference's fixed convolution kernels: the
same arithmetic, no (8*D)-channel convolutions, and it fuses well under ``jit``. Each iteration
adds the ``8*D`` weighted neighbours one by one rather than stacking them and summing: the
stack is a (B, H, W, C, 8*D) array (53 MB at the stride-4 masks of a 321 crop, batch 2),
written and read back ten times per step, which made PAMR three times slower than the
reference on the CPU; the running sum is one fused pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

STD_EPS = 1e-8
STD_SCALE = 0.1
NEIGHBOUR_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _neighbour_slices(
    x: jax.Array, dilations: Sequence[int], include_centre: bool
) -> Iterator[jax.Array]:
    """Each neighbour's values (B, H, W, C) of ``x`` (B, H, W, C), replicate padding, in the
    order dilation-major, then ``NEIGHBOUR_OFFSETS`` (then the centre if included)."""
    _, h, w, _ = x.shape
    pad = max(dilations)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = NEIGHBOUR_OFFSETS if not include_centre else (*NEIGHBOUR_OFFSETS, (0, 0))
    for d in dilations:
        for dy, dx in offsets:
            y0, x0 = pad + dy * d, pad + dx * d
            yield padded[:, y0 : y0 + h, x0 : x0 + w, :]


def _shifted(x: jax.Array, dilations: Sequence[int], include_centre: bool) -> jax.Array:
    """Stack of neighbour values (B, H, W, C, P), replicate padding; P = (8 or 9) * len(d)."""
    return jnp.stack(list(_neighbour_slices(x, dilations, include_centre)), axis=-1)


def pamr_affinity(image: jax.Array, dilations: Sequence[int]) -> jax.Array:
    """Neighbour affinities (B, H, W, P) from ``image`` (B, H, W, 3); P = 8 * len(dilations).

    Each pixel's affinities are a softmax over its P neighbours.
    """
    if not dilations or min(dilations) < 1:
        raise ValueError(f"PAMR dilations must be positive integers, got {tuple(dilations)}")
    # Unbiased std over all 9*D samples. Replicate padding by max(d) equals padding by d for
    # every smaller dilation, because an edge-padded array repeats its border indefinitely.
    std = jnp.std(_shifted(image, dilations, include_centre=True), axis=-1, ddof=1)
    neighbours = _shifted(image, dilations, include_centre=False)  # (B, H, W, 3, P)
    affinity = -jnp.abs(image[..., None] - neighbours) / (STD_EPS + STD_SCALE * std[..., None])
    return jax.nn.softmax(jnp.mean(affinity, axis=3), axis=-1)


def pamr(
    image: jax.Array, masks: jax.Array, *, num_iters: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> jax.Array:  # fmt: skip
    """Refines ``masks`` (B, H, W, C) with ``image`` (B, H, W, 3) of the same size.

    Returns (B, H, W, C). No gradient is needed by SLRNet (it refines a detached mask), but the
    function is differentiable.
    """
    if image.shape[:3] != masks.shape[:3]:
        raise ValueError(f"PAMR image {image.shape} and masks {masks.shape} differ in size")
    dilations = tuple(dilations)
    # (P, B, H, W, 1): one contiguous weight map per neighbour, in _neighbour_slices' order.
    affinity = jnp.moveaxis(pamr_affinity(image, dilations), -1, 0)[..., None]

    def step(m, _):
        return _weighted_neighbour_sum(m, affinity, dilations), None

    masks, _ = jax.lax.scan(step, masks, None, length=num_iters)
    return masks


def _weighted_neighbour_sum(
    x: jax.Array, weights: jax.Array, dilations: Sequence[int]
) -> jax.Array:
    """sum_p weights[p] * neighbour_p(x) for ``x`` (B, H, W, C) and ``weights``
    (P, B, H, W, 1), neighbours in ``_neighbour_slices``' order and summed in it;
    -> (B, H, W, C)."""
    total = None
    for p, neighbour in enumerate(_neighbour_slices(x, dilations, include_centre=False)):
        term = neighbour * weights[p]
        total = term if total is None else total + term
    return total
