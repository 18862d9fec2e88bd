"""SLRNet's training objective (``slr_jax.losses``) against PyTorch evaluations of its formulas.

The torch side is written here from the formulas (NCHW tensors, ``F.interpolate(align_corners=
True)``, ``F.cross_entropy(ignore_index=255)``, ``MultiLabelSoftMarginLoss``,
``binary_cross_entropy_with_logits(pos_weight)``, the PAMR of ``tests/test_pamr.py``). With
``SLR_REFERENCE_REPO`` set, the official code's own pseudo-label, balanced-CE and ``max_onehot``
functions are compared too. The objective tests run a tiny-width SLRNet; its forward and the
gradient w.r.t. the head parameters are compiled once per module (about half of this file's
run time) and shared by the objective, gradient and SGD tests.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from numerics import assert_close

from configs import common
from slr_jax.losses import (
    balanced_cross_entropy,
    coco_pseudo_label_masks,
    code_consistency,
    keep_max,
    mask_consistency,
    multilabel_soft_margin,
    pseudo_label_masks,
    slrnet_objective,
    weighted_bce_with_logits,
)
from slr_jax.models import build_model, variable_shapes

torch = pytest.importorskip("torch")
F = torch.nn.functional
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_pamr import torch_pamr  # noqa: E402  (one torch PAMR for both files)

IGNORE = 255


# ----------------------------------------------------------------------------------- helpers
def nchw(x):
    x = np.asarray(x)
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))


def nhwc(t):
    x = t.detach().numpy()
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def random_probs(rng, shape, sharpness=3.0):
    logits = sharpness * rng.normal(size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- torch side
def torch_pseudo(masks, cutoff_top, cutoff_low, bg_scale):
    """Per-class threshold max(scale * spatial max, cutoff_low); multiply-claimed pixels -> none."""
    peak = masks.amax(dim=(2, 3), keepdim=True)
    scale = torch.full_like(peak, cutoff_top)
    scale[:, 0] = bg_scale
    above = (masks > torch.clamp(peak * scale, min=cutoff_low)).float()
    return above * (above.sum(dim=1, keepdim=True) < 2).float()


def torch_coco_pseudo(masks, cutoff_top, cutoff_low):
    norm = masks / (masks.amax(dim=(2, 3), keepdim=True) + 1e-6)
    fg = (norm[:, 1:] > cutoff_top).float()
    bg = ((norm[:, 1:] > cutoff_low).sum(dim=1, keepdim=True) == 0).float()
    pseudo = torch.cat([bg, fg], dim=1)
    return pseudo * (pseudo.sum(dim=1, keepdim=True) < 2).float()


def torch_balanced_ce(logits, pseudo, labels=None):
    """Per-image class-balanced CE (B,); ``labels`` given -> zero for images whose pseudo mask
    does not hold exactly the labelled classes + background."""
    logits = F.interpolate(logits, size=pseudo.shape[-2:], mode="bilinear", align_corners=True)
    target = pseudo.argmax(dim=1)
    target[pseudo.sum(dim=1) == 0] = IGNORE
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    count = pseudo.sum(dim=(2, 3))  # (B, C)
    total = count.sum(dim=1, keepdim=True)
    weight = torch.einsum("bchw,bc->bhw", pseudo, (total - count) / (total + 1.0))
    loss = (weight * ce).flatten(1).mean(dim=1)
    if labels is not None:
        keep = (count > 0).sum(dim=1) == labels.sum(dim=1) + 1
        loss = loss * keep.float()
    return loss


def torch_keep_max(x):
    return x * (x == x.amax(dim=1, keepdim=True)).float()


def torch_mask_consistency(m1, m2, labels=None):
    diff = (m1[:, 1:] - m2[:, 1:]).abs()
    return (diff * labels[:, :, None, None] if labels is not None else diff).mean()


def torch_code_consistency(c1, c2):
    return (torch_keep_max(c1) - torch_keep_max(c2)).abs().mean()


def torch_objective(out, batch, cfg, variant, seg_weight, pseudo=None):
    """The whole objective from NCHW torch outputs. ``pseudo`` (if given) replaces the computed
    pseudo labels in the CE terms (both are returned)."""
    labels = torch.from_numpy(batch["labels"])
    c_cls, c_mask, c_code, c_seg = cfg.loss_coeff
    aux_w = cfg.aux_weight
    is_labeled = torch.from_numpy(batch["is_labeled"])
    semi = variant in ("semi", "semi_wo_cls")

    masks = (out["masks"] + out["masks2"]) / 2.0
    if variant == "semi_wo_cls":
        masks = torch.cat([masks[:, :1] ** cfg.pamr_bg_pow, masks[:, 1:]], dim=1)
    raw = F.interpolate(
        nchw(batch["raw_image"]), size=masks.shape[-2:], mode="bilinear", align_corners=True
    )
    refined = torch_pamr(raw, masks, cfg.pamr_iters, tuple(cfg.pamr_dilations))
    full = batch["image"].shape[1:3]
    cam = F.interpolate(masks, size=full, mode="bilinear", align_corners=True)
    refined = F.interpolate(refined, size=full, mode="bilinear", align_corners=True)
    if variant != "semi_wo_cls":
        keep = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[:, :, None, None]
        cam, refined = cam * keep, refined * keep
    if variant == "coco":
        computed = torch_coco_pseudo(refined, cfg.cutoff_top, cfg.cutoff_low)
    else:
        computed = torch_pseudo(refined, cfg.cutoff_top, cfg.cutoff_low, cfg.bg_scale)
    if semi:
        gt = torch.from_numpy(batch["mask"]).long()
        onehot = F.one_hot(torch.where(gt == IGNORE, 0, gt), masks.shape[1]).permute(0, 3, 1, 2)
        onehot = onehot.float() * (gt != IGNORE)[:, None].float()
        computed[is_labeled] = onehot[is_labeled]
    target = computed if pseudo is None else pseudo

    ce_labels = None if variant == "semi_wo_cls" else labels
    seg = torch_balanced_ce(out["logits"], target, ce_labels)
    seg = seg + torch_balanced_ce(out["logits2"], target, ce_labels)
    seg = seg + aux_w * torch_balanced_ce(out["aux_logits"], target, ce_labels)

    if variant == "coco":
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32) * cfg.pos_weight
        bce = lambda s: F.binary_cross_entropy_with_logits(s, labels, pos_weight=weights)
        cls = bce(out["cls"]) + bce(out["cls2"]) + aux_w * bce(out["cls_aux"])
    elif variant == "semi_wo_cls":
        cls = (seg * is_labeled.float()).mean()
    else:
        mlsm = torch.nn.MultiLabelSoftMarginLoss(reduction="none")
        cls = mlsm(out["cls"], labels) + mlsm(out["cls2"], labels)
        cls = cls + aux_w * mlsm(out["cls_aux"], labels)
        if semi:
            cls = torch.where(is_labeled, seg, cls)
        cls = cls.mean()

    mask_term = torch_mask_consistency(
        out["masks"], out["masks2"], None if variant == "semi_wo_cls" else labels
    )
    code_term = torch_code_consistency(out["codes"], out["codes2"])
    terms = {"cls": cls, "seg": seg.mean(), "mask_consistency": mask_term}
    terms["code_consistency"] = code_term
    total = c_cls * cls + c_mask * mask_term + c_code * code_term + c_seg * seg_weight * seg.mean()
    if semi:
        terms["seg_labeled"] = seg[is_labeled].mean()  # the reference's trainer: NaN if none
        total = total + c_seg * terms["seg_labeled"]
    terms["total"] = total
    return terms, {"cam": cam, "refined": refined, "pseudo": computed, "seg_per_image": seg}


# ------------------------------------------------------------------------- pseudo labels
PSEUDO_SETTINGS = [(0.6, 0.2, 0.7), (0.8, 0.6, 0.9), (0.3, 0.05, 0.5)]


@pytest.mark.parametrize("cutoff_top,cutoff_low,bg_scale", PSEUDO_SETTINGS)
def test_pseudo_label_masks_match_torch(cutoff_top, cutoff_low, bg_scale):
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(3, 17, 13, 6)).astype(np.float32) ** 2  # channels independent
    masks[2, ..., 3] *= 0.04  # peak below every cutoff_low: never a pseudo label
    kw = dict(cutoff_top=cutoff_top, cutoff_low=cutoff_low, bg_scale=bg_scale)
    ours = np.asarray(pseudo_label_masks(jnp.asarray(masks), **kw))
    ref = nhwc(torch_pseudo(nchw(masks), cutoff_top, cutoff_low, bg_scale))
    differ = int(np.sum(ours != ref))
    assert differ == 0, f"{differ} of {ours.size} pseudo-label entries differ from torch"
    assert set(np.unique(ours)) <= {0.0, 1.0} and np.all(ours.sum(-1) <= 1)
    # The clearing really happened here: some pixels were claimed by several classes.
    peak = masks.max(axis=(1, 2), keepdims=True)
    scale = np.array([bg_scale] + [cutoff_top] * 5, np.float32)
    claims = (masks > np.maximum(peak * scale, np.float32(cutoff_low))).sum(-1)
    assert np.sum(claims > 1) > 0 and np.all(ours.sum(-1)[claims > 1] == 0)
    assert np.all(ours.sum(-1)[claims == 1] == 1)
    assert not ours[2, ..., 3].any()


def test_pseudo_label_masks_known_answer():
    """Per-class maxima: bg 1.0 (threshold 0.7), class 1 0.5 (max(0.3, 0.2)), class 2 0.1
    (threshold floored at 0.2, so never). Pixel 2 is claimed by bg and class 1 -> cleared."""
    masks = np.array(
        [[[0.9, 0.1, 0.05], [0.2, 0.5, 0.1], [1.0, 0.35, 0.0], [0.1, 0.25, 0.1]]], np.float32
    )[:, None]  # (1, 1, 4, 3)
    pseudo = pseudo_label_masks(masks, cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)
    expected = [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    np.testing.assert_array_equal(np.asarray(pseudo)[0, 0], expected)


def test_coco_pseudo_label_masks_match_torch_and_known_answer():
    rng = np.random.default_rng(1)
    masks = rng.uniform(size=(2, 15, 11, 7)).astype(np.float32) ** 3
    for top, low in ((0.5, 0.1), (0.6, 0.3)):
        ours = np.asarray(coco_pseudo_label_masks(masks, cutoff_top=top, cutoff_low=low))
        ref = nhwc(torch_coco_pseudo(nchw(masks), top, low))
        assert int(np.sum(ours != ref)) == 0, "COCO pseudo labels differ from torch"
        assert 0 < ours[..., 0].sum() < ours[..., 0].size and np.all(ours.sum(-1) <= 1)
    # Max-normalised per class: class 1 peaks at 0.4 -> 0.3/0.4 = 0.75 > 0.5 at pixel 1; the
    # background is where no class exceeds 0.1 after normalising; pixel 2 has two classes.
    masks = np.array([[[[0.9, 0.01, 0.0], [0.2, 0.3, 0.0], [0.1, 0.4, 0.8]]]], np.float32)
    got = np.asarray(coco_pseudo_label_masks(masks, cutoff_top=0.5, cutoff_low=0.1))
    np.testing.assert_array_equal(got[0, 0], [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


# ----------------------------------------------------------------------------- balanced CE
@functools.cache
def ce_case():
    """Logits (5, 9, 8, 4) at a quarter of the pseudo-label size (5, 33, 29, 4) and labels.

    0: labels match the pseudo classes, some pixels ignored -> weight 1;
    1: class 2 labelled but absent from the pseudo mask -> weight 0;
    2: every pixel ignored;  3: background only, no labels -> all class weights 0;
    4: a single foreground class, labelled, no background -> weight 0 (bg is always counted).
    """
    rng = np.random.default_rng(2)
    b, (h, w), (big_h, big_w), c = 5, (9, 8), (33, 29), 4
    logits = (2.0 * rng.normal(size=(b, h, w, c))).astype(np.float32)
    cls = rng.integers(0, c, size=(b, big_h, big_w))
    cls[1] = np.where(cls[1] == 2, 0, cls[1])
    cls[3] = 0
    cls[4] = 3
    pseudo = np.eye(c, dtype=np.float32)[cls]
    pseudo[0, :5] = 0.0  # ignored rows
    pseudo[2] = 0.0
    labels = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]], np.float32)
    return logits, pseudo, labels


@pytest.mark.parametrize("per_image_weight", [True, False])
def test_balanced_cross_entropy_matches_torch(per_image_weight):
    logits, pseudo, labels = ce_case()
    ours = balanced_cross_entropy(logits, pseudo, labels, per_image_weight=per_image_weight)
    ref = torch_balanced_ce(
        nchw(logits), nchw(pseudo), torch.from_numpy(labels) if per_image_weight else None
    )
    assert_close(ours, ref.numpy(), 1e-5, f"balanced CE (per_image_weight={per_image_weight})")
    ours = np.asarray(ours)
    assert ours[0] > 0.1
    assert ours[2] == 0.0 and ours[3] == 0.0  # all ignored; one class has weight (n-n)/(1+n)
    if per_image_weight:
        assert ours[1] == 0.0 and ours[4] == 0.0
    else:
        assert ours[1] > 0.1 and ours[4] == 0.0


def test_balanced_cross_entropy_same_size_logits_and_gradient_match_torch():
    logits, pseudo, labels = ce_case()
    big = np.asarray(jax.image.resize(logits, pseudo.shape, "linear"))  # any full-size logits
    ours, grad = jax.value_and_grad(lambda x: jnp.sum(balanced_cross_entropy(x, pseudo, labels)))(
        big
    )
    big_t = nchw(big).requires_grad_(True)
    ref = torch_balanced_ce(big_t, nchw(pseudo), torch.from_numpy(labels)).sum()
    ref.backward()
    assert_close(ours, ref.item(), 1e-5, "balanced CE at full size")
    assert_close(grad, nhwc(big_t.grad), 1e-5, "d balanced CE / d logits")
    # Zero-weight images (1: labelled class missing, 2: all ignored, 3: one class, 4: no bg)
    # get exactly zero gradient, and nothing is NaN.
    grad = np.asarray(grad)
    assert np.all(grad[1:] == 0.0) and np.any(grad[0] != 0.0)


def test_balanced_cross_entropy_needs_labels_for_per_image_weight():
    logits, pseudo, _ = ce_case()
    with pytest.raises(ValueError, match="needs image labels"):
        balanced_cross_entropy(logits, pseudo, None)


# ------------------------------------------------------------------- classification terms
def test_multilabel_soft_margin_matches_torch():
    rng = np.random.default_rng(3)
    scores = (4.0 * rng.normal(size=(6, 20))).astype(np.float32)
    scores[0, :4] = [80.0, -80.0, 80.0, -80.0]  # saturated, right and wrong
    labels = (rng.uniform(size=(6, 20)) < 0.3).astype(np.float32)
    labels[0, :4] = [1, 0, 0, 1]
    ref = torch.nn.MultiLabelSoftMarginLoss(reduction="none")(
        torch.from_numpy(scores), torch.from_numpy(labels)
    )
    assert_close(multilabel_soft_margin(scores, labels), ref.numpy(), 1e-6, "multilabel margin")


def test_weighted_bce_with_logits_matches_torch():
    rng = np.random.default_rng(4)
    scores = (3.0 * rng.normal(size=(4, 80))).astype(np.float32)
    labels = (rng.uniform(size=(4, 80)) < 0.1).astype(np.float32)
    class_weights = rng.uniform(0.05, 2.6, size=80).astype(np.float32)
    for pos_weight in (class_weights * 10.0, np.full(80, 10.0, np.float32), np.ones(80)):
        ref = F.binary_cross_entropy_with_logits(
            torch.from_numpy(scores), torch.from_numpy(labels), pos_weight=torch.tensor(pos_weight)
        )
        ours = weighted_bce_with_logits(scores, labels, jnp.asarray(pos_weight, jnp.float32))
        assert_close(ours, ref.item(), 1e-6, "weighted BCE")
    scalar = weighted_bce_with_logits(scores, labels, 10.0)
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(scores), torch.from_numpy(labels), pos_weight=torch.full((80,), 10.0)
    )
    assert_close(scalar, ref.item(), 1e-6, "weighted BCE, scalar pos_weight")


# ---------------------------------------------------------------------- consistency terms
def test_keep_max_ties_keep_every_maximum():
    """Exact ties keep all tied entries (with their value), like the reference's
    ``max_onehot`` (``x[x != max] = 0``); ``argmax``-style one-hot would keep only the first."""
    x = np.array([[0.2, 0.5, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3], [0.0, 0.1, 0.9, 0.0]], np.float32)
    got = np.asarray(keep_max(x))
    expected = np.array([[0, 0.5, 0.5, 0], [0.3, 0.3, 0.3, 0.3], [0, 0, 0.9, 0]], np.float32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(keep_max(x.T, axis=0)), got.T)


def test_consistency_terms_match_torch():
    rng = np.random.default_rng(5)
    b, h, w, c = 3, 9, 7, 6
    m1, m2 = random_probs(rng, (b, h, w, c)), random_probs(rng, (b, h, w, c))
    c1, c2 = random_probs(rng, (b, h, w, c), 1.0), random_probs(rng, (b, h, w, c), 1.0)
    c2[0, 0, 0] = c2[0, 0, 1] = [0.25, 0.25, 0.1, 0.1, 0.2, 0.1]  # an exact tie
    labels = (rng.uniform(size=(b, c - 1)) < 0.5).astype(np.float32)
    lt = torch.from_numpy(labels)
    assert_close(
        mask_consistency(m1, m2, labels),
        torch_mask_consistency(nchw(m1), nchw(m2), lt).item(),
        1e-6,
        "mask consistency with labels",
    )
    assert_close(
        mask_consistency(m1, m2, None),
        torch_mask_consistency(nchw(m1), nchw(m2)).item(),
        1e-6,
        "mask consistency",
    )
    assert_close(keep_max(c2), nhwc(torch_keep_max(nchw(c2))), 0.0, "keep_max")
    assert_close(
        code_consistency(c1, c2),
        torch_code_consistency(nchw(c1), nchw(c2)).item(),
        1e-6,
        "code consistency",
    )
    # Gradient of the code term flows to the kept maxima only.
    grad = np.asarray(jax.grad(lambda x: code_consistency(x, c2))(c1))
    c1_t = nchw(c1).requires_grad_(True)
    torch_code_consistency(c1_t, nchw(c2)).backward()
    assert_close(grad, nhwc(c1_t.grad), 1e-6, "d code consistency / d codes")


# ---------------------------------------------------------------- reference's own functions
def _reference_module(reference_repo, name):
    root = str(reference_repo)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot compare
        pytest.skip(f"could not import {name} from {root}: {err!r}")


def test_pseudo_labels_and_ce_match_reference_functions(reference_repo):
    wsss = _reference_module(reference_repo, "models.single_stage")
    wo_cls = _reference_module(reference_repo, "models.slrnet_semi_wo_cls")
    coco = _reference_module(reference_repo, "models.slrnet_coco_pseudo")
    rng = np.random.default_rng(6)
    masks = rng.uniform(size=(3, 17, 13, 5)).astype(np.float32) ** 2
    cases = [
        (wsss.pseudo_gtmask(nchw(masks)),  # defaults 0.6 / 0.2, background x0.7
         pseudo_label_masks(masks, cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)),
        (wo_cls.pseudo_gtmask(nchw(masks), cutoff_top=0.8, cutoff_low=0.6),
         pseudo_label_masks(masks, cutoff_top=0.8, cutoff_low=0.6, bg_scale=0.9)),
        (coco.pseudo_gtmask(nchw(masks).clone(), cutoff_top=0.5, cutoff_low=0.1),
         coco_pseudo_label_masks(masks, cutoff_top=0.5, cutoff_low=0.1)),
    ]  # fmt: skip
    for i, (ref, ours) in enumerate(cases):
        differ = int(np.sum(np.asarray(ours) != nhwc(ref)))
        assert differ == 0, f"case {i}: {differ} pseudo-label entries differ from the reference"

    logits, pseudo, labels = ce_case()
    with torch.no_grad():
        ref_w = wsss.balanced_mask_loss_ce(nchw(logits), nchw(pseudo), torch.from_numpy(labels))
        ref_u = wo_cls.balanced_mask_loss_ce(nchw(logits), nchw(pseudo))
    assert_close(balanced_cross_entropy(logits, pseudo, labels), ref_w.numpy(), 1e-5, "CE ref")
    ours_u = balanced_cross_entropy(logits, pseudo, None, per_image_weight=False)
    assert_close(ours_u, ref_u.numpy(), 1e-5, "CE (semi_wo_cls) vs reference")

    codes = random_probs(rng, (2, 5, 4, 6), 1.0)
    codes[0, 0, 0] = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]
    max_onehot = _reference_module(reference_repo, "models.slrnet").max_onehot
    assert_close(keep_max(codes), nhwc(max_onehot(nchw(codes))), 0.0, "keep_max vs max_onehot")


# --------------------------------------------------------------- the objective, tiny model
WIDTH, NUM_CLASSES, CROP, BATCH = 0.0625, 5, 33, 2
# Parameters downstream of the (detached) dictionary initialisation: along them the gradient
# is the full derivative, so finite differences can check it (see test_gradient_*).
HEAD = ("factorization_reconstruction", "shallow_mask", "last_conv")
TERMS = ("cls", "mask_consistency", "code_consistency", "seg")


def loss_config(variant: str) -> ml_collections.ConfigDict:
    """Reference settings per variant; PAMR shortened (it is tested on its own in test_pamr)."""
    cfg = common.get_config().loss
    cfg.update(pamr_iters=3, pamr_dilations=(1, 2))
    if variant == "semi_wo_cls":
        cfg.update(cutoff_top=0.8, cutoff_low=0.6, bg_scale=0.9)
    if variant == "coco":
        # Reference cutoffs are 0.5 / 0.1; the untrained network's masks are so broad that no
        # pixel would be background at 0.1 and every image would get CE weight 0.
        cfg.update(cutoff_top=0.5, cutoff_low=0.3, pos_weight=10.0)
        cfg.update(class_weights=(0.06, 0.94, 1.3, 2.6))
    return cfg


def random_variables(shapes, seed=0):
    """He-scaled kernels, small biases, BatchNorm scales/variances in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    out = {}
    for collection, tree in shapes.items():
        flat = {}
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            if path[-1] == "kernel":
                value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            elif path[-1] in ("scale", "var"):
                value = rng.uniform(0.5, 1.5, size=leaf.shape)
            else:
                value = 0.1 * rng.normal(size=leaf.shape)
            flat[path] = jnp.asarray(value, jnp.float32)
        out[collection] = traverse_util.unflatten_dict(flat)
    return out


def synthetic_batch(seed=0):
    """Image 0: classes 1 and 3, pixel-labelled (for the semi variants); image 1: class 2."""
    rng = np.random.default_rng(seed)
    mask = np.full((BATCH, CROP, CROP), IGNORE, np.int32)
    mask[0, 4:] = 0
    mask[0, 8:20, 5:15] = 1
    mask[0, 18:30, 16:30] = 3
    labels = np.zeros((BATCH, NUM_CLASSES - 1), np.float32)
    labels[0, [0, 2]] = 1.0
    labels[1, 1] = 1.0
    return {
        "image": rng.normal(size=(BATCH, CROP, CROP, 3)).astype(np.float32),
        "raw_image": rng.uniform(size=(BATCH, CROP, CROP, 3)).astype(np.float32),
        "labels": labels,
        "mask": mask,
        "is_labeled": np.array([True, False]),
    }


class TinyModel:
    """A width-1/16 SLRNet, a batch, and one jitted ``value_and_grad`` w.r.t. the head params.

    ``self(head, mix, seg_weight)`` differentiates ``mix . (total, *TERMS)`` of the wsss
    objective and also returns the model outputs, the terms and the pseudo labels; ``traces``
    counts its traces. The network runs in float32 as in training; the objective runs in
    float64 on its (float32) outputs, so finite differences of the loss are not drowned in
    float32 rounding of the pixel sums.
    """

    def __init__(self):
        model_cfg = common.get_config().model
        model_cfg.update(width=WIDTH, num_classes=NUM_CLASSES)
        self.model = build_model(model_cfg)
        variables = random_variables(variable_shapes(self.model))
        self.head = {k: v for k, v in variables["params"].items() if k in HEAD}
        self.rest = {k: v for k, v in variables["params"].items() if k not in HEAD}
        self.batch_stats = variables["batch_stats"]
        self.batch = synthetic_batch()
        self.rngs = {"dropout": jax.random.key(1), "gate": jax.random.key(2)}
        self.traces = 0
        self.value_and_grad = jax.jit(jax.value_and_grad(self._loss, has_aux=True))

    def _loss(self, head, mix, seg_weight):
        self.traces += 1
        outputs, _ = self.model.apply(
            {"params": {**head, **self.rest}, "batch_stats": self.batch_stats},
            self.batch["image"], mode="train", train=True, rngs=self.rngs,
            mutable=["batch_stats"],
        )  # fmt: skip
        outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}
        total, terms, visuals = slrnet_objective(
            {k: v.astype(jnp.float64) for k, v in outputs.items()}, self.batch,
            loss_cfg=loss_config("wsss"), variant="wsss", seg_weight=seg_weight,
        )  # fmt: skip
        values = jnp.stack([total] + [terms[k] for k in TERMS])
        return jnp.dot(mix, values), (outputs, terms, visuals["pseudo"])

    def __call__(self, head=None, mix=(1.0, 0, 0, 0, 0), seg_weight=1.0):
        with jax.enable_x64(True):
            return self.value_and_grad(
                self.head if head is None else head,
                jnp.asarray(mix, jnp.float64),
                jnp.asarray(seg_weight, jnp.float64),
            )


@pytest.fixture(scope="module")
def tiny():
    return TinyModel()


@pytest.fixture(scope="module")
def tiny_outputs(tiny):
    (_, (outputs, _, _)), _ = tiny()
    return {k: np.asarray(v) for k, v in outputs.items()}


def variant_outputs(outputs, variant):
    out = dict(outputs)
    if variant == "semi_wo_cls":  # that model has no class scores; its cls* are ones
        for k in ("cls", "cls2", "cls_aux"):
            out[k] = jnp.ones_like(out[k])
    return out


VARIANTS = ("wsss", "semi", "semi_wo_cls", "coco")
_objective_traces = []


@jax.jit
def all_objectives(outputs, batch, seg_weight):
    """``slrnet_objective`` of every variant in one compiled function (XLA shares their
    common parts, which compiles about three times faster than four functions)."""
    _objective_traces.append(1)
    return {
        v: slrnet_objective(
            variant_outputs(outputs, v), batch, loss_cfg=loss_config(v), variant=v,
            seg_weight=seg_weight,
        )
        for v in VARIANTS
    }  # fmt: skip


@pytest.fixture(scope="module")
def objectives(tiny_outputs):
    """Every variant's objective at seg_weight 1 and 0."""
    batch = synthetic_batch()
    return {w: all_objectives(tiny_outputs, batch, jnp.float32(w)) for w in (1.0, 0.0)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_matches_torch_and_weighted_sum(tiny_outputs, objectives, variant):
    cfg = loss_config(variant)
    outputs, batch = variant_outputs(tiny_outputs, variant), synthetic_batch()
    total, terms, visuals = objectives[1.0][variant]
    total0, terms0, _ = objectives[0.0][variant]
    assert len(_objective_traces) == 1, "changing seg_weight recompiled the objective"
    terms, terms0 = jax.tree.map(float, terms), jax.tree.map(float, terms0)
    for name, value in {**terms, **terms0, "total0": float(total0)}.items():
        assert np.isfinite(value), f"{variant}: {name} = {value}"

    # seg_weight only scales the seg term; the documented weighted sum gives the total.
    c_cls, c_mask, c_code, c_seg = cfg.loss_coeff
    assert {k: v for k, v in terms.items() if k != "total"} == {
        k: v for k, v in terms0.items() if k != "total"
    }
    semi_part = c_seg * terms["seg_labeled"] if variant in ("semi", "semi_wo_cls") else 0.0
    expected0 = (
        c_cls * terms["cls"] + c_mask * terms["mask_consistency"]
        + c_code * terms["code_consistency"] + semi_part
    )  # fmt: skip
    assert_close(float(total0), expected0, 1e-6, f"{variant}: total at seg_weight 0")
    assert_close(float(total), expected0 + c_seg * terms["seg"], 1e-6, f"{variant}: total")
    assert terms["total"] == float(total)
    assert terms["seg"] > 0.0, f"{variant}: no image contributes a seg loss; weak test data"
    if variant in ("semi", "semi_wo_cls"):  # image 0's ground truth replaced its pseudo label
        truth = (batch["mask"][0][..., None] == np.arange(NUM_CLASSES)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(visuals["pseudo"])[0], truth)
        assert terms["seg_labeled"] > 0.0

    # Independent torch evaluation from the same network outputs.
    out_t = {k: nchw(np.asarray(v)) for k, v in outputs.items()}
    _, ref_vis = torch_objective(out_t, batch, cfg, variant, 1.0)
    assert_close(visuals["cam"], nhwc(ref_vis["cam"]), 1e-5, f"{variant}: cam")
    assert_close(visuals["refined"], nhwc(ref_vis["refined"]), 1e-5, f"{variant}: refined")
    ours_pseudo, ref_pseudo = np.asarray(visuals["pseudo"]), nhwc(ref_vis["pseudo"])
    differ = np.any(ours_pseudo != ref_pseudo, axis=-1)
    # Threshold decisions may only differ where the refined value sits on a threshold.
    refined = nhwc(ref_vis["refined"])
    if variant != "coco":
        peak = refined.max(axis=(1, 2), keepdims=True)
        scale = np.array([cfg.bg_scale] + [cfg.cutoff_top] * (NUM_CLASSES - 1), np.float32)
        gap = np.abs(refined - np.maximum(peak * scale, cfg.cutoff_low)).min(-1)
        assert np.all(gap[differ] < 1e-5), f"{variant}: {differ.sum()} pseudo labels differ"
    else:
        assert not differ.any(), f"{variant}: {differ.sum()} pseudo labels differ"
    ref_terms, ref_vis = torch_objective(out_t, batch, cfg, variant, 1.0, pseudo=nchw(ours_pseudo))
    for name, ref in ref_terms.items():
        assert_close(terms[name], ref.item(), 1e-5, f"{variant}: term {name}", atol=1e-7)
    assert_close(visuals["seg_per_image"], ref_vis["seg_per_image"].numpy(), 1e-5,
                 f"{variant}: seg loss per image", atol=1e-7)  # fmt: skip


def test_objective_rejects_unknown_variant_and_bad_class_weights(tiny_outputs):
    batch = synthetic_batch()
    with pytest.raises(ValueError, match="unknown loss variant 'wss'"):
        slrnet_objective(tiny_outputs, batch, loss_cfg=loss_config("wsss"), variant="wss",
                         seg_weight=1.0)  # fmt: skip
    cfg = loss_config("coco")
    cfg.class_weights = (1.0, 2.0)
    with pytest.raises(ValueError, match="one weight per foreground class"):
        slrnet_objective(tiny_outputs, batch, loss_cfg=cfg, variant="coco", seg_weight=1.0)


def test_semi_objective_without_labelled_examples_is_finite(tiny_outputs, objectives):
    """The reference's trainer averages the labelled seg losses of an empty set (NaN); here the
    term is 0 and the rest of the objective is unchanged."""
    batch = dict(synthetic_batch(), is_labeled=np.array([False, False]))
    total, terms, visuals = all_objectives(tiny_outputs, batch, jnp.float32(1.0))["semi"]
    assert len(_objective_traces) == 1
    out_t, pseudo = {k: nchw(v) for k, v in tiny_outputs.items()}, nchw(visuals["pseudo"])
    ref, _ = torch_objective(out_t, batch, loss_config("semi"), "semi", 1.0, pseudo=pseudo)
    assert float(terms["seg_labeled"]) == 0.0 and np.isnan(ref["seg_labeled"].item())
    expected = ref["cls"] + 4.0 * ref["mask_consistency"] + 4.0 * ref["code_consistency"]
    expected = expected + 1.0 * ref["seg"]
    assert_close(float(total), expected.item(), 1e-5, "semi total without labelled examples")


def test_seg_weight_is_traced_by_the_training_gradient(tiny):
    (total1, (_, terms1, _)), grad1 = tiny(seg_weight=1.0)
    (total0, (_, terms0, _)), grad0 = tiny(seg_weight=0.0)
    assert tiny.traces == 1, f"value_and_grad traced {tiny.traces} times"
    assert_close(float(total1 - total0), float(terms1["seg"]), 1e-12, "total(1) - total(0)")
    assert float(terms0["seg"]) == float(terms1["seg"]) > 0.0
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(grad1), jax.tree.leaves(grad0)))


def _decisions(aux):
    """The piecewise-constant choices inside the loss: pseudo labels and code maxima."""
    outputs, _, pseudo = aux
    codes = [np.asarray(keep_max(outputs[k]) != 0) for k in ("codes", "codes2")]
    return [np.asarray(pseudo), *codes]


def test_gradient_matches_finite_differences(tiny):
    """jax.grad of the wsss total (seg term on) and of each term, along a random unit direction
    over the head parameters, vs central differences; float32 network, float64 objective.

    Only parameters downstream of the dictionary initialisation are perturbed: the reference
    detaches that initialisation, so along backbone/ASPP/aux directions the gradient (rightly)
    is not the derivative of the loss. Pseudo labels and code maxima are piecewise constant
    (no gradient by design): the step is the largest of a few for which none of them changes.
    The float32 network's rounding limits the agreement to about 1e-3..2e-2 (measured), hence
    the 5% tolerance; a missing path, sign or weight in any term is far outside it.
    """
    rng = np.random.default_rng(7)
    leaves, treedef = jax.tree.flatten(tiny.head)
    direction = [rng.normal(size=x.shape) for x in leaves]
    norm = np.sqrt(sum(np.sum(d * d) for d in direction))
    (_, aux), _ = tiny()
    base = _decisions(aux)
    for eps in (2e-3, 1e-3, 5e-4):
        plus = [np.asarray(x + eps * d / norm, np.float32) for x, d in zip(leaves, direction)]
        minus = [np.asarray(x - eps * d / norm, np.float32) for x, d in zip(leaves, direction)]
        (_, aux_p), _ = tiny(jax.tree.unflatten(treedef, plus))
        (_, aux_m), _ = tiny(jax.tree.unflatten(treedef, minus))
        if all(np.array_equal(a, b) and np.array_equal(a, c)
               for a, b, c in zip(base, _decisions(aux_p), _decisions(aux_m))):  # fmt: skip
            break
    else:
        pytest.fail("pseudo labels or code maxima change within 5e-4 of the parameters")
    step = [p.astype(np.float64) - m for p, m in zip(plus, minus)]  # the float32 step taken
    for i, name in enumerate(("total",) + TERMS):
        (value, _), grad = tiny(mix=np.eye(len(TERMS) + 1)[i])
        analytic = sum(np.sum(g * s) for g, s in zip(jax.tree.leaves(grad), step)) / (2 * eps)
        numeric = (float(aux_p[1][name]) - float(aux_m[1][name])) / (2 * eps)
        err = abs(numeric - analytic)
        assert err < 0.05 * abs(analytic), (
            f"{name} = {float(value):.4g}: directional derivative {analytic:.6g} vs finite "
            f"difference {numeric:.6g} (step {eps:g}); |a-b| = {err:.3g}, "
            f"rel err {err / abs(analytic):.3g}"
        )


def test_loss_decreases_under_sgd(tiny):
    """Eight plain SGD steps (lr 0.01) on the head parameters, seg term on: finite terms and a
    total that falls at every step (the pseudo labels are recomputed each time)."""
    head, values = tiny.head, []
    for _ in range(8):
        (value, (_, terms, _)), grad = tiny(head)
        assert all(np.isfinite(float(v)) for v in terms.values()), terms
        values.append(float(value))
        head = jax.tree.map(lambda p, g: p - 0.01 * g, head, grad)
    assert all(b < a for a, b in zip(values, values[1:])), f"loss went up: {values}"
    assert values[-1] < 0.95 * values[0], f"loss barely moved: {values}"
