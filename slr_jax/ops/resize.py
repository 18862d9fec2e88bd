"""Bilinear resize with ``align_corners=True`` semantics, exactly as PyTorch's ``F.interpolate``.

Why not ``jax.image.resize``: it uses half-pixel centres, a different function. Why not
``jax.image.scale_and_translate``: in float32 its kernel weights drift (~1e-4 when halving a
161 px map). Instead the 1-D interpolation matrices are computed once per static shape in NumPy
and applied as two matmuls, which is exact to float32 rounding and maps well to TPU MXUs. The
program rebuilds each matrix from its rows' two taps (``interp_matrix``) instead of holding it
as a dense constant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def interp_matrix_np(in_size: int, out_size: int, coord_dtype: str = "float32") -> np.ndarray:
    """(out_size, in_size) float64 matrix of align-corners linear interpolation weights.

    The source coordinates and weights are computed in ``coord_dtype`` the way PyTorch's
    kernels do for tensors of that dtype (``scale = float(in - 1) / (out - 1)``,
    ``src = scale * dst``), so the matrix reproduces PyTorch's rounding of the weights rather
    than the exact real-valued ones (in float32 they differ by up to ~1e-5 relative for odd
    sizes such as 161 -> 80).
    """
    ftype = np.dtype(coord_dtype).type
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got in={in_size}, out={out_size}")
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    if in_size == 1 or out_size == 1:
        # PyTorch: with one output (or input) sample every output reads source index 0.
        mat[:, 0] = 1.0
        return mat
    scale = ftype(in_size - 1) / ftype(out_size - 1)
    src = (scale * np.arange(out_size, dtype=ftype)).astype(ftype)
    lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(ftype), ftype(0), ftype(1))
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), (ftype(1) - frac).astype(np.float64))
    np.add.at(mat, (rows, hi), frac.astype(np.float64))
    return mat


@functools.lru_cache(maxsize=256)
def _interp_taps_np(in_size: int, out_size: int, coord_dtype: str, dtype: np.dtype):
    """Per output row: the two source columns and their weights, rounded to ``dtype`` exactly
    as ``interp_matrix_np(...).astype(dtype)`` rounds them (a row whose two taps coincide gets
    their sum on the first and 0 on the second)."""
    mat = interp_matrix_np(in_size, out_size, coord_dtype).astype(dtype)
    nonzero = mat != 0
    lo = np.argmax(nonzero, axis=1)
    hi = in_size - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    rows = np.arange(out_size)
    w_lo = mat[rows, lo]
    w_hi = np.where(hi != lo, mat[rows, hi], 0).astype(dtype)
    # Every row has at most two non-zero entries, so these four vectors describe it exactly.
    rebuilt = np.zeros_like(mat)
    rebuilt[rows, lo] += w_lo
    rebuilt[rows, hi] += w_hi
    if not np.array_equal(rebuilt, mat):
        raise AssertionError(f"interpolation taps do not rebuild the {in_size}->{out_size} matrix")
    return lo.astype(np.int32), hi.astype(np.int32), w_lo, w_hi


def interp_matrix(in_size: int, out_size: int, dtype=jnp.float32) -> jax.Array:
    """Align-corners interpolation matrix (out_size, in_size) of ``dtype`` (coordinates rounded
    as PyTorch rounds them for ``dtype``: float64 for float64), bit-identical to
    ``interp_matrix_np(...)`` cast to ``dtype``.

    Built inside the program from ``iota`` and four length-``out_size`` vectors (each row's two
    source columns and weights) rather than baked in as a dense constant: the dense constants
    of every resize's (out, in) shape made most of the train step's program text (VOC: 4.4 MB
    of StableHLO, 1.5 MB without them; docs/scaling.md).
    """
    dtype = jnp.dtype(dtype)
    coords = "float64" if dtype == jnp.float64 else "float32"
    lo, hi, w_lo, w_hi = _interp_taps_np(int(in_size), int(out_size), coords, dtype)
    cols = jax.lax.broadcasted_iota(jnp.int32, (int(out_size), int(in_size)), 1)
    zero = jnp.zeros((), dtype)
    # x + 0 is exact, so the sum of the two selections is exactly the matrix's entry.
    return jnp.where(cols == jnp.asarray(lo)[:, None], jnp.asarray(w_lo, dtype)[:, None], zero) + (
        jnp.where(cols == jnp.asarray(hi)[:, None], jnp.asarray(w_hi, dtype)[:, None], zero)
    )


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes ``x`` (B, H, W, C) to (B, size[0], size[1], C), bilinear, align_corners=True.

    Matches ``torch.nn.functional.interpolate(mode='bilinear', align_corners=True)`` (no
    antialiasing when downscaling). Same-size resizes return ``x`` unchanged.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC array, got shape {x.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w, _ = x.shape
    if (out_h, out_w) == (in_h, in_w):
        return x
    # Interpolation weights stay float32 even for bfloat16 activations; the result is cast back.
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    y = x.astype(compute_dtype)
    if out_h != in_h:
        y = jnp.einsum("oh,bhwc->bowc", interp_matrix(in_h, out_h, compute_dtype), y, precision=hp)
    if out_w != in_w:
        y = jnp.einsum("pw,bhwc->bhpc", interp_matrix(in_w, out_w, compute_dtype), y, precision=hp)
    return y.astype(x.dtype)


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(int(h * factor), int(w * factor))``: the reference truncates like Python ``int()``."""
    return int(size[0] * factor), int(size[1] * factor)
