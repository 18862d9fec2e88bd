"""The cross-view low-rank module: dictionary initialisation and unrolled factorisation.

Features of one or more views are flattened to pixels, concatenated along the pixel axis and
factorised together against a dictionary of K atoms (one per class, background included):

    X' = transform1(X)                                  (B, N, D)
    D  = l2norm(transform1(D0))                         (B, K, D)
    repeat num_iters times:
        codes = softmax_K(D X'^T / temperature)         (B, K, N)
        attn  = normalise_N(codes + eps)
        D     = l2norm(attn X')
    out = relu(X + transform2(relu(codes^T D)))         (B, N, D)

The codes returned are those of the last iteration (computed before its dictionary update);
the reconstruction uses the updated dictionary. ``num_iters`` is static, so the loop is
unrolled under ``jit`` and gradients flow through every iteration as in the reference.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

L2_EPS = 1e-6
ATTN_EPS = 1e-6
DICT_INIT_EPS = 1e-6


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
    """``x / (eps + ||x||)`` along ``axis`` (eps added to the norm, as in the reference)."""
    return x / (eps + jnp.linalg.norm(x, axis=axis, keepdims=True))


def initial_dictionary(
    features: jax.Array, class_logits: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Class-prototype dictionary (B, K, D) from features (B, h, w, D) and logits (B, h, w, K).

    Each atom is the feature average weighted by that class's softmax probability
    (normalised over pixels, ``+1e-6``). No gradient flows into it: the reference detaches.
    ``valid`` (bool, (B or 1, h, w, 1)): only those pixels count (the padded evaluation).
    """
    b, h, w, d = features.shape
    k = class_logits.shape[-1]
    probs = jax.nn.softmax(jax.lax.stop_gradient(class_logits).reshape(b, h * w, k), axis=-1)
    if valid is not None:
        flat = valid.reshape(valid.shape[0], h * w, 1)
        probs, features = jnp.where(flat, probs, 0.0), jnp.where(valid, features, 0.0)
    probs = probs / (jnp.sum(probs, axis=1, keepdims=True) + DICT_INIT_EPS)
    atoms = jnp.einsum("bnk,bnd->bkd", probs, features.reshape(b, h * w, d))
    return jax.lax.stop_gradient(atoms)


def torch_linear_init(fan_in: int) -> dict[str, Any]:
    """``kernel_init``/``bias_init`` of PyTorch's ``nn.Linear`` default, which the reference
    keeps for ``transform1``/``transform2``: both uniform in +-1/sqrt(fan_in) (Flax's default is
    a LeCun-normal kernel, sqrt(3) times wider, and a zero bias)."""
    bound = 1.0 / float(fan_in) ** 0.5

    def bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return {
        "kernel_init": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        "bias_init": bias_init,
    }


class FactorizationReconstruction(nn.Module):
    """``x`` (B, N, D) and initial dictionary (B, K, D) -> (reconstruction (B, N, D),
    codes (B, K, N), dictionary (B, K, D)); codes and dictionary in float32 (float64 for a
    float64 ``dtype``). ``valid`` (bool, (B or 1, N, 1)): only those pixels enter the
    dictionary updates (the padded evaluation)."""

    num_iters: int = 1
    temperature: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, dictionary_init: jax.Array, valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.num_iters < 1:
            raise ValueError(f"num_iters must be >= 1, got {self.num_iters}")
        d = x.shape[-1]
        transform1 = nn.Dense(d, dtype=self.dtype, name="transform1", **torch_linear_init(d))
        transform2 = nn.Dense(d, dtype=self.dtype, name="transform2", **torch_linear_init(d))
        # The projections run in ``dtype``; codes, softmax and normalisations in float32 (in
        # bfloat16 the ~1/K codes would be quantised to a few levels and their argmax tie).
        exact = jnp.promote_types(self.dtype, jnp.float32)
        projected = transform1(x).astype(exact)
        if valid is not None:
            projected = jnp.where(valid, projected, 0.0)
        dictionary = l2_normalize(transform1(dictionary_init).astype(exact))
        codes = None
        for _ in range(self.num_iters):
            dots = jnp.einsum("bkd,bnd->bkn", dictionary, projected) * (1.0 / self.temperature)
            codes = jax.nn.softmax(dots, axis=1)
            attn = codes + ATTN_EPS
            if valid is not None:
                attn = jnp.where(jnp.swapaxes(valid, 1, 2), attn, 0.0)
            attn = attn / jnp.sum(attn, axis=-1, keepdims=True)
            dictionary = l2_normalize(jnp.einsum("bkn,bnd->bkd", attn, projected))
        recon = nn.relu(jnp.einsum("bkn,bkd->bnd", codes, dictionary))
        out = nn.relu(x + transform2(recon))
        return out, codes, dictionary
