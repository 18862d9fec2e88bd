"""The networks in Flax linen (NHWC): SLRNet (backbone, heads, low-rank module) and the
stage-2 DeepLabV3+; ``build_model`` picks one by ``config.model.arch``."""

from slr_jax.models.deeplab import build_deeplab
from slr_jax.models.shapes import check_tree_shapes
from slr_jax.models.slrnet import (
    MODES,
    SLRNet,
    init_variables,
    variable_shapes,
)
from slr_jax.models.slrnet import build_model as build_slrnet


def build_model(model_cfg):
    """The network of ``config.model``: ``SLRNet`` (``arch`` 'slrnet') or ``DeepLabV3Plus``
    ('deeplab'); both take ``(B, H, W, 3)`` images and ``mode``/``train`` (docs/design.md)."""
    if model_cfg.arch == "deeplab":
        return build_deeplab(model_cfg)
    if model_cfg.arch != "slrnet":
        raise ValueError(f"model.arch must be 'slrnet' or 'deeplab', got {model_cfg.arch!r}")
    return build_slrnet(model_cfg)


__all__ = [
    "MODES",
    "SLRNet",
    "build_model",
    "build_slrnet",
    "check_tree_shapes",
    "init_variables",
    "variable_shapes",
]
