"""Gradients compared leaf by leaf: the reference's parameter names, the worst leaf as a row,
the float32 rounding allowance per leaf, and which leaves are trainable on each side."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slr_jax import convert
from slr_jax.optim import param_group_labels
from slr_jax.parity.report import Row, compare
from slr_jax.parity.settings import GRAD_TOL


def canonical_name(name: str) -> str:
    """The reference's module path for a parameter name that goes through one of its
    ModuleList aliases (``newly_added.6.x`` -> ``factorization_reconstruction.x``)."""
    for alias, target in convert.REFERENCE_ALIASES.items():
        if name.startswith(alias):
            return target + name[len(alias) :]
    return name


def _worst_leaf(name: str, ours: dict, theirs: dict, tols: dict | None = None) -> Row:
    """Relative L2 error per leaf of ``theirs`` (name -> array; ``ours`` has the same names);
    the row of the leaf with the largest error relative to its tolerance (``tols[leaf]``,
    default ``GRAD_TOL``), named after it."""
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise RuntimeError(f"trainable PyTorch parameters without a JAX gradient: {missing}")
    worst, n_zero = None, 0
    for leaf, expected in theirs.items():
        row = compare(leaf, ours[leaf], expected, (tols or {}).get(leaf, GRAD_TOL))
        n_zero += int(not np.any(expected) and not np.any(ours[leaf]))
        if worst is None or row.rel / row.tol > worst.rel / worst.tol:
            worst = row
    worst.note = f"worst of {len(theirs)} trainable leaves ({n_zero} zero in both)"
    worst.name = f"{name} [{worst.name}]"
    return worst


def _worst_grad_row(name: str, flax_grads, ref_grads: dict[str, np.ndarray]) -> Row:
    """Relative L2 error per trainable leaf (``ref_grads`` keys are canonical names); the
    row of the worst leaf, named."""
    return _worst_leaf(name, convert.flax_to_torch({"params": flax_grads}), ref_grads)


def rounding_tolerances(ref32: dict, ref64: dict) -> dict[str, float]:
    """Per leaf: max(GRAD_TOL, 2 x the float32 reference's own relative error against the
    float64 reference), the allowance of a float32 result that is as exact as PyTorch's."""
    return {
        leaf: max(GRAD_TOL, 2.0 * compare(leaf, ref32[leaf], exact, GRAD_TOL).rel)
        for leaf, exact in ref64.items()
    }


def _trainable_leaves_row(grads, ref_names) -> Row:
    """Whether JAX's trainable leaves (``slr_jax.optim``) are PyTorch's ``requires_grad`` ones
    (canonical ``ref_names``); max_abs and rel count the leaves trainable on one side only."""
    trainable = jax.tree_util.tree_map(
        lambda g, label: np.broadcast_to(label != "frozen", g.shape), grads,
        param_group_labels(grads),
    )  # fmt: skip
    ours = {k for k, v in convert.flax_to_torch({"params": trainable}).items() if v.all()}
    only = sorted(ours ^ set(ref_names))
    note = f"{len(ours)} trainable leaves in both" if not only else f"on one side only: {only}"
    return Row("grad/trainable_leaves (JAX vs PyTorch)", len(only), len(only), 0.0, note)


def _frozen_grad_norm(grads) -> float:
    labels = param_group_labels(grads)
    sq = jax.tree_util.tree_map(
        lambda g, lab: float(jnp.sum(g * g)) if lab == "frozen" else 0.0, grads, labels
    )
    return float(np.sqrt(sum(jax.tree_util.tree_leaves(sq))))
