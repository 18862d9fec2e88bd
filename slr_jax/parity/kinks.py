"""ReLU kinks: the proof that a float32 gradient gap is rounding pushed across ReLU kinks.

A ReLU input within rounding of zero can land on the other side of the kink in another float32
implementation; its whole downstream gradient then switches on or off. A deep network has
many such inputs, so two correct float32 implementations can disagree on a gradient leaf by
far more than their rounding (measured: one backbone leaf 10x further from the float64 result
than PyTorch's own float32 gradient). The proof: run our float32 network with every ReLU's
on/off pattern taken from the float64 run of the same network (x64 on) and compare its
gradient with the float64 reference. If it then agrees to the usual tolerance, the gap was the
kinks and nothing else; the row also counts the inputs whose sign differs and how close to
zero they were.

The hook replaces ``flax.linen.relu`` while the models are traced (every ReLU of
``slr_jax.models`` is called as ``nn.relu``): a developer-tool device, never used in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slr_jax import convert
from slr_jax.losses import slrnet_objective


@contextlib.contextmanager
def relu_replaced(fn: Callable[[jax.Array], jax.Array]):
    """Within the block, ``nn.relu`` as the models call it is ``fn`` (restored after)."""
    original = nn.relu
    nn.relu = fn
    try:
        yield
    finally:
        nn.relu = original


def float64_relu_signs(model, variables, batch: dict) -> list[np.ndarray]:
    """``x > 0`` of every ReLU input, in call order, of the float64 training forward
    (``mode='train'``, deterministic) of ``model`` at ``variables`` on ``batch``."""
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64)
        as64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        images = jnp.asarray(batch["image"], jnp.float64)

        def signs_of(v, x):
            signs = []

            def recording_relu(y):
                signs.append(y > 0)
                return jnp.maximum(y, 0)

            with relu_replaced(recording_relu):
                model64.apply(v, x, mode="train", train=False)
            return signs

        return [np.asarray(s) for s in jax.jit(signs_of)(as64(dict(variables)), images)]


def forced_sign_gradients(model, variables, batch: dict, signs, loss_cfg, setting: str):
    """Our float32 gradient of the total without the code term, every ReLU switched by
    ``signs`` (``float64_relu_signs``) instead of its own input: ``(grads by reference
    parameter name, number of inputs whose own sign differs, max |input| among them)``."""
    c_code = float(loss_cfg.loss_coeff[2])

    def objective(params, batch_stats, batch_j, forced):
        it = iter(forced)
        flips = []

        def forced_relu(y):
            s = next(it)
            flips.append(((y > 0) != s, jnp.abs(y)))
            return jnp.where(s, y, jnp.zeros_like(y))

        with relu_replaced(forced_relu):
            outputs = model.apply({"params": params, "batch_stats": batch_stats},
                                  batch_j["image"], mode="train", train=False)  # fmt: skip
        _, terms, _ = slrnet_objective(
            outputs, batch_j, loss_cfg=loss_cfg, variant=setting, seg_weight=1.0
        )
        count = sum(jnp.sum(f) for f, _ in flips)
        worst = jnp.max(jnp.stack([jnp.max(jnp.where(f, a, 0)) for f, a in flips]))
        return terms["total"] - c_code * terms["code_consistency"], (count, worst)

    batch_j = {k: jnp.asarray(v) for k, v in batch.items()}
    grad_fn = jax.jit(jax.grad(objective, has_aux=True))
    grads, (count, worst) = grad_fn(
        variables["params"], variables["batch_stats"], batch_j, [jnp.asarray(s) for s in signs]
    )
    return convert.flax_to_torch({"params": grads}), int(count), float(worst)
