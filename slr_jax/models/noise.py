"""The random masks of SLRNet's training forward, reported to callers that ask for them.

Training (``train=True``) draws three kinds of masks from the ``'dropout'`` RNG stream: the
dropouts of the heads, the channel dropout (PyTorch ``Dropout2d``) of backbone ``b6``/``b7``,
and the stochastic gate's element-wise choice. Each draw is also *sown* into the ``'noise'``
collection (``NOISE``) as a boolean keep mask, one tuple entry per call in call order (a
module that runs on both views, or twice in one block, holds several). Sowing is a no-op
unless the caller makes the collection mutable, so training is unchanged by it::

  outputs, state = model.apply(variables, images, mode='train', train=True,
                               rngs={'dropout': key}, mutable=['batch_stats', 'noise'])
  state['noise']  # {'gate': (view 1, view 2), 'aspp': {'Dropout_0': {'keep': (...)}}, ...}

The draws depend only on the key, the module path and the shapes (not on ``jax_enable_x64``
or the model's dtype), so a forward with the key a
train step uses (``jax.random.fold_in(rng, step)``) reports exactly the masks of that step.
``slr_jax.parity.trajectory`` feeds them to the PyTorch reference, whose own draws it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NOISE = "noise"


def keep_probability(rate: float) -> np.float32:
    """1 - rate as a float32 scalar: ``jax.random.bernoulli`` draws uniforms in the dtype of its
    probability, so the masks are the same with ``jax_enable_x64`` on or off."""
    return np.float32(1.0 - rate)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same draws, same outputs) that reports its keep mask.

    The mask has the input's shape with ``broadcast_dims`` set to 1 (``(1, 2)`` on NHWC is
    channel dropout) and is sown as ``keep``. ``x`` any shape -> same shape.
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        shape = list(x.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        keep = jax.random.bernoulli(
            self.make_rng("dropout"), p=keep_probability(self.rate), shape=shape
        )
        self.sow(NOISE, "keep", keep)
        return jax.lax.select(jnp.broadcast_to(keep, x.shape), x / keep_prob, jnp.zeros_like(x))
