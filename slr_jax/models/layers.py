"""PyTorch-equivalent building blocks shared by every network here (NHWC).

``compute_dtype``: the model's computation dtype from its config name. ``conv``: ``nn.Conv``
with PyTorch's symmetric zero padding, leaving out the kernel taps that would read only padding
(``conv_without_padding_taps``). ``BatchNorm``: PyTorch's
``BatchNorm2d`` semantics, including its running-variance update (see the class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slr_jax.constants import COMPUTE_DTYPES

BN_EPS = 1e-5

# Kernel initialisers by name: the reference's He-normal (fan_in), torchvision's ResNet
# kaiming_normal_(mode='fan_out'), and zeros (zero-initialised residual branches).
KERNEL_INITS = {
    "fan_in": nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
    "fan_out": nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    "zeros": nn.initializers.zeros,
}


def compute_dtype(name: str) -> Any:
    """``config.model.dtype`` (one of ``COMPUTE_DTYPES``) as a JAX dtype; float64 needs x64."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment "
            "(or jax.config.update('jax_enable_x64', True) before any JAX call)"
        )
    return jnp.dtype(name)


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    init: str = "fan_in",
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-style conv: zero padding ``dilation * (kernel // 2)`` on every side; the
    kernel drawn by ``KERNEL_INITS[init]``."""
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=KERNEL_INITS[init],
        conv_general_dilated=conv_without_padding_taps,
        name=name,
    )


def conv_without_padding_taps(lhs, rhs, window_strides, padding, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, explicit padding) that leaves out every kernel
    row or column whose taps read only zero padding, for all outputs.

    A dilated 3x3 conv whose dilation reaches past the feature map (the ASPP's rates 12-36 on
    a 6-21 px grid of deep features) multiplies eight of its nine taps by padding alone: the
    result is the same with the centre tap only, for a ninth of the FLOPs, and the weight
    gradient of the dropped taps is zero either way. The kernel is sliced, so parameters and
    their gradients keep their full shape; anything else (input dilation, string padding)
    goes to ``lax.conv_general_dilated`` unchanged.
    """
    conv = jax.lax.conv_general_dilated
    spatial = tuple(range(1, lhs.ndim - 1))
    channels_last = jax.lax.ConvDimensionNumbers(
        (0, lhs.ndim - 1, *spatial), (lhs.ndim - 1, lhs.ndim - 2, *range(lhs.ndim - 2)),
        (0, lhs.ndim - 1, *spatial),
    )  # fmt: skip
    if (
        isinstance(padding, str)
        or kwargs.get("dimension_numbers") != channels_last
        or any(d != 1 for d in kwargs.get("lhs_dilation") or ())
    ):
        return conv(lhs, rhs, window_strides, padding, **kwargs)
    rhs_dilation = kwargs.get("rhs_dilation") or (1,) * len(spatial)
    keep, new_padding = [], []
    for n, k, d, s, (lo, hi) in zip(
        lhs.shape[1:-1], rhs.shape[:-2], rhs_dilation, window_strides, padding
    ):
        out = (n + lo + hi - (k - 1) * d - 1) // s + 1
        # Tap i reads input rows i*d - lo ... (out-1)*s + i*d - lo; live if any is in [0, n).
        live = [i for i in range(k) if i * d - lo < n and (out - 1) * s + i * d - lo >= 0]
        first, last = (live[0], live[-1]) if live else (0, k - 1)
        lo2, hi2 = lo - first * d, hi - (k - 1 - last) * d
        if lo2 < 0 or hi2 < 0:
            first, last, lo2, hi2 = 0, k - 1, lo, hi
        keep.append(slice(first, last + 1))
        new_padding.append((lo2, hi2))
    return conv(lhs, rhs[tuple(keep)], window_strides, new_padding, **kwargs)


class BatchNorm(nn.Module):
    """PyTorch ``BatchNorm2d`` over the last axis: (..., C) -> (..., C) in ``dtype``.

    Written here rather than taken from ``nn.BatchNorm`` for two PyTorch behaviours Flax does
    not have: the running variance is updated with the *unbiased* batch variance
    (``n / (n - 1)``, n = elements per channel), which is what the reference's trainable head
    BatchNorms then normalise with at evaluation; and the batch variance is computed in two
    passes (mean, then mean squared deviation), never as ``E[x^2] - E[x]^2``. Statistics and
    normalisation run in at least float32 (float64 when ``x`` is float64). Variables keep
    Flax's names (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), so
    checkpoints and the weight conversion are unchanged.

    Attributes:
      use_running_average: normalise with the running statistics (PyTorch ``eval()`` or a
        frozen BatchNorm) instead of the batch's.
      momentum: PyTorch's momentum, the weight of the new batch statistic (0.1 by default).
      stat_groups: in training, split the batch (axis 0) into this many equal groups of
        consecutive examples and normalise each with its own statistics, the running ones
        updated from the first group's: what ``nn.DataParallel`` does on ``stat_groups`` GPUs
        (each replica normalises its share; replica 0's buffers are the module's). 1: the
        whole batch (one GPU, or SyncBatchNorm). Independent of how many devices run it.
    """

    use_running_average: bool
    momentum: float = 0.1
    epsilon: float = BN_EPS
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    stat_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        xs = x.astype(stat_dtype)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        elif self.stat_groups > 1:
            return self._grouped(xs, running_mean, running_var).astype(self.dtype)
        else:
            mean, var = self._batch_statistics(xs, tuple(range(x.ndim - 1)), keepdims=False)
            self._update_running(running_mean, running_var, mean, var, x.size // channels)
        return self._normalise(xs, mean, var).astype(self.dtype)

    @staticmethod
    def _batch_statistics(xs: jax.Array, axes: tuple[int, ...], keepdims: bool):
        """Mean and biased variance over ``axes``, in two passes (mean, then squared deviation)."""
        mean = jnp.mean(xs, axis=axes, keepdims=keepdims)
        return mean, jnp.mean(jnp.square(xs - mean), axis=axes, keepdims=keepdims)

    def _update_running(self, running_mean, running_var, mean, var, count: int) -> None:
        if self.is_initializing():
            return
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * unbiased

    def _grouped(self, xs: jax.Array, running_mean, running_var) -> jax.Array:
        """(N, ..., C) normalised per group of N / stat_groups consecutive examples."""
        groups, channels = self.stat_groups, xs.shape[-1]
        if xs.shape[0] % groups:
            raise ValueError(
                f"BatchNorm stat_groups={groups} does not divide the batch of {xs.shape[0]}"
            )
        grouped = xs.reshape((groups, xs.shape[0] // groups) + xs.shape[1:])
        mean, var = self._batch_statistics(
            grouped, tuple(range(1, grouped.ndim - 1)), keepdims=True
        )
        count = grouped[0].size // channels
        self._update_running(
            running_mean, running_var, mean[0].reshape(-1), var[0].reshape(-1), count
        )
        return self._normalise(grouped, mean, var).reshape(xs.shape)

    def _normalise(self, xs: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        channels = xs.shape[-1]
        mul = jax.lax.rsqrt(var.astype(xs.dtype) + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", self.scale_init, (channels,), jnp.float32)
        y = (xs - mean.astype(xs.dtype)) * mul
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return y


def zero_outside(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``x`` (B, H, W, C) with every cell outside ``valid`` (bool, broadcastable, e.g.
    (1, H, W, 1)) set to 0; ``x`` itself when ``valid`` is None.

    The padded evaluation (``SLRNet(..., valid=...)``) applies it to every input a convolution
    reads neighbours from, so that beyond the valid region a convolution sees the zeros its own
    zero padding would give the unpadded input. ``jnp.where``, not a product: exact, and
    whatever the padded cells hold (even inf) cannot leak.
    """
    if valid is None:
        return x
    return jnp.where(valid, x, jnp.zeros((), x.dtype))
