"""The semi-supervised objectives and the supervised one, pinned against NumPy.

A batch of two images, image 0 pixel-labelled and image 1 not, with random network outputs at
the input size (every resize is then the identity): the ground truth replaces the pseudo label
of image 0 only; ``semi`` uses the image labels (classification term of image 1, per-image CE
weights) and ``semi_wo_cls`` ignores them; ``supervised_objective`` is the cross-entropy of the
labelled pixels. The expected values are computed here in NumPy from the formulas of
``slr_jax/losses.py``'s docstrings.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from slr_jax.losses import refine_and_label, slrnet_objective, supervised_objective

B, H, W, C = 2, 8, 8, 4  # C classes incl. background
IGNORE = 255


def _loss_cfg(variant: str):
    loss = common.get_config().loss
    loss.pamr_iters = 2
    loss.pamr_dilations = (1,)
    if variant == "semi_wo_cls":
        loss.cutoff_top, loss.cutoff_low, loss.bg_scale = 0.8, 0.6, 0.9
    return loss


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    outputs = {k: 4.0 * rng.normal(size=(B, H, W, C)).astype(np.float32)
               for k in ("logits", "logits2", "aux_logits")}  # fmt: skip
    outputs["masks"] = _softmax(outputs["logits"])
    outputs["masks2"] = _softmax(outputs["logits2"])
    outputs["codes"] = _softmax(rng.normal(size=(B, H, W, C)).astype(np.float32))
    outputs["codes2"] = _softmax(rng.normal(size=(B, H, W, C)).astype(np.float32))
    for key in ("cls", "cls2", "cls_aux"):
        outputs[key] = rng.normal(size=(B, C - 1)).astype(np.float32)
    mask = rng.integers(0, C, size=(B, H, W)).astype(np.int32)
    mask[0, :2] = IGNORE
    mask[1] = IGNORE  # image 1 has no pixel labels
    batch = {
        "image": rng.normal(size=(B, H, W, 3)).astype(np.float32),
        "raw_image": rng.uniform(size=(B, H, W, 3)).astype(np.float32),
        "labels": np.asarray([[1, 1, 1], [1, 0, 1]], np.float32),  # image 0: its mask's
        "mask": mask,
        "is_labeled": np.asarray([True, False]),
    }
    return outputs, batch


def _jnp(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


def _one_hot_or_zero(mask):
    """(H, W, C) one-hot of ``mask``, all zeros where 255."""
    return (mask[..., None] == np.arange(C)).astype(np.float32)


def _balanced_ce(logits, pseudo, labels, per_image_weight):
    """NumPy ``balanced_cross_entropy`` of one image: logits (H, W, C), pseudo (H, W, C)."""
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = pseudo.argmax(-1)
    valid = pseudo.sum(-1) >= 1
    counts = pseudo.sum((0, 1))
    total = counts.sum()
    weight = ((total - counts) / (1 + total))[target]
    nll = -np.take_along_axis(log_probs, target[..., None], -1)[..., 0]
    loss = np.mean(np.where(valid, weight * nll, 0.0))
    if per_image_weight and labels.sum() + 1 != (counts > 0).sum():
        return 0.0
    return loss


def _soft_margin(scores, labels):
    log_sig = lambda x: -np.log1p(np.exp(-x))
    return -np.mean(labels * log_sig(scores) + (1 - labels) * log_sig(-scores))


def _expected_terms(outputs, batch, pseudo, variant, aux_w):
    """(cls term, seg_labeled) from NumPy, given the objective's pseudo labels."""
    weighted = variant != "semi_wo_cls"
    labels = batch["labels"]
    seg = np.asarray([
        sum(w * _balanced_ce(outputs[k][i], pseudo[i], labels[i], weighted)
            for k, w in (("logits", 1.0), ("logits2", 1.0), ("aux_logits", aux_w)))
        for i in range(B)
    ])  # fmt: skip
    labelled = batch["is_labeled"].astype(np.float64)
    if variant == "semi_wo_cls":
        cls = np.mean(labelled * seg)
    else:
        margin = np.asarray([
            sum(w * _soft_margin(outputs[k][i], labels[i])
                for k, w in (("cls", 1.0), ("cls2", 1.0), ("cls_aux", aux_w)))
            for i in range(B)
        ])  # fmt: skip
        cls = np.mean(np.where(labelled > 0, seg, margin))
    return cls, np.sum(seg * labelled) / max(labelled.sum(), 1.0)


@pytest.mark.parametrize("variant", ["semi", "semi_wo_cls"])
def test_ground_truth_replaces_the_pseudo_label_of_labelled_images_only(inputs, variant):
    outputs, batch = inputs
    loss_cfg = _loss_cfg(variant)
    pseudo = np.asarray(
        refine_and_label(_jnp(outputs), _jnp(batch), loss_cfg=loss_cfg, variant=variant)["pseudo"]
    )
    np.testing.assert_array_equal(pseudo[0], _one_hot_or_zero(batch["mask"][0]))
    # Image 1 keeps a pseudo label made from the masks (not the all-ignore ground truth).
    assert pseudo[1].sum() > 0
    wsss = refine_and_label(
        _jnp(outputs),
        {**_jnp(batch), "is_labeled": np.zeros(B, bool)},
        loss_cfg=loss_cfg,
        variant=variant,
    )
    np.testing.assert_array_equal(pseudo[1], np.asarray(wsss["pseudo"])[1])


@pytest.mark.parametrize("variant", ["semi", "semi_wo_cls"])
def test_semi_terms_match_numpy(inputs, variant):
    outputs, batch = inputs
    loss_cfg = _loss_cfg(variant)
    total, terms, visuals = slrnet_objective(
        _jnp(outputs), _jnp(batch), loss_cfg=loss_cfg, variant=variant, seg_weight=0.0
    )
    pseudo = np.asarray(visuals["pseudo"])
    cls, seg_labeled = _expected_terms(outputs, batch, pseudo, variant, loss_cfg.aux_weight)
    np.testing.assert_allclose(float(terms["cls"]), cls, rtol=1e-5)
    assert seg_labeled > 0 and cls > 0
    np.testing.assert_allclose(float(terms["seg_labeled"]), seg_labeled, rtol=1e-5)
    # seg_weight 0 (the warm-up): the labelled images' seg loss counts all the same.
    c_cls, c_mask, c_code, c_seg = loss_cfg.loss_coeff
    expected = (c_cls * cls + c_mask * float(terms["mask_consistency"])
                + c_code * float(terms["code_consistency"]) + c_seg * seg_labeled)  # fmt: skip
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_semi_uses_image_labels_and_semi_wo_cls_does_not(inputs):
    outputs, batch = inputs
    other = {**batch, "labels": batch["labels"].copy()}
    other["labels"][1] = [0, 1, 0]  # the unlabelled image's image labels
    result = {}
    for variant in ("semi", "semi_wo_cls"):
        loss_cfg = _loss_cfg(variant)
        result[variant] = [
            slrnet_objective(
                _jnp(outputs), _jnp(b), loss_cfg=loss_cfg, variant=variant, seg_weight=1.0
            )
            for b in (batch, other)
        ]
    (t_a, _, _), (t_b, _, _) = result["semi_wo_cls"]
    np.testing.assert_array_equal(float(t_a), float(t_b))
    (_, terms_a, _), (_, terms_b, _) = result["semi"]
    aux_w = _loss_cfg("semi").aux_weight
    heads = (("cls", 1.0), ("cls2", 1.0), ("cls_aux", aux_w))
    margin = lambda labels: sum(w * _soft_margin(outputs[k][1], labels) for k, w in heads)
    # Only image 1's classification part of the cls mean moves, by the NumPy soft margins.
    change = (margin(other["labels"][1]) - margin(batch["labels"][1])) / B
    np.testing.assert_allclose(float(terms_b["cls"] - terms_a["cls"]), change, rtol=1e-4)
    # Mask consistency: semi weights it by the image labels, semi_wo_cls does not.
    diff = np.abs(outputs["masks"][..., 1:] - outputs["masks2"][..., 1:])
    (_, wo_terms, _), _ = result["semi_wo_cls"]
    np.testing.assert_allclose(float(wo_terms["mask_consistency"]), diff.mean(), rtol=1e-5)
    weighted = (diff * batch["labels"][:, None, None, :]).mean()
    np.testing.assert_allclose(float(terms_a["mask_consistency"]), weighted, rtol=1e-5)


def test_supervised_objective_is_cross_entropy_of_labelled_pixels(inputs):
    outputs, batch = inputs
    loss_cfg = common.get_config().loss
    small = {k: jnp.asarray(outputs[k][:, ::2, ::2]) for k in ("logits", "aux_logits")}
    total, terms, _ = supervised_objective(
        {"logits": outputs["logits"], "aux_logits": outputs["aux_logits"]}, batch,
        loss_cfg=loss_cfg,
    )  # fmt: skip
    mask = batch["mask"]
    valid = mask != IGNORE

    def ce(logits):
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(valid, mask, 0)[..., None], -1)[..., 0]
        return -picked[valid].mean()

    np.testing.assert_allclose(float(terms["seg"]), ce(outputs["logits"]), rtol=1e-5)
    expected = ce(outputs["logits"]) + loss_cfg.aux_weight * ce(outputs["aux_logits"])
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    # Smaller logits (SLRNet's stride-4 maps) are upsampled to the mask first; no aux head.
    total, terms, _ = supervised_objective({"logits": small["logits"]}, batch, loss_cfg=loss_cfg)
    assert set(terms) == {"seg", "total"} and np.isfinite(float(total))
    # No labelled pixel at all: 0, not NaN.
    empty = {**batch, "mask": np.full_like(mask, IGNORE)}
    assert float(supervised_objective(outputs, empty, loss_cfg=loss_cfg)[0]) == 0.0
