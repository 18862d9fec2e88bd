"""Numerical building blocks shared by models, losses and inference (NHWC)."""

from slr_jax.ops.resize import resize_bilinear_align_corners, scaled_size

__all__ = ["resize_bilinear_align_corners", "scaled_size"]
