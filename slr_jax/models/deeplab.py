"""DeepLabV3+ with a torchvision ResNet backbone, the fully supervised stage-2 model (NHWC).

SLRNet's two-stage result trains this network on SLRNet's pseudo labels. The head is the
common PyTorch DeepLabV3+ (github.com/jfzhang95/pytorch-deeplab-xception, whose module names
are kept so its checkpoints map onto these paths too):

- ``backbone``: :class:`slr_jax.models.resnet.ResNet`, output stride 16 or 8 by torchvision's
  ``replace_stride_with_dilation``; ``layer1`` (stride 4) is the low-level feature.
- ``aspp``: ``aspp1`` 1x1 and ``aspp2..4`` 3x3 convs at rates 6/12/18 (output stride 16) or
  12/24/36 (output stride 8), each conv-BN-ReLU; ``global_avg_pool`` (image pooling:
  mean -> 1x1 conv -> BN -> ReLU, broadcast back); concatenated (5 x 256), ``conv1`` 1x1 to
  256, ``bn1``, ReLU, dropout 0.5.
- ``decoder``: ``conv1``/``bn1`` reduce ``layer1`` to 48 channels (+ReLU); the ASPP output is
  resized (align-corners bilinear) to the stride-4 grid and concatenated *before* them (304
  channels); ``last_conv`` = 3x3 conv-BN-ReLU (256), dropout 0.5, 3x3 conv-BN-ReLU (256),
  dropout 0.1, 1x1 classifier with bias (children '0','1','4','5','8' as in PyTorch).
- the stride-4 logits are resized (align-corners) to the input size.

Every convolution of the head is bias-free except the classifier; head BatchNorms use batch
statistics in training (PyTorch momentum 0.1). Under ``jit`` with a batch sharded over devices
the batch statistics are those of the global batch (PyTorch's SyncBatchNorm), with no
``axis_name``; their running variances take the unbiased batch variance, as PyTorch's do
(``slr_jax.models.layers.BatchNorm``).

Call convention, as SLRNet's (``docs/design.md``)::

  outputs = model.apply(variables, images, train=False)            # evaluation
  outputs, updates = model.apply(variables, images, train=True, rngs={'dropout': key},
                                 mutable=['batch_stats'])           # training

``images`` (B, H, W, 3) ImageNet-normalised. ``outputs``: ``logits`` (B, H, W, C) float32 at the
input size (the training loss is the pixel-wise cross entropy of these, as in the PyTorch
recipe), ``masks`` = softmax(logits) (B, H, W, C), and ``cls`` (B, C-1) of ones. ``masks`` and
``cls`` make the network a drop-in for SLRNet's inference: ``slr_jax.infer.multiscale_predict(
model.apply, variables, image, ...)`` calls ``apply(variables, views, mode='test')``, averages
``masks`` (probabilities) over scales and flips, and the ones stand for "no class scores",
exactly as SLRNet's ``semi_wo_cls`` variant, so inference must run with that variant's settings
(no class filtering, no background power). ``mode`` is accepted for that reason only; the
output does not depend on it. The logits are computed on the stride-4 grid cell i = input
pixel 4i for inputs of size 4k+1, so ``mask_stride=4`` size buckets apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from slr_jax.models.backbone import scale_channels
from slr_jax.models.layers import BatchNorm, compute_dtype, conv
from slr_jax.models.resnet import RESNET_LAYERS, ResNet, dilation_for_output_stride
from slr_jax.models.shapes import check_tree_shapes
from slr_jax.ops import resize_bilinear_align_corners

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
MODES = ("test", "train")
# Keys of ``config.model`` that ``build_deeplab`` reads (see ``deeplab_model_config``).
CONFIG_KEYS = (
    "num_classes",
    "depth",
    "output_stride",
    "width",
    "dtype",
    "remat",
    "train_backbone_norm",
    "aspp_dropout",
    "decoder_dropout",
)


def _batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
    """A head BatchNorm: batch statistics in training, PyTorch's momentum 0.1."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class ASPPModule(nn.Module):
    """``atrous_conv`` (bias-free, dilated) -> ``bn`` -> ReLU: (B, h, w, Cin) -> (B, h, w, F)."""

    features: int
    kernel: int
    dilation: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(
            self.features, self.kernel, dilation=self.dilation, dtype=self.dtype,
            name="atrous_conv",
        )(x)  # fmt: skip
        return nn.relu(_batch_norm(train, self.dtype, "bn")(x))


class ImagePooling(nn.Module):
    """``Sequential(AdaptiveAvgPool2d(1), conv1x1, BN, ReLU)``: children '1' and '2'.

    (B, h, w, Cin) -> (B, 1, 1, F).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
        x = conv(self.features, 1, dtype=self.dtype, name="1")(x)
        return nn.relu(_batch_norm(train, self.dtype, "2")(x))


class DeepLabASPP(nn.Module):
    """ASPP of DeepLabV3+: (B, h, w, Cin) -> (B, h, w, 256*width).

    ``rates`` are the dilations of the three 3x3 branches (``ASPP_RATES[output_stride]``).
    """

    rates: Sequence[int] = ASPP_RATES[16]
    width: float = 1.0
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = scale_channels(256, self.width)
        branches = [ASPPModule(c, 1, 1, self.dtype, name="aspp1")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(ASPPModule(c, 3, rate, self.dtype, name=f"aspp{i + 2}")(x, train))
        pooled = ImagePooling(c, self.dtype, name="global_avg_pool")(x, train)
        # PyTorch resizes the 1x1 map (align-corners bilinear): that is a broadcast.
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        y = conv(c, 1, dtype=self.dtype, name="conv1")(jnp.concatenate(branches, axis=-1))
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class Decoder(nn.Module):
    """DeepLabV3+ decoder: ASPP output (B, h, w, 256w) and low-level features (B, h4, w4, Cl)
    -> stride-4 logits (B, h4, w4, num_classes)."""

    num_classes: int
    width: float = 1.0
    dropout: Sequence[float] = (0.5, 0.1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, low_level: jax.Array, train: bool = False) -> jax.Array:
        c = scale_channels(256, self.width)
        low = conv(scale_channels(48, self.width), 1, dtype=self.dtype, name="conv1")(low_level)
        low = nn.relu(_batch_norm(train, self.dtype, "bn1")(low))
        x = resize_bilinear_align_corners(x, low.shape[1:3])
        x = jnp.concatenate([x, low], axis=-1)
        return _LastConv(self.num_classes, c, tuple(self.dropout), self.dtype, name="last_conv")(
            x, train
        )


class _LastConv(nn.Module):
    """``Sequential(conv3x3, BN, ReLU, Dropout, conv3x3, BN, ReLU, Dropout, conv1x1)``."""

    num_classes: int
    features: int
    dropout: tuple[float, float]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for conv_name, bn_name, rate in (("0", "1", self.dropout[0]), ("4", "5", self.dropout[1])):
            x = conv(self.features, 3, dtype=self.dtype, name=conv_name)(x)
            x = nn.relu(_batch_norm(train, self.dtype, bn_name)(x))
            x = nn.Dropout(rate, deterministic=not train)(x)
        return conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="8")(x)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (ResNet backbone); see the module docstring for the call convention.

    Attributes:
      num_classes: C, classes including background (21 for VOC).
      layers: backbone blocks per stage (``RESNET_LAYERS[101]`` = ResNet-101).
      output_stride: 16 or 8 (backbone dilation and ASPP rates).
      width: channel multiplier of backbone and head (1.0 = the published network).
      dtype: compute dtype (parameters float32; logits and masks returned in at least float32).
      remat: rematerialise backbone blocks in the backward pass.
      train_backbone_norm: backbone BatchNorms use batch statistics in training (PyTorch
        ``train()``); False keeps their running statistics (frozen).
      aspp_dropout: dropout after the ASPP projection.
      decoder_dropout: the two dropouts of the decoder's ``last_conv``.
    """

    num_classes: int = 21
    layers: Sequence[int] = RESNET_LAYERS[101]
    output_stride: int = 16
    width: float = 1.0
    dtype: Any = jnp.float32
    remat: bool = False
    train_backbone_norm: bool = True
    aspp_dropout: float = 0.5
    decoder_dropout: Sequence[float] = (0.5, 0.1)

    def setup(self):
        if self.output_stride not in ASPP_RATES:
            raise ValueError(
                f"DeepLabV3+ output_stride must be one of {sorted(ASPP_RATES)}, "
                f"got {self.output_stride}"
            )
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes counts background and must be >= 2, got {self.num_classes}"
            )
        self.backbone = ResNet(
            layers=tuple(self.layers),
            replace_stride_with_dilation=dilation_for_output_stride(self.output_stride),
            width=self.width,
            dtype=self.dtype,
            batch_norm_stats=self.train_backbone_norm,
            remat=self.remat,
        )
        self.aspp = DeepLabASPP(
            ASPP_RATES[self.output_stride], self.width, self.aspp_dropout, self.dtype
        )
        self.decoder = Decoder(
            self.num_classes, self.width, tuple(self.decoder_dropout), self.dtype
        )

    def __call__(self, images: jax.Array, mode: str = "test", train: bool = False) -> dict:
        """(B, H, W, 3) -> ``{'logits', 'masks'}`` (B, H, W, C) and ``{'cls'}`` (B, C-1)."""
        if mode not in MODES:
            raise ValueError(f"unknown forward mode {mode!r}; expected one of {MODES}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) NHWC, got shape {images.shape}")
        features = self.backbone(images, train)
        x = self.aspp(features["layer4"], train)
        logits = self.decoder(x, features["layer1"], train)
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # float64 models: float64
        logits = resize_bilinear_align_corners(logits.astype(out_dtype), images.shape[1:3])
        return {
            "logits": logits,
            "masks": jax.nn.softmax(logits, axis=-1),
            "cls": jnp.ones((images.shape[0], self.num_classes - 1), out_dtype),
        }


def deeplab_model_config(**overrides: Any):
    """``config.model`` for DeepLabV3+ (an ``ml_collections.ConfigDict``): ResNet-101, output
    stride 16, the published dropouts; keyword arguments replace defaults (``CONFIG_KEYS``)."""
    unknown = sorted(set(overrides) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown DeepLab config keys {unknown}; expected {CONFIG_KEYS}")
    cfg = dict(
        num_classes=21,
        depth=101,
        output_stride=16,
        width=1.0,
        dtype="float32",
        remat=False,
        train_backbone_norm=True,
        aspp_dropout=0.5,
        decoder_dropout=(0.5, 0.1),
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def build_deeplab(model_cfg) -> DeepLabV3Plus:
    """``DeepLabV3Plus`` from ``config.model`` (every key of ``CONFIG_KEYS`` required, no
    defaults here: ``deeplab_model_config`` writes them)."""
    missing = [k for k in CONFIG_KEYS if k not in model_cfg]
    if missing:
        raise ValueError(f"config.model lacks DeepLab keys {missing} (see deeplab_model_config)")
    dtype = compute_dtype(str(model_cfg["dtype"]))
    depth = int(model_cfg["depth"])
    if depth not in RESNET_LAYERS:
        raise ValueError(f"model.depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
    return DeepLabV3Plus(
        num_classes=int(model_cfg["num_classes"]),
        layers=RESNET_LAYERS[depth],
        output_stride=int(model_cfg["output_stride"]),
        width=float(model_cfg["width"]),
        dtype=dtype,
        remat=bool(model_cfg["remat"]),
        train_backbone_norm=bool(model_cfg["train_backbone_norm"]),
        aspp_dropout=float(model_cfg["aspp_dropout"]),
        decoder_dropout=tuple(float(r) for r in model_cfg["decoder_dropout"]),
    )


def deeplab_variable_shapes(model: DeepLabV3Plus) -> dict:
    """``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` leaves, nothing computed."""
    images = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images))


def with_backbone(variables: dict, backbone: dict) -> dict:
    """``variables`` of a DeepLabV3Plus with its ``backbone`` subtrees replaced by
    ``backbone`` (``{'params', 'batch_stats'}`` of a ``ResNet``, e.g. converted ImageNet
    weights from ``slr_jax.convert.convert_torchvision_resnet``); shapes must match."""
    out = {}
    for collection in ("params", "batch_stats"):
        tree = dict(variables[collection])
        check_tree_shapes(tree["backbone"], backbone[collection], f"backbone {collection}")
        tree["backbone"] = backbone[collection]
        out[collection] = tree
    return out
