"""Whether a tree of variables fits a model: leaf paths and shapes against those expected.

Used where variables meet a network built elsewhere: a checkpoint loaded onto a model
(``slr_jax.checkpoint``) and a converted backbone put into DeepLabV3+ (``deeplab.with_backbone``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from slr_jax.errors import CheckpointError


def check_tree_shapes(
    expected: Any, actual: Any, what: str = "checkpoint", shown: int = 12
) -> None:
    """Raises one CheckpointError counting the missing, unexpected and wrong-shaped leaves and
    listing the first ``shown`` of them."""
    exp = {jax.tree_util.keystr(k): _shape(v) for k, v in _flatten(expected)}
    got = {jax.tree_util.keystr(k): _shape(v) for k, v in _flatten(actual)}
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    wrong = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"  missing: {k} {exp[k]}" for k in missing]
        lines += [f"  unexpected: {k} {got[k]}" for k in unexpected]
        lines += [f"  wrong shape: {k} expected {exp[k]}, got {got[k]}" for k in wrong]
        head = (
            f"{what} does not fit the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong-shaped leaves):"
        )
        more = [f"  ... and {len(lines) - shown} more"] if len(lines) > shown else []
        raise CheckpointError("\n".join([head, *lines[:shown], *more]))


def _shape(leaf: Any) -> tuple:
    """A leaf's shape: arrays, ShapeDtypeStructs and Orbax's stored-array metadata."""
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else np.shape(leaf)


def _flatten(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree)[0]
