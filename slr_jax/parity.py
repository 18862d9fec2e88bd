"""Numerical parity with the official PyTorch SLRNet, from a checkout the user names.

``python -m slr_jax.parity --reference-repo PATH [--setting wsss] [--crop 161] [--batch 2]
[--seed 0] [--tie-eps 1e-6] [--no-grads] [--dtype float32|bfloat16] [--scales 1,1.5,2,0.5,0.75]
[--json FILE]``

Imports the reference's model class from ``PATH`` (never vendored), builds it with random
weights (BatchNorm statistics and affine parameters randomised too, so no layer is an
identity), converts them with ``slr_jax.convert`` and runs both frameworks on the same random
input in deterministic mode (PyTorch ``eval()``, Flax ``train=False``). Compared, as max |a-b|
and relative L2 error ||a-b|| / ||b||:

- single-scale and two-view test class scores and masks;
- the full multi-scale + flip inference of one photo (``slr_jax.infer.multiscale_predict``
  against the reference's procedure, masks averaged at the photo's size, before CRF);
- the training forward's codes (both views) and dictionary, captured from the reference's
  ``factorization_reconstruction``, and its pseudo labels;
- every loss term and the weighted total, with the seg term on (after pretraining) and, for
  the semi settings, the trainer's extra mean seg loss of pixel-labelled examples;
- the code-consistency term without near-tie pixels (``TIE_EPS``), see below;
- gradients w.r.t. every trainable parameter (frozen ones excluded as in the reference), as
  the worst leaf by name: of the total (PyTorch ``.grad`` after ``backward()``), of the total
  without the code term, and of the tie-free code term.

Near ties: the code-consistency term keeps each pixel's largest code. Where the two largest
codes differ by less than float32 rounding, the two frameworks may keep different atoms, so
the raw term and the gradient of the total can differ by more than rounding. Those two rows
are reported as ``tie-limited`` (not failing) when tie pixels exist and both the tie-free term
and the gradient without the code term pass. The gradient of the tie-free code term is an
``info`` row (reported, not judged).

Float32 rounding: a gradient leaf that sums over many pixels (e.g. a head BatchNorm's scale)
can differ between two float32 implementations by ~1e-4 relative from summation order alone.
The reference is therefore also run in float64 (without the code term, whose argmax is
tie-prone): per leaf, JAX's float32 gradient must be within max(1e-4, 2 x PyTorch float32's
own error) of the float64 one. When it is, an excess of the fp32-vs-fp32 row is reported as
``rounding-limited`` (not failing).

Exit status 1 when a row fails (outputs and losses 1e-5, gradients 1e-4, relative).
Needs ``torch`` (CPU is enough).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slr_jax import convert
from slr_jax.losses import keep_max, slrnet_objective
from slr_jax.models import SLRNet, variable_shapes

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
OUTPUT_TOL = 1e-5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
TIE_EPS = 1e-6
DEFAULT_SCALES = (1.0, 1.5, 2.0, 0.5, 0.75)  # configs/common.py VOC_TEST_SCALES
LOSS_COEFF = (1.0, 4.0, 4.0, 1.0)
CLASSIFIER_SCALE = 4.0
CLASSIFIER_BIAS = -2.0

# setting -> (reference module, reference constructor kwargs, our loss config overrides)
SETTINGS = {
    "wsss": ("models.slrnet", {}, dict(cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)),
    "semi": ("models.slrnet_semi", {}, dict(cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)),
    "semi_wo_cls": (
        "models.slrnet_semi_wo_cls",
        dict(cutoff_top=0.8, cutoff_low=0.6),
        dict(cutoff_top=0.8, cutoff_low=0.6, bg_scale=0.9),
    ),
    "coco": (
        "models.slrnet_coco_pseudo",
        dict(num_classes=81, cutoff_top=0.5, cutoff_low=0.1, pos_weight=10.0),
        dict(cutoff_top=0.5, cutoff_low=0.1, bg_scale=0.7, pos_weight=10.0),
    ),
}


# Row kinds: "check" rows decide the exit status; "tie-limited" and "rounding-limited" rows are
# checks whose excess is explained by argmax near-ties or by float32 rounding (see the module
# docstring); "info" rows are never judged.
CHECK, TIE_LIMITED, ROUNDING_LIMITED, INFO = "check", "tie-limited", "rounding-limited", "info"
LIMITED_KINDS = (TIE_LIMITED, ROUNDING_LIMITED)


@dataclass
class Row:
    name: str
    max_abs: float
    rel: float
    tol: float
    note: str = ""
    kind: str = CHECK

    @property
    def within_tol(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)

    @property
    def passed(self) -> bool:
        return self.kind != CHECK or self.within_tol

    @property
    def status(self) -> str:
        if self.kind == INFO:
            return "info"
        if self.within_tol:
            return "pass"
        return self.kind if self.kind in LIMITED_KINDS else "FAIL"


def compare(name: str, ours, theirs, tol: float, note: str = "") -> Row:
    a = np.asarray(ours, np.float64)
    b = np.asarray(theirs, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape {a.shape} (JAX) vs {b.shape} (PyTorch)")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    norm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(a - b) / norm) if norm > 0 else diff
    return Row(name, diff, rel, tol, note)


def load_reference(repo: str, setting: str):
    """The reference ``Net`` class of ``setting`` from the checkout at ``repo``."""
    if not os.path.isfile(os.path.join(repo, "models", "slrnet.py")):
        raise FileNotFoundError(
            f"{repo!r} is not a checkout of DesertsP/SLRNet (no models/slrnet.py); get one with "
            "`git clone https://github.com/DesertsP/SLRNet` and pass its path"
        )
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return importlib.import_module(SETTINGS[setting][0]).Net


def build_reference(repo: str, setting: str, seed: int, num_classes: int):
    import torch

    torch.manual_seed(seed)
    kwargs = dict(SETTINGS[setting][1])
    kwargs.setdefault("num_classes", num_classes)
    if setting == "coco":
        kwargs["class_weights"] = list(np.linspace(0.5, 1.5, num_classes - 1))
    net = load_reference(repo, setting)(pretrained=None, scale_factor=0.5, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(
                    0.1 * torch.randn(module.running_mean.shape, generator=gen)
                )
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                if module.weight is not None:
                    module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        # Random classifiers give near-uniform masks and trivial pseudo labels. Sharper ones,
        # as in a trained network, give pseudo labels with structure; a negative bias keeps the
        # constant background logit competitive, so that pseudo labels contain background and
        # the labelled classes and the seg loss is not zeroed by its per-image weight. (The
        # codes stay close to uniform, max ~0.053 for 21 atoms: hence the near-tie handling.)
        for classifier in (net.last_conv[8], net.aux_head[4]):
            classifier.weight.mul_(CLASSIFIER_SCALE)
            classifier.bias.fill_(CLASSIFIER_BIAS)
    net.eval()  # the reference's train() override also sets requires_grad of frozen layers
    return net, kwargs


def make_inputs(setting: str, batch: int, crop: int, num_classes: int, seed: int) -> dict:
    """Random NumPy batch in our layout (NHWC) without labels (see ``add_labels``)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 1, (batch, crop, crop, 3)).astype(np.float32)
    # Smooth the raw image a little so PAMR sees structure rather than pure noise.
    raw = (raw + np.roll(raw, 1, 1) + np.roll(raw, 1, 2)) / 3.0
    image = (raw - IMAGENET_MEAN) / IMAGENET_STD
    return dict(image=image, raw_image=raw)


def add_labels(inputs: dict, setting: str, class_peaks: np.ndarray) -> dict:
    """Image labels: the 1 or 2 foreground classes the network predicts most strongly
    (``class_peaks`` (B, C-1), the spatial max of its test masks), so that pseudo labels contain
    every labelled class and the seg loss is not zeroed by its per-image weight. For the semi
    settings every other example is pixel-labelled with blocks of its classes."""
    batch, crop = inputs["image"].shape[:2]
    labels = np.zeros_like(class_peaks, dtype=np.float32)
    mask = np.full((batch, crop, crop), 255, np.int32)
    for i in range(batch):
        classes = np.argsort(-class_peaks[i])[: 1 + i % 2]
        labels[i, classes] = 1
        m = np.zeros((crop, crop), np.int32)
        for j, c in enumerate(classes):
            y0 = crop // 4 + j * crop // 4
            m[y0 : y0 + crop // 3, crop // 5 : crop // 5 + crop // 2] = c + 1
        m[: crop // 10] = 255
        mask[i] = m
    semi = setting in ("semi", "semi_wo_cls")
    is_labeled = (np.arange(batch) % 2 == 0) if semi else np.zeros(batch, bool)
    mask[~is_labeled] = 255
    return dict(inputs, labels=labels, mask=mask, is_labeled=is_labeled)


# ------------------------------------------------------------------------------ near ties
def top2_gap(codes) -> np.ndarray:
    """Gap between the largest and second largest code, (...,) from codes (..., K)."""
    codes = np.asarray(codes)
    if codes.shape[-1] < 2:
        raise ValueError(f"codes need at least 2 atoms on the last axis, got shape {codes.shape}")
    top2 = -np.partition(-codes, 1, axis=-1)[..., :2]
    return top2[..., 0] - top2[..., 1]


def near_tie_mask(codes, eps: float = TIE_EPS) -> np.ndarray:
    """(...,) bool: pixels of codes (..., K) whose two largest codes differ by less than eps."""
    return top2_gap(codes) < eps


def near_ties(codes, eps: float = TIE_EPS) -> int:
    """Number of pixels of codes (..., K) whose two largest codes differ by less than eps."""
    return int(np.sum(near_tie_mask(codes, eps)))


def _near_tie_mask_jnp(codes: jax.Array, eps: float) -> jax.Array:
    top2 = jax.lax.top_k(jax.lax.stop_gradient(codes), 2)[0]
    return top2[..., 0] - top2[..., 1] < eps


def masked_code_consistency(codes: jax.Array, codes2: jax.Array, keep: jax.Array) -> jax.Array:
    """The code-consistency term over kept pixels only: mean over kept pixels (B, h, w) and
    atoms of |keep_max(c1) - keep_max(c2)|, codes (B, h, w, K); 0 when nothing is kept."""
    per_pixel = jnp.sum(jnp.abs(keep_max(codes) - keep_max(codes2)), axis=-1)
    count = jnp.sum(keep) * codes.shape[-1]
    return jnp.sum(jnp.where(keep, per_pixel, 0.0)) / jnp.maximum(count, 1)


def loss_config(setting: str, num_classes: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            loss_coeff=LOSS_COEFF, aux_weight=0.4, pamr_iters=10, pamr_bg_pow=3.0,
            pamr_dilations=(1, 2, 4, 8, 12, 24), pos_weight=1.0, class_weights=None,
        )
    )  # fmt: skip
    cfg.update(SETTINGS[setting][2])
    if setting == "coco":
        cfg.class_weights = tuple(float(w) for w in np.linspace(0.5, 1.5, num_classes - 1))
    return cfg


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# ---------------------------------------------------------------------- PyTorch side
def _torch_train(net, setting: str, inputs: dict, num_classes: int) -> dict:
    """The reference's training forward and its trainer's weighted total (seg term on), in the
    dtype of ``net``'s parameters (float32, or float64 after ``net.double()``).

    Returns the loss terms and total (with their graph), the codes of view 1 and of view 2
    resized to view 1 (B, K, h, w, with graph), the dictionary, pseudo labels and per-image seg.
    """
    import torch
    import torch.nn.functional as F

    dtype = next(net.parameters()).dtype
    x, raw = _nchw(inputs["image"]).to(dtype), _nchw(inputs["raw_image"]).to(dtype)
    labels = torch.from_numpy(inputs["labels"]).to(dtype)
    captured = {"sizes": []}
    fr = net.factorization_reconstruction
    fr_forward, backbone_forward = fr.forward, net.backbone_forward

    def capture_codes(*args, **kwargs):
        out = fr_forward(*args, **kwargs)
        captured["codes"] = out[1]  # (B, K, N1 + N2), both views side by side
        return out

    def capture_sizes(*args, **kwargs):
        out = backbone_forward(*args, **kwargs)
        captured["sizes"].append(tuple(out[0].shape[-2:]))
        return out

    # The reference calls ``factorization_reconstruction.forward(...)`` directly, which skips
    # module hooks (``register_forward_hook``); instance attributes shadow the methods instead.
    fr.forward, net.backbone_forward = capture_codes, capture_sizes
    try:
        if setting in ("semi", "semi_wo_cls"):
            indicators = torch.from_numpy(inputs["is_labeled"])
            seg_labels = torch.eq(
                torch.from_numpy(inputs["mask"]).long()[:, None],
                torch.arange(num_classes)[None, :, None, None],
            ).to(dtype)
            cls_l, seg_l, reg_l, code_l, visuals, dictionary = net(
                x, raw, labels, seg_labels, indicators
            )
        else:
            indicators = None
            cls_l, seg_l, reg_l, code_l, visuals, dictionary = net(x, raw, labels)
    finally:
        del fr.forward, net.backbone_forward

    # tools/train_voc_wss.py and tools/train_voc_semi.py after pretraining: every term is the
    # batch mean; the semi trainer adds the mean seg loss of pixel-labelled examples.
    c_cls, c_mask, c_code, c_seg = LOSS_COEFF
    terms = {
        "cls": cls_l.mean(),
        "seg": seg_l.mean(),
        "mask_consistency": reg_l.mean(),
        "code_consistency": code_l.mean(),
    }
    total = (c_cls * terms["cls"] + c_mask * terms["mask_consistency"]
             + c_code * terms["code_consistency"] + c_seg * terms["seg"])  # fmt: skip
    if indicators is not None:
        terms["seg_labeled"] = seg_l[indicators].mean()
        total = total + c_seg * terms["seg_labeled"]
    terms["total"] = total

    (h, w), (h2, w2) = captured["sizes"][:2]
    codes, codes2 = torch.split(captured["codes"], (h * w, h2 * w2), dim=-1)
    b, k = codes.shape[:2]
    codes = codes.reshape(b, k, h, w)
    codes2 = F.interpolate(
        codes2.reshape(b, k, h2, w2), size=(h, w), mode="bilinear", align_corners=True
    )
    return {
        "terms": terms,
        "codes": codes,
        "codes2": codes2,
        "dictionary": dictionary.detach().numpy(),
        "pseudo": _nhwc(visuals["pseudo"]),
        "seg_per_image": seg_l.detach().numpy(),
    }


def reference_multiscale_predict(
    net, photo: np.ndarray, scales, flip: bool = True, single_scale: bool = True, device=None
):
    """The reference's multi-scale inference of one photo (tools/infer_voc.py with its
    datasets/pascal_voc_ms_v2.py pre-processing), re-expressed: every scale is a PIL bicubic
    rescale to round(size * scale) of the uint8 photo (H, W, 3), normalised, with its mirror;
    the test forward (``single_scale``, else the two-view one); mirrored masks flipped back and
    summed; resized (align-corners) to (H, W) and averaged. ``net`` must be in ``eval()``;
    ``device``: a torch device to run on. Returns (cls (C-1,), masks (H, W, C)) in NumPy."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    height, width = photo.shape[:2]
    masks_total, cls_total = 0.0, 0.0
    with torch.no_grad():
        for scale in scales:
            size = (int(np.round(width * scale)), int(np.round(height * scale)))
            view = (
                photo
                if scale == 1
                else np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
            )
            view = (view / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            views = np.stack([view, view[:, ::-1]]) if flip else view[None]
            x = _nchw(views.astype(np.float32))
            cls, masks = net(x if device is None else x.to(device), single_scale=single_scale)
            summed = masks[0] + masks[1].flip(-1) if flip else masks[0]
            summed = F.interpolate(summed[None], (height, width), mode="bilinear",
                                   align_corners=True)[0]  # fmt: skip
            masks_total = masks_total + summed
            cls_total = cls_total + cls.mean(0)
    views_per_scale = 2 if flip else 1
    masks = masks_total / (views_per_scale * len(scales))
    cls = (cls_total / len(scales)).cpu().numpy()
    return cls, np.transpose(masks.cpu().numpy(), (1, 2, 0))


def _torch_masked_code_consistency(max_onehot, codes, codes2, keep: np.ndarray):
    """The reference's code-consistency formula (its own ``max_onehot``) over kept pixels
    (``keep`` (B, h, w) bool) only, codes (B, K, h, w)."""
    import torch

    per_pixel = torch.abs(max_onehot(codes) - max_onehot(codes2)).sum(1)
    count = max(1, int(keep.sum()) * codes.shape[1])
    return (per_pixel * torch.from_numpy(keep)).sum() / count


def _torch_grads(objective, named_params) -> dict[str, np.ndarray]:
    import torch

    grads = torch.autograd.grad(
        objective, [p for _, p in named_params], retain_graph=True, allow_unused=True
    )
    return {
        canonical_name(name): np.zeros(p.shape, np.float32) if g is None else g.numpy()
        for (name, p), g in zip(named_params, grads)
    }


# -------------------------------------------------------------------------- JAX side
def _jax_train_fn(model: SLRNet, loss_cfg, setting: str, with_grads: bool, tie_eps: float):
    """``f(params, batch_stats, batch, ref_ties) -> (aux, grads)``, to be jitted.

    Variables and batch are arguments, not closed-over constants, so XLA does not fold the
    weights into the program. ``ref_ties`` (B, h, w) bool are PyTorch's near-tie pixels; the
    tie-free code term excludes them and JAX's own. ``grads`` (None without ``with_grads``)
    are the gradients of: the total, the total without the code term, the tie-free code term.
    """
    c_code = float(loss_cfg.loss_coeff[2])

    def forward(params, batch_stats, batch, ref_ties):
        outputs = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], mode="train",
            train=False,
        )  # fmt: skip
        total, terms, visuals = slrnet_objective(
            outputs, batch, loss_cfg=loss_cfg, variant=setting, seg_weight=1.0
        )
        codes, codes2 = outputs["codes"], outputs["codes2"]
        own_ties = (_near_tie_mask_jnp(codes, tie_eps), _near_tie_mask_jnp(codes2, tie_eps))
        ties = ref_ties | own_ties[0] | own_ties[1]
        tie_free = masked_code_consistency(codes, codes2, ~ties)
        objectives = (total, total - c_code * terms["code_consistency"], c_code * tie_free)
        aux = {
            "terms": dict(terms, code_consistency_tie_free=tie_free),
            "pseudo": visuals["pseudo"],
            "codes": codes,
            "codes2": codes2,
            "dictionary": outputs["dictionary"],
            "ties": ties,
            "own_ties": own_ties,
        }
        return objectives, aux

    if not with_grads:
        return lambda *args: (forward(*args)[1], None)

    def forward_backward(params, batch_stats, batch, ref_ties):
        objectives, pullback, aux = jax.vjp(
            lambda p: forward(p, batch_stats, batch, ref_ties), params, has_aux=True
        )
        grads = []
        for i in range(len(objectives)):
            cotangent = tuple(
                jnp.ones_like(o) if j == i else jnp.zeros_like(o) for j, o in enumerate(objectives)
            )
            grads.append(pullback(cotangent)[0])
        return aux, grads

    return forward_backward


def canonical_name(name: str) -> str:
    """The reference's module path for a parameter name that goes through one of its
    ModuleList aliases (``newly_added.6.x`` -> ``factorization_reconstruction.x``)."""
    for alias, target in convert.REFERENCE_ALIASES.items():
        if name.startswith(alias):
            return target + name[len(alias) :]
    return name


def _worst_leaf(name: str, ours: dict, theirs: dict, tols: dict | None = None) -> Row:
    """Relative L2 error per leaf of ``theirs`` (name -> array; ``ours`` has the same names);
    the row of the leaf with the largest error relative to its tolerance (``tols[leaf]``,
    default ``GRAD_TOL``), named after it."""
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise RuntimeError(f"trainable PyTorch parameters without a JAX gradient: {missing}")
    worst, n_zero = None, 0
    for leaf, expected in theirs.items():
        row = compare(leaf, ours[leaf], expected, (tols or {}).get(leaf, GRAD_TOL))
        n_zero += int(not np.any(expected) and not np.any(ours[leaf]))
        if worst is None or row.rel / row.tol > worst.rel / worst.tol:
            worst = row
    worst.note = f"worst of {len(theirs)} trainable leaves ({n_zero} zero in both)"
    worst.name = f"{name} [{worst.name}]"
    return worst


def _worst_grad_row(name: str, flax_grads, ref_grads: dict[str, np.ndarray]) -> Row:
    """Relative L2 error per trainable leaf (``ref_grads`` keys are canonical names); the
    row of the worst leaf, named."""
    return _worst_leaf(name, convert.flax_to_torch({"params": flax_grads}), ref_grads)


def rounding_tolerances(ref32: dict, ref64: dict) -> dict[str, float]:
    """Per leaf: max(GRAD_TOL, 2 x the float32 reference's own relative error against the
    float64 reference), the allowance of a float32 result that is as exact as PyTorch's."""
    return {
        leaf: max(GRAD_TOL, 2.0 * compare(leaf, ref32[leaf], exact, GRAD_TOL).rel)
        for leaf, exact in ref64.items()
    }


def _torch_float64_grads(net, setting: str, inputs: dict, num_classes: int, c_code: float):
    """Gradients of the total without the code term, and pseudo labels, of the reference run
    in float64 (``net`` is converted in place: call it last)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the reference creates without a dtype
    try:
        net.double()
        ref = _torch_train(net, setting, inputs, num_classes)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        terms = ref["terms"]
        grads = _torch_grads(terms["total"] - c_code * terms["code_consistency"], named)
    finally:
        torch.set_default_dtype(previous)
    return grads, ref["pseudo"]


def _trainable_leaves_row(grads, ref_names) -> Row:
    """Whether JAX's trainable leaves (``slr_jax.optim``) are PyTorch's ``requires_grad`` ones
    (canonical ``ref_names``); max_abs and rel count the leaves trainable on one side only."""
    from slr_jax.optim import param_group_labels

    trainable = jax.tree_util.tree_map(
        lambda g, label: np.broadcast_to(label != "frozen", g.shape), grads,
        param_group_labels(grads),
    )  # fmt: skip
    ours = {k for k, v in convert.flax_to_torch({"params": trainable}).items() if v.all()}
    only = sorted(ours ^ set(ref_names))
    note = f"{len(ours)} trainable leaves in both" if not only else f"on one side only: {only}"
    return Row("grad/trainable_leaves (JAX vs PyTorch)", len(only), len(only), 0.0, note)


def _frozen_grad_norm(grads) -> float:
    from slr_jax.optim import param_group_labels

    labels = param_group_labels(grads)
    sq = jax.tree_util.tree_map(
        lambda g, lab: float(jnp.sum(g * g)) if lab == "frozen" else 0.0, grads, labels
    )
    return float(np.sqrt(sum(jax.tree_util.tree_leaves(sq))))


# ------------------------------------------------------------------------------ the run
def run(
    repo: str,
    setting: str,
    crop: int,
    batch: int,
    seed: int,
    with_grads: bool = True,
    tie_eps: float = TIE_EPS,
    dtype: str = "float32",
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> dict:
    """Builds both networks, compares them and returns the report (see ``make_report``).

    ``dtype='bfloat16'`` computes the JAX side in bfloat16 (``model.dtype``) against the
    float32 reference: a measurement of mixed precision's error, every row ``info``.
    ``scales``: those of the multi-scale inference rows (empty: no such rows)."""
    import torch

    if crop < 33 or batch < 1:
        raise ValueError(f"need crop >= 33 and batch >= 1, got crop={crop} batch={batch}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    jax.config.update("jax_default_matmul_precision", "highest")
    num_classes = 81 if setting == "coco" else 21
    net, _ = build_reference(repo, setting, seed, num_classes)
    max_onehot = importlib.import_module(SETTINGS[setting][0]).max_onehot
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    model = SLRNet(variant=setting, num_classes=num_classes, dtype=jnp.dtype(dtype))
    # COCO's ``class_weights`` buffer is a loss constant (our ``loss.class_weights``).
    state = {k: v for k, v in net.state_dict().items() if k != "class_weights"}
    variables = convert.convert_checkpoint(state, variable_shapes(model))
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    inputs = make_inputs(setting, batch, crop, num_classes, seed)
    x = _nchw(inputs["image"])
    rows: list[Row] = []
    timings = {}

    # ---- test modes
    t0 = time.time()
    with torch.no_grad():
        ref_cls, ref_masks = net(x, single_scale=True)
        ref_cls2, ref_masks2 = net(x)
    timings["torch_test_s"] = time.time() - t0
    t0 = time.time()
    test = jax.jit(model.apply, static_argnames="mode")
    ours = test(variables, inputs["image"], mode="test")
    ours2 = test(variables, inputs["image"], mode="test_two_view")
    timings["jax_test_compile_and_run_s"] = time.time() - t0
    peaks = np.max(np.asarray(ours2["masks"]), axis=(1, 2))[:, 1:]
    inputs = add_labels(inputs, setting, peaks)
    if setting != "semi_wo_cls":  # that variant's class scores are constant ones
        rows.append(compare("test/cls", ours["cls"], ref_cls.numpy(), OUTPUT_TOL))
        rows.append(compare("test_two_view/cls", ours2["cls"], ref_cls2.numpy(), OUTPUT_TOL))
    rows.append(compare("test/masks", ours["masks"], _nhwc(ref_masks), OUTPUT_TOL))
    rows.append(compare("test_two_view/masks", ours2["masks"], _nhwc(ref_masks2), OUTPUT_TOL))

    # ---- multi-scale + flip inference of one (non-square) photo, as tools/infer_voc.py
    if scales:
        from slr_jax import infer as infer_lib

        photo = np.round(255 * inputs["raw_image"][0, :, : max(33, crop * 3 // 4)])
        photo = photo.astype(np.uint8)
        t0 = time.time()
        ref_ms_cls, ref_ms_masks = reference_multiscale_predict(net, photo, scales)
        timings["torch_multiscale_s"] = time.time() - t0
        t0 = time.time()
        from configs import common

        test_cfg = common.get_config().test
        test_cfg.scales = tuple(scales)
        ms_cls, ms_masks = infer_lib.multiscale_predict(model.apply, variables, photo, test_cfg)
        timings["jax_multiscale_compile_and_run_s"] = time.time() - t0
        note = f"{photo.shape[0]}x{photo.shape[1]} photo, scales {tuple(scales)} + flips"
        if setting != "semi_wo_cls":
            rows.append(compare("infer/multiscale cls", ms_cls, ref_ms_cls, OUTPUT_TOL, note))
        rows.append(compare("infer/multiscale masks (averaged, before CRF)", ms_masks,
                            ref_ms_masks, OUTPUT_TOL, note))  # fmt: skip

    # ---- PyTorch training forward and backward
    c_code = LOSS_COEFF[2]
    t0 = time.time()
    ref = _torch_train(net, setting, inputs, num_classes)
    timings["torch_train_forward_s"] = time.time() - t0
    ref_codes, ref_codes2 = _nhwc(ref["codes"]), _nhwc(ref["codes2"])
    ref_ties = (near_tie_mask(ref_codes, tie_eps), near_tie_mask(ref_codes2, tie_eps))
    named_params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    ref_terms = ref["terms"]
    if with_grads:
        t0 = time.time()
        ref_grads_wo_code = _torch_grads(
            ref_terms["total"] - c_code * ref_terms["code_consistency"], named_params
        )
        net.zero_grad()
        ref_terms["total"].backward(retain_graph=True)
        ref_grads_total = {
            canonical_name(n): np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
            for n, p in named_params
        }
        timings["torch_two_backward_s"] = time.time() - t0

    # ---- JAX training forward (and backward)
    loss_cfg = loss_config(setting, num_classes)
    batch_j = {k: jnp.asarray(v) for k, v in inputs.items()}
    args = (variables["params"], variables["batch_stats"], batch_j,
            jnp.asarray(ref_ties[0] | ref_ties[1]))  # fmt: skip
    t0 = time.time()
    train = jax.jit(_jax_train_fn(model, loss_cfg, setting, with_grads, tie_eps))
    compiled = train.lower(*args).compile()
    timings["jax_train_compile_s"] = time.time() - t0
    t0 = time.time()
    aux, grads = jax.block_until_ready(compiled(*args))
    timings["jax_train_run_s"] = time.time() - t0
    terms = aux["terms"]

    # ---- codes, dictionary and pseudo labels
    codes_rows = [
        compare("train/codes", aux["codes"], ref_codes, OUTPUT_TOL),
        compare("train/codes2 (resized to view 1)", aux["codes2"], ref_codes2, OUTPUT_TOL),
    ]
    rows += codes_rows
    rows.append(compare("train/dictionary", aux["dictionary"], ref["dictionary"], OUTPUT_TOL))
    differing = int(np.sum(np.asarray(aux["pseudo"]) != ref["pseudo"]))
    seg_images = np.round(ref["seg_per_image"], 5).tolist()
    rows.append(compare("train/pseudo_label", aux["pseudo"], ref["pseudo"], OUTPUT_TOL,
                        f"{differing} differing entries; reference seg loss per image "
                        f"{seg_images}"))  # fmt: skip

    # ---- losses
    for name, ref_value in ref_terms.items():
        rows.append(compare(f"loss/{name}", terms[name], ref_value.detach().numpy(), LOSS_TOL))
    raw_code_row = next(r for r in rows if r.name == "loss/code_consistency")
    ties = np.asarray(aux["ties"])
    keep = ~ties
    ref_tie_free = _torch_masked_code_consistency(max_onehot, ref["codes"], ref["codes2"], keep)
    hooked = _torch_masked_code_consistency(
        max_onehot, ref["codes"], ref["codes2"], np.ones_like(keep)
    )
    hook_gap = abs(float(hooked.detach()) - float(ref_terms["code_consistency"].detach()))
    own = [int(np.sum(t)) for t in aux["own_ties"]]
    theirs = [int(np.sum(t)) for t in ref_ties]
    max_code_diff = max(r.max_abs for r in codes_rows)
    n_ties = int(np.sum(ties))
    tie_note = (
        f"{n_ties} of {ties.size} pixels excluded: top-2 code gap < {tie_eps:g} (view 1, view 2)"
        f" JAX {own}, PyTorch {theirs}; flips need gap < 2 max|codes diff| = "
        f"{2 * max_code_diff:.1e}; the hooked reference codes give the reference's term "
        f"to {hook_gap:.1e}"
    )
    tie_free_row = compare(
        "loss/code_consistency (tie-free)", terms["code_consistency_tie_free"],
        ref_tie_free.detach().numpy(), LOSS_TOL, tie_note,
    )  # fmt: skip
    rows.append(tie_free_row)
    limited = [raw_code_row]
    checks = [tie_free_row]

    # ---- gradients
    if with_grads:
        t0 = time.time()
        ref_grads_tie_free = _torch_grads(c_code * ref_tie_free, named_params)
        timings["torch_tie_free_backward_s"] = time.time() - t0
        g_total, g_wo_code, g_tie_free = grads
        c = f"{c_code:g}*code_consistency"
        total_row = _worst_grad_row("grad/total", g_total, ref_grads_total)
        ours_wo_code = convert.flax_to_torch({"params": g_wo_code})
        wo_row = _worst_leaf(f"grad/total-{c}", ours_wo_code, ref_grads_wo_code)
        tf_row = _worst_grad_row(f"grad/{c} (tie-free)", g_tie_free, ref_grads_tie_free)
        # Not part of the pass rule: this term's gradients are ~1e-3 of the total's, and on
        # such small leaves float32 accumulation alone moves them by ~1e-4 (docs/parity.md).
        tf_row.kind = INFO
        tf_row.note += "; diagnostic, not in the pass rule"
        rows += [total_row, wo_row, tf_row, _trainable_leaves_row(g_total, ref_grads_total)]
        limited.append(total_row)
        checks.append(wo_row)

        # Float32 rounding: both fp32 results against the reference run in float64.
        t0 = time.time()
        grads64, pseudo64 = _torch_float64_grads(net, setting, inputs, num_classes, c_code)
        timings["torch_float64_train_and_backward_s"] = time.time() - t0
        exact_row = _worst_leaf(f"grad/total-{c} vs PyTorch float64", ours_wo_code, grads64,
                                rounding_tolerances(ref_grads_wo_code, grads64))  # fmt: skip
        pseudo_flips = int(np.sum(pseudo64 != ref["pseudo"]))
        exact_row.note = (
            "JAX float32 vs the reference in float64, per leaf within max(1e-4, 2 x PyTorch "
            f"float32's own error); {exact_row.note}; pseudo labels float64 vs float32: "
            f"{pseudo_flips} differing entries"
        )
        floor_row = _worst_leaf(
            f"grad/total-{c}: PyTorch float32 vs float64", ref_grads_wo_code, grads64
        )
        floor_row.kind = INFO
        floor_row.note += "; the reference's own float32 rounding"
        rows += [exact_row, floor_row]
        if not wo_row.within_tol and exact_row.within_tol:
            wo_row.kind = ROUNDING_LIMITED
            wo_row.note += "; float32 rounding: JAX is as close to the float64 reference as PyTorch"
        checks.append(exact_row)
        rows.append(Row("grad/frozen_leaves_norm (JAX, ignored by optimiser)",
                        _frozen_grad_norm(g_total), 0.0, np.inf,
                        "frozen parameters get zero updates in slr_jax.optim", INFO))  # fmt: skip

    # Near ties explain the raw code term and the total's gradient only when ties exist and
    # everything that excludes them passes.
    explained = n_ties > 0 and all(r.passed for r in checks)
    for row in limited:
        if explained:
            row.kind = TIE_LIMITED
            if not row.within_tol:
                row.note = (row.note + "; " if row.note else "") + (
                    f"argmax near ties ({n_ties} pixels): the tie-free rows pass"
                )
                if any(r.kind == ROUNDING_LIMITED for r in checks):
                    row.note += " (within float32 rounding, see the float64 row)"
    if dtype != "float32":
        for row in rows:
            row.kind = INFO
            row.note = (row.note + "; " if row.note else "") + f"JAX in {dtype} (measurement)"
    meta = dict(setting=setting, crop=crop, batch=batch, seed=seed, tie_eps=tie_eps, dtype=dtype)
    return make_report(meta, rows, timings)


def make_report(meta: dict, rows: list[Row], timings: dict) -> dict:
    """The JSON-able report: ``meta`` keys, ``rows`` (with ``status`` and ``passed``),
    overall ``passed``, ``timings`` (seconds) and the machine."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        **meta,
        "rows": [dict(asdict(r), status=r.status, passed=r.passed) for r in rows],
        "passed": all(r.passed for r in rows),
        "timings": {k: round(float(v), 2) for k, v in timings.items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "torch": torch_version,
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def format_table(report: dict) -> str:
    """Plain-text table of a report from ``run`` / ``make_report``."""
    keys = ("setting", "crop", "batch", "seed", "tie_eps", "dtype")
    meta = " ".join(f"{k}={report[k]}" for k in keys if k in report)
    lines = [meta, f"{'quantity':<62} {'max |a-b|':>10} {'rel err':>10} {'tol':>7}  status"]
    for r in report["rows"]:
        lines.append(f"{r['name']:<62} {r['max_abs']:>10.3e} {r['rel']:>10.3e} {r['tol']:>7.0e}"
                     f"  {r['status']}")  # fmt: skip
        if r["note"]:
            lines.append(f"    {r['note']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """Markdown table of a report (as in docs/parity.md); notes go into the last column."""
    lines = [
        "| quantity | max abs err | rel err | tol | status | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        note = r["note"].replace("|", "\\|")
        lines.append(f"| `{r['name']}` | {r['max_abs']:.2e} | {r['rel']:.2e} | {r['tol']:.0e} "
                     f"| {r['status']} | {note} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slr_jax.parity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--reference-repo", required=True, help="checkout of github.com/DesertsP/SLRNet"
    )
    parser.add_argument("--setting", default="wsss", choices=sorted(SETTINGS))
    parser.add_argument("--crop", type=int, default=161)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tie-eps", type=float, default=TIE_EPS, help="top-2 code gap counted as a near tie"
    )
    parser.add_argument("--no-grads", action="store_true", help="skip the gradient rows (faster)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"),
        help="JAX computation dtype; bfloat16 reports its errors against the float32 reference "
        "as info rows (parameters stay float32)",
    )  # fmt: skip
    parser.add_argument(
        "--scales", default=",".join(f"{x:g}" for x in DEFAULT_SCALES),
        help="scales of the multi-scale inference rows, comma-separated ('' to skip them)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.crop < 33 or args.batch < 1:
        parser.error(f"need --crop >= 33 and --batch >= 1, got {args.crop} and {args.batch}")
    try:
        scales = tuple(float(x) for x in args.scales.split(",") if x.strip())
    except ValueError:
        parser.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    if any(x <= 0 for x in scales):
        parser.error(f"--scales must be positive, got {args.scales!r}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("the parity tool needs PyTorch (CPU is enough): pip install torch", file=sys.stderr)
        return 2
    try:
        report = run(
            args.reference_repo, args.setting, args.crop, args.batch, args.seed,
            not args.no_grads, args.tie_eps, args.dtype, scales,
        )  # fmt: skip
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
