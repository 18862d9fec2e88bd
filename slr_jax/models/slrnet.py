"""SLRNet: WideResNet38 + ASPP/GCI decoder + cross-view low-rank module + two heads (NHWC).

One module covers the reference's variants (``variant``):

- ``wsss`` (``models/slrnet.py``) and ``coco`` (``models/slrnet_coco_pseudo.py``, same network,
  different losses): the main head predicts C-1 foreground logits and a constant background
  logit 1 is prepended; the aux head's background logit is ``1 - max(foreground)``.
- ``semi`` (``models/slrnet_semi.py``): the same network as ``wsss``.
- ``semi_wo_cls`` (``models/slrnet_semi_wo_cls.py``): both heads predict all C logits
  (background included) and there are no class scores (``cls*`` are ones).

Call ``model.apply(variables, images, mode=..., train=..., rngs={'dropout': key},
mutable=['batch_stats'] if train else False)``; ``images`` (B, H, W, 3) ImageNet-normalised.
``train=False`` is PyTorch ``eval()``: no dropout, deterministic gate, running statistics.
With ``'noise'`` also mutable, training reports its dropout and gate masks (``models/noise.py``).

Padded evaluation: ``model.apply(variables, images, mode='test', region=padded_region(...))``
runs the test forward of images whose valid part ``[:h, :w]`` was padded at the bottom and
right, and computes exactly what the unpadded forward computes on that part: every
convolution reads zeros beyond the valid cells of its level (where the unpadded one reads its
zero padding), the image pooling of ASPP, the global max of GCI, the low-rank dictionary and
the class pooling take the valid cells only, and the decoder's stride-8 -> stride-4 resize is
the unpadded one's (``region['deep_rows'/'deep_cols']``). It returns ``cls`` and
``grid_masks``, the class maps on the stride-4 grid (cell i = input pixel 4i; the valid cells
are ``[:ceil(h/4), :ceil(w/4)]``); resizing them to (h, w) is the caller's
(``slr_jax.infer.predict``), since that resize depends on (h, w).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slr_jax.constants import VARIANTS
from slr_jax.models.backbone import WideResNet38, scale_channels
from slr_jax.models.heads import (
    ASPP,
    GCI,
    AuxHead,
    ConvBNReLU,
    LastConv,
    gate_keep_mask,
    mask_pooled_scores,
    stochastic_gate,
    with_background,
)
from slr_jax.models.layers import compute_dtype, zero_outside
from slr_jax.models.lowrank import FactorizationReconstruction, initial_dictionary
from slr_jax.models.noise import NOISE
from slr_jax.ops import resize_bilinear_align_corners, scaled_size
from slr_jax.ops.resize import interp_matrix_np

MODES = ("test", "test_two_view", "train")
# Strides of the backbone features SLRNet reads: conv3 (decoder, heads) and conv6 (ASPP).
FEATURE_STRIDES = (4, 8)


def _flatten_pixels(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def grid_cells(size: int, stride: int) -> int:
    """Cells of the stride-``stride`` feature grid of an axis of ``size`` input pixels: every
    stride-2 convolution (3x3 padding 1, or 1x1) maps n cells to ceil(n / 2)."""
    return -(-int(size) // stride)


def padded_region(
    padded_size: tuple[int, int], valid_size: tuple[int, int], coord_dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """The ``region`` of ``SLRNet.__call__`` for inputs of ``padded_size`` (H, W) whose valid
    part is ``[:h, :w]``, ``valid_size`` (h, w): ``mask`` (1, H, W, 1) bool; ``deep_rows``
    (ceil(H/4), ceil(H/8)) and ``deep_cols`` (same for W), the unpadded decoder's align-corners
    resize ceil(h/8) -> ceil(h/4) in their top-left corner, zeros elsewhere (float32, or float64
    coordinates and weights for ``coord_dtype='float64'``, as ``ops.resize`` for that dtype)."""
    (height, width), (h, w) = (int(d) for d in padded_size), (int(d) for d in valid_size)
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"valid size {valid_size} does not fit in the padded size {padded_size}")
    mask = np.zeros((1, height, width, 1), bool)
    mask[:, :h, :w] = True

    def deep_resize(valid: int, padded: int) -> np.ndarray:
        fine, coarse = (grid_cells(valid, s) for s in FEATURE_STRIDES)
        matrix = np.zeros([grid_cells(padded, s) for s in FEATURE_STRIDES], coord_dtype)
        matrix[:fine, :coarse] = interp_matrix_np(coarse, fine, coord_dtype)
        return matrix

    return {"mask": mask, "deep_rows": deep_resize(h, height), "deep_cols": deep_resize(w, width)}


def _resize_with(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, rows.shape[0], cols.shape[0], C) by the two interpolation matrices,
    computed as ``ops.resize_bilinear_align_corners`` computes (rows first, float32 or more)."""
    dtype, hp = jnp.promote_types(x.dtype, jnp.float32), jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", rows.astype(dtype), x.astype(dtype), precision=hp)
    y = jnp.einsum("pw,bhwc->bhpc", cols.astype(dtype), y, precision=hp)
    return y.astype(x.dtype)


class SLRNet(nn.Module):
    """The full network. See the module docstring for the call convention.

    Attributes:
      variant: one of ``VARIANTS``.
      num_classes: C, classes including background (21 for VOC, 81 for COCO).
      width: channel multiplier of backbone and heads (1.0 = reference architecture).
      num_iters: factorisation iterations of the low-rank module.
      temperature: softmax temperature of the codes.
      scale_factor: size factor of the second view (``int(H*f) x int(W*f)``).
      dtype: computation dtype (parameters stay float32): float32, bfloat16, or float64 (with
        ``jax_enable_x64``, for exact comparisons). Logits, masks, codes and scores are returned
        in ``out_dtype``: float32, or float64 for a float64 model.
      remat: rematerialise backbone blocks in the backward pass (saves activation memory).
      bn_stat_groups: the trainable head BatchNorms' training statistics are taken over this
        many groups of consecutive examples (the reference's ``nn.DataParallel`` on that many
        GPUs; 1 = the whole batch), ``layers.BatchNorm.stat_groups``.
      use_low_rank: False drops the cross-view low-rank module (an ablation: features pass
        through unchanged, codes are zeros so the code-consistency term is 0, no parameters).
    """

    variant: str = "wsss"
    num_classes: int = 21
    width: float = 1.0
    num_iters: int = 1
    temperature: float = 1.0
    scale_factor: float = 0.5
    dtype: Any = jnp.float32
    remat: bool = False
    use_low_rank: bool = True
    bn_stat_groups: int = 1

    def setup(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown model variant {self.variant!r}; expected one of {VARIANTS}")
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes counts background and must be >= 2, got {self.num_classes}"
            )
        ch = lambda c: scale_channels(c, self.width)
        head_out = self.num_classes if self.predicts_background else self.num_classes - 1
        self.backbone = WideResNet38(self.width, self.dtype, self.remat)
        self.aspp = ASPP(self.width, self.dtype)
        groups = self.bn_stat_groups
        self.fc8_skip = ConvBNReLU(ch(48), dtype=self.dtype, bn_stat_groups=groups)
        self.fc8_x = ConvBNReLU(ch(256), kernel=3, dtype=self.dtype, bn_stat_groups=groups)
        self.shallow_mask = GCI(self.width, self.dtype, bn_stat_groups=groups)
        self.last_conv = LastConv(head_out, self.width, self.dtype, bn_stat_groups=groups)
        self.aux_head = AuxHead(head_out, self.width, self.dtype, bn_stat_groups=groups)
        if self.use_low_rank:
            self.factorization_reconstruction = FactorizationReconstruction(
                self.num_iters, self.temperature, self.dtype
            )

    @property
    def out_dtype(self) -> Any:
        """The dtype of every output: at least float32 (bfloat16 models return float32)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    @property
    def predicts_background(self) -> bool:
        """Whether the heads output the background logit themselves (``semi_wo_cls``)."""
        return self.variant == "semi_wo_cls"

    # ----------------------------------------------------------------------------- pieces
    def decoder_features(
        self, images: jax.Array, train: bool, region: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) -> (decoder features (B, h, w, 256w), conv3 (B, h, w, 256w)), h = H/4.

        With ``region`` (padded evaluation) the decoder features are 0 beyond the valid cells.
        """
        if region is None:
            feats = self.backbone(images, train)
            mask4 = mask8 = None
        else:
            feats = self.backbone(images, train, region["mask"])
            mask4 = region["mask"][:, ::4, ::4]
            mask8 = mask4[:, ::2, ::2]
        conv3 = feats["conv3"]
        deep = self.aspp(feats["conv6"], train, mask8)
        skip = self.fc8_skip(conv3, train)
        if region is None:
            deep = resize_bilinear_align_corners(deep, skip.shape[1:3])
        else:
            deep = _resize_with(zero_outside(deep, mask8), region["deep_rows"], region["deep_cols"])
        x = jnp.concatenate([deep, skip], axis=-1)
        return zero_outside(self.fc8_x(zero_outside(x, mask4), train), mask4), conv3

    def aux_forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """Aux head: (B, h, w, 256w) -> (logits, softmax masks), both (B, h, w, C)."""
        logits = self.aux_head(x, train)
        logits = with_background(logits, "none" if self.predicts_background else "one_minus_max")
        logits = logits.astype(self.out_dtype)
        return logits, jax.nn.softmax(logits, axis=-1)

    def segmentation_forward(
        self, x: jax.Array, shallow: jax.Array, train: bool, valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """GCI + stochastic gate + main head -> (logits, softmax masks), both (B, h, w, C).
        ``valid``: the padded evaluation's valid cells (bool, (B or 1, h, w, 1))."""
        injected = self.shallow_mask(shallow, x, train, valid)
        keep = None
        if train:  # drawn here so that it can be reported (models/noise.py)
            keep = gate_keep_mask(self.make_rng("dropout"), x.shape)
            self.sow(NOISE, "gate", keep)
        x = stochastic_gate(x, injected, train=train, rng=None, keep=keep)
        logits = self.last_conv(x, train, valid)
        logits = with_background(logits, "none" if self.predicts_background else "constant")
        logits = logits.astype(self.out_dtype)
        return logits, jax.nn.softmax(logits, axis=-1)

    def class_scores(
        self, logits: jax.Array, masks: jax.Array, valid: jax.Array | None = None
    ) -> jax.Array:
        """(B, h, w, C) logits and masks -> (B, C-1) scores (ones for ``semi_wo_cls``), pooled
        over the ``valid`` cells only when given."""
        if self.predicts_background:
            return jnp.ones((logits.shape[0], self.num_classes - 1), self.out_dtype)
        return mask_pooled_scores(logits, masks, valid)

    def low_rank(
        self, views: list[jax.Array], dictionary_init: jax.Array, valid: jax.Array | None = None
    ) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
        """Factorises the views (each (B, h_i, w_i, D)) jointly.

        Returns (reconstructed views, codes per view (B, h_i, w_i, K), dictionary (B, K, D)).
        ``valid`` (bool, (B or 1, h, w, 1), one view only): the pixels that enter the
        dictionary (the padded evaluation).
        """
        if not self.use_low_rank:
            atoms = dictionary_init.shape[1]
            codes = [jnp.zeros((*v.shape[:3], atoms), self.out_dtype) for v in views]
            return list(views), codes, dictionary_init.astype(self.out_dtype)
        flat = jnp.concatenate([_flatten_pixels(v) for v in views], axis=1)
        if valid is not None:
            valid = _flatten_pixels(valid)
        out, codes, dictionary = self.factorization_reconstruction(flat, dictionary_init, valid)
        recon, codes_per_view, start = [], [], 0
        for v in views:
            b, h, w, d = v.shape
            recon.append(out[:, start : start + h * w].reshape(b, h, w, d))
            view_codes = jnp.swapaxes(codes[:, :, start : start + h * w], 1, 2)
            codes_per_view.append(view_codes.reshape(b, h, w, -1))
            start += h * w
        return recon, codes_per_view, dictionary

    # ---------------------------------------------------------------------------- forward
    def __call__(
        self, images: jax.Array, mode: str = "test", train: bool = False,
        region: dict | None = None,
    ) -> dict:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"unknown forward mode {mode!r}; expected one of {MODES}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) NHWC, got shape {images.shape}")
        if region is not None and (mode != "test" or train):
            raise ValueError("a padded region is only for the evaluation forward (mode='test')")
        height, width = images.shape[1:3]

        x, shallow = self.decoder_features(images, train, region)
        mask4 = None if region is None else region["mask"][:, ::4, ::4]
        aux_logits, aux_masks = self.aux_forward(x, train)
        dictionary_init = initial_dictionary(x, aux_logits, mask4)

        if mode == "test":
            (x_lr,), _, _ = self.low_rank([x], dictionary_init, mask4)
            logits, masks = self.segmentation_forward(x_lr, shallow, train, mask4)
            cls = self.class_scores(logits, masks, mask4)
            if region is not None:
                return {"cls": cls, "grid_masks": masks}
            return {"cls": cls, "masks": resize_bilinear_align_corners(masks, (height, width))}

        images2 = resize_bilinear_align_corners(
            images, scaled_size((height, width), self.scale_factor)
        )
        x2, shallow2 = self.decoder_features(images2, train)
        (x_lr, x2_lr), (codes, codes2), dictionary = self.low_rank([x, x2], dictionary_init)
        logits, masks = self.segmentation_forward(x_lr, shallow, train)
        logits2, masks2 = self.segmentation_forward(x2_lr, shallow2, train)
        cls = self.class_scores(logits, masks)
        cls2 = self.class_scores(logits2, masks2)
        # View 2 back to view 1's stride-4 grid.
        size = x.shape[1:3]
        masks2 = resize_bilinear_align_corners(masks2, size)

        if mode == "test_two_view":
            return {
                "cls": (cls + cls2) / 2.0,
                "masks": resize_bilinear_align_corners((masks + masks2) / 2.0, (height, width)),
            }
        return {
            "logits": logits,
            "masks": masks,
            "logits2": resize_bilinear_align_corners(logits2, size),
            "masks2": masks2,
            "aux_logits": aux_logits,
            "aux_masks": aux_masks,
            "cls": cls,
            "cls2": cls2,
            "cls_aux": self.class_scores(aux_logits, aux_masks),
            "codes": codes.astype(self.out_dtype),
            "codes2": resize_bilinear_align_corners(codes2, size).astype(self.out_dtype),
            "dictionary": dictionary.astype(self.out_dtype),
        }


def build_model(model_cfg) -> SLRNet:
    """``SLRNet`` from ``config.model`` (every key of configs/common.py's model section)."""
    return SLRNet(
        variant=str(model_cfg.variant),
        num_classes=int(model_cfg.num_classes),
        width=float(model_cfg.width),
        num_iters=int(model_cfg.num_iters),
        temperature=float(model_cfg.temperature),
        scale_factor=float(model_cfg.scale_factor),
        dtype=compute_dtype(model_cfg.dtype),
        remat=bool(model_cfg.remat),
        use_low_rank=bool(model_cfg.use_low_rank),
        bn_stat_groups=int(model_cfg.get("bn_stat_groups", 1)),
    )


def init_variables(model: SLRNet, rng: jax.Array, image_size: tuple[int, int] = (33, 33)) -> dict:
    """Random ``{'params', 'batch_stats'}`` for ``model`` (shapes do not depend on image size).

    ``rng`` is any JAX key. The initialisers draw from an ``rbg`` key derived from it, inside
    one ``jit``: XLA:CPU compiles the hundreds of threefry initialiser calls of this network
    very slowly (about 90 s against 20 s with rbg at width 0.125, eagerly just as slow), while
    rbg is a single generator op per leaf. Same ``rng`` -> same variables on a given backend.
    """
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(rng)
    else:
        data = jnp.asarray(rng, jnp.uint32)  # legacy raw uint32 key
    data = data.reshape(-1).astype(jnp.uint32)
    if data.shape[0] != 4:
        data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]
    key = jax.random.wrap_key_data(data, impl="rbg")
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    init = jax.jit(lambda k, x: model.init({"params": k}, x, mode="test", train=False))
    return dict(init(key, images))


def variable_shapes(model: SLRNet) -> dict:
    """``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` leaves, without computing."""
    return jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
