"""Near ties of the code-consistency term: pixels whose two largest codes differ by less than
float32 rounding, where the two frameworks may keep different atoms; and the term computed
without them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slr_jax.losses import keep_max
from slr_jax.parity.settings import TIE_EPS


def top2_gap(codes) -> np.ndarray:
    """Gap between the largest and second largest code, (...,) from codes (..., K)."""
    codes = np.asarray(codes)
    if codes.shape[-1] < 2:
        raise ValueError(f"codes need at least 2 atoms on the last axis, got shape {codes.shape}")
    top2 = -np.partition(-codes, 1, axis=-1)[..., :2]
    return top2[..., 0] - top2[..., 1]


def near_tie_mask(codes, eps: float = TIE_EPS) -> np.ndarray:
    """(...,) bool: pixels of codes (..., K) whose two largest codes differ by less than eps."""
    return top2_gap(codes) < eps


def near_ties(codes, eps: float = TIE_EPS) -> int:
    """Number of pixels of codes (..., K) whose two largest codes differ by less than eps."""
    return int(np.sum(near_tie_mask(codes, eps)))


def _near_tie_mask_jnp(codes: jax.Array, eps: float) -> jax.Array:
    top2 = jax.lax.top_k(jax.lax.stop_gradient(codes), 2)[0]
    return top2[..., 0] - top2[..., 1] < eps


def masked_code_consistency(codes: jax.Array, codes2: jax.Array, keep: jax.Array) -> jax.Array:
    """The code-consistency term over kept pixels only: mean over kept pixels (B, h, w) and
    atoms of |keep_max(c1) - keep_max(c2)|, codes (B, h, w, K); 0 when nothing is kept."""
    per_pixel = jnp.sum(jnp.abs(keep_max(codes) - keep_max(codes2)), axis=-1)
    count = jnp.sum(keep) * codes.shape[-1]
    return jnp.sum(jnp.where(keep, per_pixel, 0.0)) / jnp.maximum(count, 1)
