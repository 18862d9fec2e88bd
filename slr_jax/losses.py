"""SLRNet's training objective: pseudo labels, class-balanced CE, consistency and class terms.

Everything is a pure, jit-able function of arrays (NHWC, channel-last class axis). The entry
point is ``slrnet_objective``; the pieces are exposed for tests and reuse. Per variant:

- ``wsss``: the reference ``models/slrnet.py`` losses and ``tools/train_voc_wss.py`` total.
- ``semi``: as ``wsss``, but for pixel-labelled examples (``is_labeled``) the ground truth
  replaces the pseudo label, their classification term is replaced by their seg loss, and the
  mean seg loss of labelled examples counts from the first step.
- ``semi_wo_cls``: the heads predict background themselves; no classification term except the
  labelled examples' seg loss; no image-label masking; background probability cubed before
  PAMR; pseudo-label thresholds 0.9 (background) / ``cutoff_top`` / ``cutoff_low``; no per-image
  weight in the CE.
- ``coco``: max-normalised pseudo labels (``fg > cutoff_top``, bg where no class exceeds
  ``cutoff_low``) and a positively weighted BCE classification loss.

``supervised_objective`` is the fully supervised alternative (``loss.objective='supervised'``:
the stage-2 DeepLabV3+ on pseudo labels, or a baseline on the pixel-labelled images alone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from slr_jax.constants import IGNORE_LABEL, SEMI_VARIANTS, VARIANTS
from slr_jax.ops import resize_bilinear_align_corners
from slr_jax.ops.pamr import pamr


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {VARIANTS}")


# ----------------------------------------------------------------------------- pseudo labels
def pseudo_label_masks(
    masks: jax.Array, *, cutoff_top: float, cutoff_low: float, bg_scale: float
) -> jax.Array:
    """Binary pseudo-label masks (B, H, W, C) from class probabilities (B, H, W, C).

    A pixel belongs to class c when ``masks[..., c] > max(scale_c * max_pixels(masks[..., c]),
    cutoff_low)`` with ``scale_0 = bg_scale`` and ``scale_c = cutoff_top`` otherwise. Pixels
    claimed by several classes are cleared (ignored).
    """
    peak = jnp.max(masks, axis=(1, 2), keepdims=True)
    scales = jnp.full((masks.shape[-1],), cutoff_top, masks.dtype).at[0].set(bg_scale)
    threshold = jnp.maximum(peak * scales, cutoff_low)
    pseudo = (masks > threshold).astype(masks.dtype)
    return _clear_ambiguous(pseudo)


def coco_pseudo_label_masks(masks: jax.Array, *, cutoff_top: float, cutoff_low: float) -> jax.Array:
    """COCO pseudo labels (B, H, W, C): masks divided by their spatial max (+1e-6); a class where
    above ``cutoff_top``; background where no foreground exceeds ``cutoff_low``."""
    normalised = masks / (jnp.max(masks, axis=(1, 2), keepdims=True) + 1e-6)
    fg = (normalised[..., 1:] > cutoff_top).astype(masks.dtype)
    bg = jnp.all(normalised[..., 1:] <= cutoff_low, axis=-1, keepdims=True).astype(masks.dtype)
    return _clear_ambiguous(jnp.concatenate([bg, fg], axis=-1))


def _clear_ambiguous(pseudo: jax.Array) -> jax.Array:
    return pseudo * (jnp.sum(pseudo, axis=-1, keepdims=True) <= 1)


# ---------------------------------------------------------------------------------- losses
def balanced_cross_entropy(
    logits: jax.Array,
    pseudo: jax.Array,
    labels: jax.Array | None,
    *,
    per_image_weight: bool = True,
) -> jax.Array:
    """Class-balanced cross-entropy per image, (B,).

    Args:
      logits: (B, h, w, C), upsampled (align corners) to the pseudo-label size first.
      pseudo: (B, H, W, C) binary; pixels with no class are ignored.
      labels: (B, C-1) image labels; with ``per_image_weight`` an image counts only when its
        pseudo label contains exactly as many classes as it has labels (+ background).

    Each pixel's CE is weighted by ``(n - n_c) / (1 + n)`` for its class c (n_c pixels of c, n
    labelled pixels in the image); the mean runs over all H*W pixels.
    """
    if per_image_weight and labels is None:
        raise ValueError("balanced_cross_entropy: per_image_weight=True needs image labels")
    b, h, w, c = pseudo.shape
    logits = resize_bilinear_align_corners(logits, (h, w))
    target = jnp.argmax(pseudo, axis=-1)
    valid = jnp.sum(pseudo, axis=-1) >= 1.0
    pixels_per_class = jnp.sum(pseudo, axis=(1, 2))  # (B, C)
    total = jnp.sum(pixels_per_class, axis=-1, keepdims=True)
    class_weight = (total - pixels_per_class) / (1.0 + total)
    pixel_weight = jnp.sum(pseudo * class_weight[:, None, None, :], axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, nll, 0.0)
    loss = jnp.mean((pixel_weight * nll).reshape(b, -1), axis=-1)
    if per_image_weight:
        expected = jnp.sum(labels, axis=-1) + 1.0
        present = jnp.sum(pixels_per_class > 0, axis=-1).astype(loss.dtype)
        loss = loss * (expected == present).astype(loss.dtype)
    return loss


def multilabel_soft_margin(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-image ``MultiLabelSoftMarginLoss`` (B,): mean over classes of the logistic loss."""
    per_class = labels * jax.nn.log_sigmoid(scores) + (1 - labels) * jax.nn.log_sigmoid(-scores)
    return -jnp.mean(per_class, axis=-1)


def weighted_bce_with_logits(
    scores: jax.Array, labels: jax.Array, pos_weight: jax.Array
) -> jax.Array:
    """``binary_cross_entropy_with_logits(pos_weight=...)`` averaged over all elements."""
    loss = -(pos_weight * labels * jax.nn.log_sigmoid(scores)
             + (1 - labels) * jax.nn.log_sigmoid(-scores))  # fmt: skip
    return jnp.mean(loss)


def keep_max(x: jax.Array, axis: int = -1) -> jax.Array:
    """Keeps each position's maximum along ``axis`` (value, not 1) and zeroes the rest; every
    entry of an exact tie is kept, like the reference's ``max_onehot``. The barrier makes the
    maximum and the comparison read one computed ``x``: under ``jit`` XLA may otherwise
    recompute ``x`` inside each fusion with other rounding, and ``x == max`` can then miss
    (the failure ``heads.max_to_argmax`` documents for the GCI)."""
    x = jax.lax.optimization_barrier(x)
    return jnp.where(x == jnp.max(x, axis=axis, keepdims=True), x, 0.0)


def mask_consistency(masks: jax.Array, masks2: jax.Array, labels: jax.Array | None) -> jax.Array:
    """mean |m1 - m2| over foreground channels (B, h, w, C-1), times image labels if given."""
    diff = jnp.abs(masks[..., 1:] - masks2[..., 1:])
    if labels is not None:
        diff = diff * labels[:, None, None, :]
    return jnp.mean(diff)


def code_consistency(codes: jax.Array, codes2: jax.Array) -> jax.Array:
    """mean |keep_max(c1) - keep_max(c2)| over (B, h, w, K)."""
    return jnp.mean(jnp.abs(keep_max(codes) - keep_max(codes2)))


def _class_weights(loss_cfg, num_foreground: int) -> jax.Array | float:
    """``loss_cfg.class_weights`` as a (C-1,) array, or 1.0 when unset / empty."""
    weights = loss_cfg.class_weights
    if weights is None or len(weights) == 0:
        return 1.0
    if len(weights) != num_foreground:
        raise ValueError(
            f"loss.class_weights has {len(weights)} entries but the labels have "
            f"{num_foreground} foreground classes; give one weight per foreground class"
        )
    return jnp.asarray(weights, jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of ``values`` where ``weights`` is 1; 0 when no weight is set (the reference
    would produce NaN for a batch without labelled examples)."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ------------------------------------------------------------------------------- objective
def refine_and_label(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, loss_cfg, variant: str
) -> dict[str, jax.Array]:
    """Pseudo labels from the two views' masks (no gradient). Returns ``cam``, ``refined`` and
    ``pseudo``, each (B, H, W, C) at the input size."""
    _check_variant(variant)
    masks = jax.lax.stop_gradient((outputs["masks"] + outputs["masks2"]) / 2.0)
    if variant == "semi_wo_cls":
        masks = masks.at[..., 0].set(masks[..., 0] ** loss_cfg.pamr_bg_pow)
    size = masks.shape[1:3]
    raw = resize_bilinear_align_corners(batch["raw_image"], size)
    refined = pamr(
        raw, masks, num_iters=loss_cfg.pamr_iters, dilations=tuple(loss_cfg.pamr_dilations)
    )
    full = batch["image"].shape[1:3]
    cam = resize_bilinear_align_corners(masks, full)
    refined = resize_bilinear_align_corners(refined, full)
    if variant != "semi_wo_cls":
        fg_keep = jnp.concatenate([jnp.ones_like(batch["labels"][:, :1]), batch["labels"]], -1)
        cam = cam * fg_keep[:, None, None, :]
        refined = refined * fg_keep[:, None, None, :]
    if variant == "coco":
        pseudo = coco_pseudo_label_masks(
            refined, cutoff_top=loss_cfg.cutoff_top, cutoff_low=loss_cfg.cutoff_low
        )
    else:
        pseudo = pseudo_label_masks(
            refined, cutoff_top=loss_cfg.cutoff_top, cutoff_low=loss_cfg.cutoff_low,
            bg_scale=loss_cfg.bg_scale,
        )  # fmt: skip
    if variant in SEMI_VARIANTS:
        # Out-of-range labels (255 = ignore) one-hot to all zeros, i.e. ignored pixels.
        truth = jax.nn.one_hot(batch["mask"], pseudo.shape[-1], dtype=pseudo.dtype)
        pseudo = jnp.where(batch["is_labeled"][:, None, None, None], truth, pseudo)
    return {"cam": cam, "refined": refined, "pseudo": jax.lax.stop_gradient(pseudo)}


def slrnet_objective(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    loss_cfg,
    variant: str,
    seg_weight: jax.Array | float,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """The weighted training loss of one batch.

    Args:
      outputs: the model's ``mode='train'`` outputs (see ``slr_jax.models.slrnet``).
      batch: ``image``, ``raw_image``, ``labels``, ``mask``, ``is_labeled`` (docs/design.md).
      loss_cfg: ``loss_coeff`` (cls, mask consistency, code consistency, seg), ``aux_weight``,
        ``pamr_iters``, ``pamr_dilations``, ``cutoff_top``, ``cutoff_low``, ``bg_scale`` and for
        COCO ``pos_weight``, ``class_weights``.
      variant: ``wsss``, ``semi``, ``semi_wo_cls`` or ``coco``.
      seg_weight: traced scalar, 0 while pretraining and 1 after (no recompilation).

    Returns:
      ``(total, terms, visuals)``: the scalar loss; every term (``cls``, ``seg``,
      ``mask_consistency``, ``code_consistency``, ``seg_labeled``, ``total``) as scalars; and
      ``cam``, ``refined``, ``pseudo`` (B, H, W, C) with ``seg_per_image`` (B,): the seg loss
      of each image (both views plus the weighted aux head), as the reference's trainers see
      it before their mean.
    """
    _check_variant(variant)
    out_dtype = outputs["masks"].dtype  # float32, or float64 for a float64 model
    labels = batch["labels"].astype(out_dtype)
    c_cls, c_mask, c_code, c_seg = (float(c) for c in loss_cfg.loss_coeff)
    aux_w = float(loss_cfg.aux_weight)
    semi = variant in SEMI_VARIANTS
    labeled = batch["is_labeled"].astype(out_dtype) if semi else None
    if variant == "coco":  # validated before any work is done
        pos_weight = _class_weights(loss_cfg, labels.shape[-1]) * float(loss_cfg.pos_weight)

    mask_term = mask_consistency(
        outputs["masks"], outputs["masks2"], None if variant == "semi_wo_cls" else labels
    )
    code_term = code_consistency(outputs["codes"], outputs["codes2"])

    visuals = refine_and_label(outputs, batch, loss_cfg=loss_cfg, variant=variant)
    pseudo = visuals["pseudo"]
    ce = lambda logits: balanced_cross_entropy(
        logits, pseudo, labels, per_image_weight=variant != "semi_wo_cls"
    )
    seg_per_image = (
        ce(outputs["logits"]) + ce(outputs["logits2"]) + aux_w * ce(outputs["aux_logits"])
    )

    if variant == "coco":
        bce = lambda s: weighted_bce_with_logits(s, labels, pos_weight)
        cls_term = bce(outputs["cls"]) + bce(outputs["cls2"]) + aux_w * bce(outputs["cls_aux"])
    elif variant == "semi_wo_cls":
        cls_term = jnp.mean(labeled * seg_per_image)
    else:
        cls_per_image = (multilabel_soft_margin(outputs["cls"], labels)
                         + multilabel_soft_margin(outputs["cls2"], labels)
                         + aux_w * multilabel_soft_margin(outputs["cls_aux"], labels))  # fmt: skip
        if semi:
            cls_per_image = jnp.where(labeled > 0, seg_per_image, cls_per_image)
        cls_term = jnp.mean(cls_per_image)

    seg_term = jnp.mean(seg_per_image)
    visuals["seg_per_image"] = seg_per_image
    total = (
        c_cls * cls_term + c_mask * mask_term + c_code * code_term + c_seg * seg_weight * seg_term
    )
    terms = {
        "cls": cls_term,
        "seg": seg_term,
        "mask_consistency": mask_term,
        "code_consistency": code_term,
    }
    if semi:
        seg_labeled = _masked_mean(seg_per_image, labeled)
        total = total + c_seg * seg_labeled
        terms["seg_labeled"] = seg_labeled
    terms["total"] = total
    return total, terms, visuals


def cross_entropy_with_ignore(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the labelled pixels of a batch (PyTorch's
    ``CrossEntropyLoss(ignore_index=255)``); 0 when no pixel is labelled.

    Args:
      logits: (B, h, w, C), upsampled (align corners) to the mask size first if smaller.
      mask: (B, H, W) int class indices, 255 = ignore.
    """
    if logits.shape[1:3] != mask.shape[1:3]:
        logits = resize_bilinear_align_corners(logits, mask.shape[1:3])
    valid = mask != IGNORE_LABEL
    target = jnp.where(valid, mask, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def supervised_objective(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    loss_cfg,
    seg_weight: jax.Array | float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Cross-entropy of ``outputs['logits']`` against ``batch['mask']`` (255 ignored), plus
    ``loss_cfg.aux_weight`` x that of ``outputs['aux_logits']`` when the model has an aux head.

    ``seg_weight`` is accepted for the train step's common signature and not used (there is no
    warm-up without a pseudo label to wait for). Returns ``(total, terms, {})`` with terms
    ``seg`` (``aux``) and ``total``.
    """
    del seg_weight
    seg = cross_entropy_with_ignore(outputs["logits"], batch["mask"])
    terms = {"seg": seg}
    total = seg
    if "aux_logits" in outputs:
        terms["aux"] = cross_entropy_with_ignore(outputs["aux_logits"], batch["mask"])
        total = total + float(loss_cfg.aux_weight) * terms["aux"]
    terms["total"] = total
    return total, terms, {}


def make_objective(config) -> Callable:
    """``objective(outputs, batch, seg_weight) -> (total, terms, visuals)`` of
    ``config.loss.objective`` (``slrnet`` with ``config.model.variant``, or ``supervised``)."""
    if config.loss.objective == "supervised":
        return functools.partial(supervised_objective, loss_cfg=config.loss)
    return functools.partial(
        slrnet_objective, loss_cfg=config.loss, variant=str(config.model.variant)
    )
