"""SLRNet in Flax linen: backbone, heads, low-rank module and the full model (NHWC)."""

from slr_jax.models.slrnet import (
    MODES,
    SLRNet,
    build_model,
    init_variables,
    variable_shapes,
)

__all__ = ["MODES", "SLRNet", "build_model", "init_variables", "variable_shapes"]
