"""WideResNet38 ("resnet38d"), the SLRNet backbone, in Flax linen (NHWC).

Output stride 8. Pre-activation residual blocks (BatchNorm -> ReLU -> conv). As in the
reference, every BatchNorm of the backbone always normalises with its running statistics, in
training too, and its affine parameters are frozen (see ``slr_jax.optim``); the blocks
``conv1a``, ``b2``, ``b2_1`` and ``b2_2`` are frozen entirely. That suits an ImageNet
initialisation. Backbone pretraining on image labels (``slr_jax.pretrain``, the demo's
stand-in for ImageNet weights) trains it from random weights instead: ``batch_norm_stats=True``
normalises with batch statistics in training (running averages updated) and
``zero_init_residual=True`` starts the last convolution of every residual branch at zero
(each block starts as its shortcut; without it the backbone at width 1/8 does not learn the
demo's image labels from scratch).
``b6``/``b7`` apply channel dropout (PyTorch ``Dropout2d``) in training, from the
``'dropout'`` RNG stream (masks reported as in ``slr_jax.models.noise``).

Module names equal the reference's PyTorch attribute names, so converted state-dict keys map
one to one (``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slr_jax.models.layers import BatchNorm, conv, zero_outside
from slr_jax.models.noise import Dropout

# (name, block kind, in, mid, out, stride, first_dilation, dilation, dropout); channels at width 1.
RESNET38_BLOCKS = (
    ("b2", "basic", 64, 128, 128, 2, 1, 1, 0.0),
    ("b2_1", "basic", 128, 128, 128, 1, 1, 1, 0.0),
    ("b2_2", "basic", 128, 128, 128, 1, 1, 1, 0.0),
    ("b3", "basic", 128, 256, 256, 2, 1, 1, 0.0),
    ("b3_1", "basic", 256, 256, 256, 1, 1, 1, 0.0),
    ("b3_2", "basic", 256, 256, 256, 1, 1, 1, 0.0),
    ("b4", "basic", 256, 512, 512, 2, 1, 1, 0.0),
    ("b4_1", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_2", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_3", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_4", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_5", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b5", "basic", 512, 512, 1024, 1, 1, 2, 0.0),
    ("b5_1", "basic", 1024, 512, 1024, 1, 2, 2, 0.0),
    ("b5_2", "basic", 1024, 512, 1024, 1, 2, 2, 0.0),
    ("b6", "bottleneck", 1024, None, 2048, 1, 4, 4, 0.3),
    ("b7", "bottleneck", 2048, None, 4096, 1, 4, 4, 0.5),
)
CONV3_BLOCK = "b3_2"


def scale_channels(channels: int, width: float) -> int:
    """Channel count at a width multiplier (1.0 is the reference architecture)."""
    return max(1, int(round(channels * width)))


def backbone_batch_norm(dtype: Any, name: str, batch_stats: bool, train: bool) -> BatchNorm:
    """A backbone BatchNorm: running statistics always (PyTorch ``FixedBatchNorm2d``, the
    reference) unless ``batch_stats``, which uses batch statistics (momentum 0.1) when
    ``train``."""
    return BatchNorm(use_running_average=not (batch_stats and train), dtype=dtype, name=name)


class ResBlock(nn.Module):
    """Pre-activation basic block: bn_branch2a -> relu -> conv3x3 -> bn -> relu -> conv3x3.

    ``x`` (B, H, W, Cin) -> (B, H/stride, W/stride, Cout).
    """

    mid_channels: int
    out_channels: int
    stride: int = 1
    first_dilation: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    batch_norm_stats: bool = False
    zero_init_residual: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(output, relu(bn_branch2a(x)))``. ``valid``: the padded evaluation's valid
        cells of ``x`` (``layers.zero_outside``); the output's are ``valid[:, ::s, ::s]``."""
        bn = lambda name: backbone_batch_norm(self.dtype, name, self.batch_norm_stats, train)
        same_shape = x.shape[-1] == self.out_channels and self.stride == 1
        pre = zero_outside(nn.relu(bn("bn_branch2a")(x)), valid)
        if valid is not None:
            valid = valid[:, :: self.stride, :: self.stride]
        if same_shape:
            shortcut = x
        else:
            shortcut = conv(
                self.out_channels, 1, stride=self.stride, dtype=self.dtype, name="conv_branch1"
            )(pre)
        y = conv(
            self.mid_channels,
            3,
            stride=self.stride,
            dilation=self.first_dilation,
            dtype=self.dtype,
            name="conv_branch2a",
        )(pre)
        y = zero_outside(nn.relu(bn("bn_branch2b1")(y)), valid)
        y = conv(
            self.out_channels,
            3,
            dilation=self.dilation,
            dtype=self.dtype,
            init="zeros" if self.zero_init_residual else "fan_in",
            name="conv_branch2b1",
        )(y)
        return shortcut + y, pre


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck (1x1 -> dilated 3x3 -> 1x1) with channel dropout.

    ``x`` (B, H, W, Cin) -> (B, H, W, Cout); mid widths Cout/4 and Cout/2.
    """

    out_channels: int
    dilation: int = 1
    dropout: float = 0.0
    dtype: Any = jnp.float32
    batch_norm_stats: bool = False
    zero_init_residual: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(output, relu(bn_branch2a(x)))``; ``valid`` as ``ResBlock``'s."""
        bn = lambda name: backbone_batch_norm(self.dtype, name, self.batch_norm_stats, train)
        # Dropout2d zeroes whole channels: one draw per (example, channel).
        channel_dropout = Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)
        pre = nn.relu(bn("bn_branch2a")(x))
        shortcut = conv(self.out_channels, 1, dtype=self.dtype, name="conv_branch1")(pre)
        y = conv(max(1, self.out_channels // 4), 1, dtype=self.dtype, name="conv_branch2a")(pre)
        y = zero_outside(channel_dropout(nn.relu(bn("bn_branch2b1")(y))), valid)
        y = conv(
            max(1, self.out_channels // 2),
            3,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv_branch2b1",
        )(y)
        y = nn.relu(bn("bn_branch2b2")(y))
        y = channel_dropout(y)
        y = conv(
            self.out_channels,
            1,
            dtype=self.dtype,
            init="zeros" if self.zero_init_residual else "fan_in",
            name="conv_branch2b2",
        )(y)
        return shortcut + y, pre


class WideResNet38(nn.Module):
    """The backbone. ``images`` (B, H, W, 3) normalised -> dict of features:

    ``conv3`` (B, ceil(H/4), ceil(W/4), 256*width) and ``conv6`` (B, ceil(H/8), ceil(W/8),
    4096*width).
    """

    width: float = 1.0
    dtype: Any = jnp.float32
    remat: bool = False
    batch_norm_stats: bool = False
    zero_init_residual: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """``valid`` (bool, (B or 1, H, W, 1)): the padded evaluation's valid pixels of
        ``images`` (``SLRNet``); every convolution then reads zeros beyond the valid cells of its
        level, as its zero padding gives the unpadded image; features beyond them are garbage."""
        ch = lambda c: scale_channels(c, self.width)
        basic: Callable[..., nn.Module] = ResBlock
        bottleneck: Callable[..., nn.Module] = BottleneckBlock
        if self.remat:
            # Argument 0 is the module itself, 1 the input, 2 the static ``train`` flag.
            basic = nn.remat(ResBlock, static_argnums=(2,))
            bottleneck = nn.remat(BottleneckBlock, static_argnums=(2,))
        images = zero_outside(images.astype(self.dtype), valid)
        x = conv(ch(64), 3, dtype=self.dtype, name="conv1a")(images)
        features = {}
        for name, kind, _, mid, out, stride, first_dil, dil, drop in RESNET38_BLOCKS:
            if kind == "basic":
                block = basic(
                    ch(mid),
                    ch(out),
                    stride,
                    first_dil,
                    dil,
                    self.dtype,
                    self.batch_norm_stats,
                    self.zero_init_residual,
                    name=name,
                )
            else:
                block = bottleneck(
                    ch(out),
                    dil,
                    drop,
                    self.dtype,
                    self.batch_norm_stats,
                    self.zero_init_residual,
                    name=name,
                )
            if valid is None:
                x, _ = block(x, train)
            else:
                x, _ = block(x, train, valid)
                valid = valid[:, ::stride, ::stride]
            if name == CONV3_BLOCK:
                features["conv3"] = x
        bn7 = backbone_batch_norm(self.dtype, "bn7", self.batch_norm_stats, train)
        features["conv6"] = nn.relu(bn7(x))
        return features
