"""SLRNet heads on top of the backbone (NHWC): ASPP, decoder, GCI, stochastic gate, classifiers.

Child modules of PyTorch ``nn.Sequential`` containers are named by their index ('0', '1', ...)
so that Flax parameter paths equal the reference's state-dict keys.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slr_jax.models.backbone import scale_channels
from slr_jax.models.layers import BatchNorm, conv, zero_outside
from slr_jax.models.noise import Dropout, keep_probability

# The reference's head BatchNorm momentum (PyTorch convention: weight of the batch statistic).
HEAD_BN_MOMENTUM = 0.05
GATE_ALPHA = 0.3


def head_batch_norm(
    train: bool, dtype: Any, name: str, *, affine: bool = True, frozen_stats: bool = False,
    stat_groups: int = 1,
) -> BatchNorm:  # fmt: skip
    """A head BatchNorm: batch statistics in training unless ``frozen_stats`` (ASPP), over
    ``stat_groups`` groups of the batch (``layers.BatchNorm``)."""
    return BatchNorm(
        use_running_average=frozen_stats or not train,
        momentum=HEAD_BN_MOMENTUM,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        stat_groups=stat_groups,
        name=name,
    )


class ConvBNReLU(nn.Module):
    """``Sequential(conv (no bias), BatchNorm, ReLU)`` with children '0' and '1'."""

    features: int
    kernel: int = 1
    dilation: int = 1
    affine: bool = True
    relu: bool = True
    frozen_stats: bool = False
    dtype: Any = jnp.float32
    bn_stat_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.features, self.kernel, dilation=self.dilation, dtype=self.dtype, name="0")(x)
        x = head_batch_norm(
            train, self.dtype, "1", affine=self.affine, frozen_stats=self.frozen_stats,
            stat_groups=self.bn_stat_groups,
        )(x)  # fmt: skip
        return nn.relu(x) if self.relu else x


class ASPPBranch(nn.Module):
    """One atrous branch: ``atrous_conv`` -> ``bn`` (running statistics) -> ReLU."""

    features: int
    kernel: int
    dilation: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.features, self.kernel, dilation=self.dilation, dtype=self.dtype,
                 name="atrous_conv")(x)  # fmt: skip
        x = head_batch_norm(train, self.dtype, "bn", frozen_stats=True)(x)
        return nn.relu(x)


class ASPP(nn.Module):
    """ASPP at output stride 8: dilations 1, 12, 24, 36 plus image pooling, fused to 256.

    Its BatchNorms keep running statistics frozen (affine parameters train), as in the
    reference. ``x`` (B, h, w, Cin) -> (B, h, w, 256*width). ``valid`` (bool, (B or 1, h, w,
    1)): the padded evaluation's valid cells; the convolutions read zeros beyond them and the
    image pooling averages over them only.
    """

    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> jax.Array:
        c = scale_channels(256, self.width)
        x = zero_outside(x, valid)
        branches = [
            ASPPBranch(c, 1, 1, self.dtype, name="aspp1")(x, train),
            ASPPBranch(c, 3, 12, self.dtype, name="aspp2")(x, train),
            ASPPBranch(c, 3, 24, self.dtype, name="aspp3")(x, train),
            ASPPBranch(c, 3, 36, self.dtype, name="aspp4")(x, train),
        ]
        pooled = _GlobalPool(c, self.dtype, name="global_avg_pool")(x, train, valid)
        # Bilinear upsampling of a 1x1 map is a broadcast.
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        y = jnp.concatenate(branches, axis=-1)
        y = conv(c, 1, dtype=self.dtype, name="conv1")(y)
        y = nn.relu(head_batch_norm(train, self.dtype, "bn1", frozen_stats=True)(y))
        return Dropout(0.5, deterministic=not train)(y)


class _GlobalPool(nn.Module):
    """``Sequential(AdaptiveAvgPool2d(1), conv1x1, BN, ReLU)``: children '1' and '2'."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> jax.Array:
        x = spatial_mean(x, valid)
        x = conv(self.features, 1, dtype=self.dtype, name="1")(x)
        x = head_batch_norm(train, self.dtype, "2", frozen_stats=True)(x)
        return nn.relu(x)


def spatial_mean(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """(B, h, w, C) -> (B, 1, 1, C): the mean over the cells of ``valid`` (all when None)."""
    if valid is None:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    count = jnp.sum(valid, axis=(1, 2), keepdims=True, dtype=x.dtype)
    return jnp.sum(zero_outside(x, valid), axis=(1, 2), keepdims=True) / count


class GCI(nn.Module):
    """Global cue injection: AdaIN-style modulation of shallow features by deep features.

    ``shallow`` (B, h, w, 256w) conv3 features, ``deep`` (B, h, w, 256w) decoder features ->
    (B, h, w, 256w): ``fc_cls(relu(fc_skip(shallow) * (1 + gamma) + beta))`` where
    ``(gamma, beta)`` is the spatial max of ``fc_deep(deep)`` (over the ``valid`` cells only,
    bool (B or 1, h, w, 1), in the padded evaluation).
    """

    width: float = 1.0
    dtype: Any = jnp.float32
    bn_stat_groups: int = 1

    @nn.compact
    def __call__(
        self, shallow: jax.Array, deep: jax.Array, train: bool = False,
        valid: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        c = scale_channels(256, self.width)
        block = functools.partial(ConvBNReLU, dtype=self.dtype, bn_stat_groups=self.bn_stat_groups)
        deep = block(2 * c, name="fc_deep")(deep, train)
        if valid is not None:
            deep = jnp.where(valid, deep, jnp.array(-jnp.inf, deep.dtype))
        b, h, w, c2 = deep.shape
        attrs = max_to_argmax(deep.reshape(b, h * w, c2), axis=1).reshape(b, 1, 1, c2)
        gamma, beta = attrs[..., :c], attrs[..., c:]
        skip = block(c, affine=False, relu=False, name="fc_skip")(shallow, train)
        x = nn.relu(skip * (gamma + 1) + beta)
        return block(c, name="fc_cls")(x, train)


def max_to_argmax(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.max(x, axis, keepdims=True)`` whose gradient goes to one arg-max entry, as PyTorch's
    ``max(dim)`` does. ``jnp.max`` finds the entries to credit by comparing ``x`` with the max
    for equality, which can fail under ``jit`` when XLA recomputes ``x`` inside another fusion
    with other rounding: measured on CPU after a training-mode BatchNorm, the GCI's ``fc_deep``
    gradients were 7-50% off while the forward agreed to 1e-7."""
    index = jnp.argmax(jax.lax.stop_gradient(x), axis=axis, keepdims=True)
    return jnp.take_along_axis(x, index, axis=axis)


def stochastic_gate(
    deep: jax.Array, shallow: jax.Array, *, train: bool, rng: jax.Array | None,
    alpha: float = GATE_ALPHA, keep: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """Mixes deep and shallow features (same shape).

    Evaluation: ``(1 - alpha) * deep + alpha * shallow``. Training: per element, keep the
    rescaled deep feature ``(deep - alpha*shallow)/(1 - alpha)`` with probability 1 - alpha,
    else the shallow one, so the expectation equals the evaluation mix. ``keep``: the training
    mask (bool, ``deep``'s shape) if already drawn, else it is drawn from ``rng``.
    """
    if not train:
        return (1 - alpha) * deep + alpha * shallow
    if keep is None:
        keep = gate_keep_mask(rng, deep.shape, alpha)
    keep = keep.astype(deep.dtype)
    rescaled = (deep - alpha * shallow) / max(1e-8, 1 - alpha)
    return keep * rescaled + (1 - keep) * shallow


def gate_keep_mask(rng: jax.Array, shape: tuple[int, ...], alpha: float = GATE_ALPHA) -> jax.Array:
    """The stochastic gate's training mask: True (keep the deep feature) w.p. 1 - alpha."""
    return jax.random.bernoulli(rng, keep_probability(alpha), shape)


class LastConv(nn.Module):
    """Main segmentation head: two 3x3 conv-BN-ReLU-dropout stages and a 1x1 classifier.

    (B, h, w, 256w) -> (B, h, w, out_channels). Children '0','1','4','5','8' as in PyTorch.
    ``valid``: the padded evaluation's valid cells (the 3x3 convolutions read zeros beyond).
    """

    out_channels: int
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_stat_groups: int = 1

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> jax.Array:
        c = scale_channels(256, self.width)
        x = conv(c, 3, dtype=self.dtype, name="0")(zero_outside(x, valid))
        x = nn.relu(head_batch_norm(train, self.dtype, "1", stat_groups=self.bn_stat_groups)(x))
        x = Dropout(0.5, deterministic=not train)(x)
        x = conv(c, 3, dtype=self.dtype, name="4")(zero_outside(x, valid))
        x = nn.relu(head_batch_norm(train, self.dtype, "5", stat_groups=self.bn_stat_groups)(x))
        x = Dropout(0.1, deterministic=not train)(x)
        return conv(self.out_channels, 1, use_bias=True, dtype=self.dtype, name="8")(x)


class AuxHead(nn.Module):
    """Auxiliary head: 3x3 conv-BN-ReLU-dropout and a 1x1 classifier (children '0','1','4')."""

    out_channels: int
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_stat_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = scale_channels(256, self.width)
        x = conv(c, 3, dtype=self.dtype, name="0")(x)
        x = nn.relu(head_batch_norm(train, self.dtype, "1", stat_groups=self.bn_stat_groups)(x))
        x = Dropout(0.5, deterministic=not train)(x)
        return conv(self.out_channels, 1, use_bias=True, dtype=self.dtype, name="4")(x)


def with_background(logits_fg: jax.Array, kind: str) -> jax.Array:
    """Prepends a background logit to foreground logits (B, h, w, C-1) -> (B, h, w, C).

    ``kind='constant'``: background logit 1 (main head). ``kind='one_minus_max'``:
    ``1 - max(foreground)`` (aux head). ``kind='none'``: logits returned unchanged (the
    semi-supervised variant without image labels predicts background itself).
    """
    if kind == "none":
        return logits_fg
    if kind == "constant":
        bg = jnp.ones_like(logits_fg[..., :1])
    elif kind == "one_minus_max":
        bg = 1 - max_to_argmax(logits_fg, axis=-1)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return jnp.concatenate([bg, logits_fg], axis=-1)


def focal_penalty(mean_mask: jax.Array, power: float = 3.0, offset: float = 0.01) -> jax.Array:
    """``(1 - m)^power * log(offset + m)`` for mean mask values ``m``."""
    return jnp.power(1 - mean_mask, power) * jnp.log(offset + mean_mask)


def mask_pooled_scores(
    logits: jax.Array, masks: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Class scores from logits and softmax masks, both (B, h, w, C) -> (B, C-1).

    Mask-weighted pooling ``sum(x*m) / (1 + sum(m))`` plus the focal penalty of the mean mask;
    the background column is dropped. ``valid`` (bool, (B or 1, h, w, 1)): pool over those
    cells only (the padded evaluation).
    """
    if valid is not None:
        logits, masks = zero_outside(logits, valid), zero_outside(masks, valid)
    pooled = jnp.sum(logits * masks, axis=(1, 2)) / (1.0 + jnp.sum(masks, axis=(1, 2)))
    if valid is None:
        mean = jnp.mean(masks, axis=(1, 2))
    else:
        mean = jnp.sum(masks, axis=(1, 2)) / jnp.sum(valid, axis=(1, 2), dtype=masks.dtype)
    scores = pooled + focal_penalty(mean)
    return scores[:, 1:]
