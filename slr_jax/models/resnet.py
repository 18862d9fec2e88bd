"""ResNet-50/101 as torchvision builds it (v1.5 Bottleneck), in Flax linen (NHWC).

The backbone of the stage-2 DeepLabV3+ (``slr_jax.models.deeplab``). Architecture, padding and
dilation rules are torchvision's ``torchvision.models.resnet`` exactly:

- stem: ``conv1`` 7x7 stride 2 (padding 3) -> ``bn1`` -> ReLU -> 3x3 max pool stride 2
  (padding 1, padded with -inf as PyTorch does);
- ``layer1..layer4`` of ``Bottleneck`` blocks (1x1 -> 3x3 -> 1x1, expansion 4) with the stride
  on the 3x3 conv (torchvision's "ResNet v1.5"), and a ``downsample`` (1x1 conv with the stride,
  BatchNorm) on the first block of a stage whenever the stride or the channel count changes;
- ``replace_stride_with_dilation`` (one flag for each of layer2..layer4): a stage that replaces
  its stride keeps stride 1 and multiplies the running dilation by 2; its *first* block still
  uses the previous dilation, the others the new one (torchvision's ``_make_layer``). DeepLab's
  output stride 16 is ``(False, False, True)``, output stride 8 ``(False, True, True)``
  (:func:`dilation_for_output_stride`).

Module names equal torchvision's attribute paths, children of ``nn.Sequential`` named by their
index, so a state-dict key maps mechanically onto a Flax path (``slr_jax.convert``)::

  conv1.weight                      params/conv1/kernel            (O,I,kh,kw) -> (kh,kw,I,O)
  bn1.weight | bn1.bias             params/bn1/scale | bias
  bn1.running_mean | running_var    batch_stats/bn1/mean | var
  layer1.0.conv1.weight             params/layer1/0/conv1/kernel   (also conv2, conv3)
  layer1.0.bn1.*                    .../layer1/0/bn1/*             (also bn2, bn3)
  layer1.0.downsample.0.weight      params/layer1/0/downsample/0/kernel
  layer1.0.downsample.1.*           .../layer1/0/downsample/1/*
  fc.*                              (dropped: the ImageNet classifier is not built)
  *.num_batches_tracked             (dropped)

``width`` scales every channel count (1.0 = torchvision; tiny values for tests). BatchNorm:
PyTorch's momentum 0.1 and eps 1e-5; ``batch_norm_stats=True`` normalises with batch statistics
when ``train`` (PyTorch ``train()``), False keeps the running statistics always (a frozen
backbone, PyTorch ``eval()`` BatchNorm). ``dtype`` is the compute dtype; parameters are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slr_jax.models.backbone import scale_channels
from slr_jax.models.layers import BatchNorm, conv

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4


def dilation_for_output_stride(output_stride: int) -> tuple[bool, bool, bool]:
    """torchvision's ``replace_stride_with_dilation`` for output stride 32, 16 or 8."""
    table = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
    if output_stride not in table:
        raise ValueError(f"output_stride must be one of {sorted(table)}, got {output_stride}")
    return table[output_stride]


def torch_conv(features: int, kernel: int, **kwargs: Any) -> nn.Conv:
    """torchvision's bias-free conv, kernel drawn as its ``kaiming_normal_(mode='fan_out')``."""
    return conv(features, kernel, init="fan_out", **kwargs)


def resnet_batch_norm(
    train: bool, batch_stats: bool, dtype: Any, name: str, *, zero_scale: bool = False
) -> BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics only when ``train and batch_stats``."""
    return BatchNorm(
        use_running_average=not (train and batch_stats),
        dtype=dtype,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: ``x`` (B, H, W, Cin) -> (B, H/stride, W/stride, 4*planes).

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut)``; ``conv2`` carries
    the stride and the dilation; ``shortcut`` is ``downsample(x)`` when ``downsample``.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    batch_norm_stats: bool = True
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = lambda name, zero=False: resnet_batch_norm(
            train, self.batch_norm_stats, self.dtype, name, zero_scale=zero
        )
        y = nn.relu(bn("bn1")(torch_conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)))
        y = torch_conv(
            self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
            name="conv2",
        )(y)  # fmt: skip
        y = nn.relu(bn("bn2")(y))
        y = torch_conv(self.planes * EXPANSION, 1, dtype=self.dtype, name="conv3")(y)
        # torchvision's zero_init_residual zeroes bn3's scale: each block starts as its shortcut.
        y = bn("bn3", self.zero_init_residual)(y)
        shortcut = x
        if self.downsample:
            shortcut = _Downsample(
                self.planes * EXPANSION, self.stride, self.dtype, self.batch_norm_stats,
                name="downsample",
            )(x, train)  # fmt: skip
        return nn.relu(y + shortcut)


class _Downsample(nn.Module):
    """``Sequential(conv1x1 with stride, BatchNorm)``: children '0' and '1'."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    batch_norm_stats: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = torch_conv(self.features, 1, stride=self.stride, dtype=self.dtype, name="0")(x)
        return resnet_batch_norm(train, self.batch_norm_stats, self.dtype, "1")(x)


class _Stage(nn.Module):
    """One ``layerN`` (``nn.Sequential`` of Bottlenecks named '0', '1', ...)."""

    planes: int
    blocks: int
    stride: int
    first_dilation: int
    dilation: int
    dtype: Any = jnp.float32
    batch_norm_stats: bool = True
    zero_init_residual: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # Argument 0 is the module itself, 1 the input, 2 the static ``train`` flag.
        block = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        needs_downsample = self.stride != 1 or x.shape[-1] != self.planes * EXPANSION
        for i in range(self.blocks):
            x = block(
                self.planes,
                stride=self.stride if i == 0 else 1,
                dilation=self.first_dilation if i == 0 else self.dilation,
                downsample=needs_downsample and i == 0,
                dtype=self.dtype,
                batch_norm_stats=self.batch_norm_stats,
                zero_init_residual=self.zero_init_residual,
                name=str(i),
            )(x, train)
        return x


class ResNet(nn.Module):
    """torchvision ResNet (Bottleneck) without the classifier. ``images`` (B, H, W, 3)
    ImageNet-normalised -> ``{'layer1': (B, h4, w4, 256*width), 'layer2': ..., 'layer4':
    (B, h, w, 2048*width)}`` with h4 = ceil(H/4) and layer2..4 at strides 8, 16, 32 unless
    dilated (``replace_stride_with_dilation``).

    Attributes:
      layers: blocks per stage, ``RESNET_LAYERS[50]`` or ``RESNET_LAYERS[101]`` (the default).
      replace_stride_with_dilation: torchvision's flags for layer2, layer3, layer4.
      width: channel multiplier (1.0 = torchvision).
      dtype: compute dtype (parameters stay float32).
      batch_norm_stats: batch statistics in training (False: running statistics always).
      zero_init_residual: torchvision's option, bn3 scales start at zero (random init only).
      remat: rematerialise each block in the backward pass (saves activation memory).
    """

    layers: Sequence[int] = RESNET_LAYERS[101]
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    width: float = 1.0
    dtype: Any = jnp.float32
    batch_norm_stats: bool = True
    zero_init_residual: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if len(self.layers) != 4 or len(self.replace_stride_with_dilation) != 3:
            raise ValueError(
                f"ResNet needs 4 stage depths and 3 dilation flags, got layers={self.layers}, "
                f"replace_stride_with_dilation={self.replace_stride_with_dilation}"
            )
        c = scale_channels(64, self.width)
        x = torch_conv(c, 7, stride=2, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        x = resnet_batch_norm(train, self.batch_norm_stats, self.dtype, "bn1")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features, dilation = {}, 1
        for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, self.layers)):
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if i > 0 and self.replace_stride_with_dilation[i - 1]:
                dilation, stride = dilation * stride, 1
            x = _Stage(
                scale_channels(planes, self.width),
                blocks,
                stride,
                previous_dilation,
                dilation,
                self.dtype,
                self.batch_norm_stats,
                self.zero_init_residual,
                self.remat,
                name=f"layer{i + 1}",
            )(x, train)
            features[f"layer{i + 1}"] = x
        return features


def resnet_variable_shapes(layers: Sequence[int] = RESNET_LAYERS[101], width: float = 1.0) -> dict:
    """``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` leaves (nothing computed).

    Shapes do not depend on dilation or input size. Fresh containers on every call; the
    tracing behind them (~1 s for ResNet-101) happens once per (layers, width).
    """
    return jax.tree_util.tree_map(lambda s: s, _variable_shapes(tuple(layers), float(width)))


@functools.lru_cache(maxsize=8)
def _variable_shapes(layers: tuple[int, ...], width: float) -> dict:
    model = ResNet(layers=layers, width=width)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images))
