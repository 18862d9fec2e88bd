"""Multi-scale + flip inference, pseudo-label export, evaluation and ``--images`` photographs.

Follows the reference inference scripts (``tools/infer_voc.py``, ``infer_voc_wo_cls.py``,
``infer_coco.py``) step by step:

1. For every scale ``s`` the uint8 photograph is resized with PIL bicubic to
   ``(round(H*s), round(W*s))`` (NumPy rounding; scale-1 sizes are not resampled), then
   ImageNet-normalised. The view and its horizontal mirror go through the single-view
   ``mode='test'`` forward together.
2. The mirrored view's masks are flipped back and *added* to the first view's; that sum is
   resized to (H, W) (bilinear, align-corners). Class logits of the two views are averaged.
3. Masks: sum over scales divided by ``2 * len(scales)``; class logits: mean over scales.
4. Class presence: image labels when given, else ``sigmoid(cls) > fp_cut`` and among the
   ``top_k`` highest scores. Absent foreground channels are zeroed, then the background channel
   is raised to ``bg_pow`` (the ``semi_wo_cls`` variant skips both steps). Probabilities are
   NOT renormalised before the argmax or the CRF, exactly as in the reference.
5. Label map = argmax over classes; with ``use_crf`` the dense CRF refines the same adjusted
   probabilities before the argmax (the reference writes both, to ``pred/`` and ``crf/``).

Two additions that are not in the reference, both in :func:`run_inference`:

- Size buckets (``test.bucket_step``, default 64): every network input is padded at the bottom
  and right to ``k * bucket_step + 1`` pixels (``test.bucket_pad``: how), so one compiled
  program serves every image whose views fall in the same buckets. The network's class maps
  are cropped back to the valid region on their stride-4 grid, then resized exactly as the
  unpadded forward would have resized them, and the class scores are recomputed from the valid
  cells; what still differs is the context the network sees beyond the border (receptive
  fields and its global poolings). ``bucket_step=0`` is the exact
  reference computation, one compilation per view size. See ``docs/inference.md``.
- Restart (``test.resume``, default True): an image whose outputs are already in the output
  folder, written by a run with the same settings, variables and image (a key stored in each
  PNG), is not predicted again; its saved label maps are read back for the scores.
- Data parallel over the local devices: images go round-robin to ``jax.local_devices()``,
  several in flight at once (JAX's asynchronous dispatch), finished in input order; and
  ``test.save_overlays`` writes ``overlay/<name>.png`` blends of prediction and ground truth.

Command line (plain JPG/PNG photographs, no ground truth)::

    python -m slr_jax.infer --checkpoint CKPT_DIR --images FOLDER_OR_FILES --out OUT_DIR \
        [--scales 1,1.5,2,0.5,0.75] [--crf] [--no-flip] [--save-probs] [--bucket-step 64] \
        [--no-resume] [--save-overlays]
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from slr_jax import evaluate
from slr_jax.ops import resize_bilinear_align_corners
from slr_jax.ops.resize import interp_matrix_np  # float64 NumPy weights (cached)

DEFAULT_SCALES: tuple[float, ...] = (1.0, 1.5, 2.0, 0.5, 0.75)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
RESIZE_METHODS = ("pil_bicubic", "align_corners")
CRF_KEYS = (
    "n_iters",
    "gaussian_sxy",
    "gaussian_compat",
    "bilateral_sxy",
    "bilateral_srgb",
    "bilateral_compat",
)
IGNORE_LABEL = 255
# SLRNet predicts its class maps at stride 4 (conv3) and upsamples them to the input size;
# with symmetric conv padding, grid cell i sits on input pixel 4 * i.
MASK_STRIDE = 4
BUCKET_PAD_MODES = ("constant", "edge", "reflect", "symmetric")
# PNG text chunk holding the key of the run + image that wrote a label map (restart check).
PNG_KEY = "slr_jax_key"
# Reference command-line defaults (tools/infer_voc.py).
DEFAULT_TEST = {
    "scales": DEFAULT_SCALES,
    "flip": True,
    "num_iters": 1,
    "fp_cut": 0.3,
    "top_k": 6,
    "bg_pow": 3.0,
    "use_crf": False,
    "use_image_labels": False,
    "resize": "pil_bicubic",
    "mode": "test",
    "crf": {},
    "class_pows": {},
    # Not in the reference (see the module docstring): compile-size buckets and restart.
    "bucket_step": 64,
    "bucket_pad": "constant",
    "resume": True,
    # Not in the reference: out_dir/overlay/<name>.png, prediction (| ground truth) blends.
    "save_overlays": False,
}
# Weight of the class colour in an overlay: (1 - a) * image + a * palette[label].
OVERLAY_ALPHA = 0.5

ApplyFn = Callable[..., Mapping[str, Any]]


class InferenceError(ValueError):
    """Inference inputs (images, folders, settings) are missing, unreadable or inconsistent."""


# ----------------------------------------------------------------------------- images


def normalise_image(image_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float32 normalised; float64 maths as the reference."""
    scaled = np.asarray(image_uint8, np.float64) / 255.0
    return ((scaled - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def denormalise_to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) normalised float -> uint8 RGB: ``round(255 * (x * std + mean))``, clipped."""
    raw = np.asarray(image, np.float32) * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
    return np.clip(np.round(255.0 * raw), 0, 255).astype(np.uint8)


def reference_scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(round(H * s), round(W * s)) with NumPy rounding, as the reference's ``pil_rescale``."""
    height, width = (int(np.round(size[0] * scale)), int(np.round(size[1] * scale)))
    if height < 1 or width < 1:
        raise InferenceError(
            f"scale {scale} shrinks a {size[0]}x{size[1]} image to {height}x{width}; use larger "
            "scales for images this small."
        )
    return height, width


def _pil_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of (H, W, 3) uint8 (as one RGB image) or float (channel by channel)."""
    target = (size[1], size[0])
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BICUBIC))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
                target, Image.Resampling.BICUBIC
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def scaled_input(image: np.ndarray, scale: float, resize: str = "pil_bicubic") -> np.ndarray:
    """The normalised (h, w, 3) float32 network input of one scale.

    ``image``: (H, W, 3) uint8 RGB (the reference path: PIL bicubic on the photograph, then
    normalise) or float32 already normalised (PIL bicubic channel by channel in float, i.e.
    without the 8-bit rounding). ``resize='align_corners'`` uses the model's bilinear resize
    on the normalised image instead (no PIL; not the reference).
    """
    if resize not in RESIZE_METHODS:
        raise InferenceError(f"unknown resize method {resize!r}; expected one of {RESIZE_METHODS}.")
    size = reference_scaled_size(image.shape[:2], scale)
    if image.dtype == np.uint8 and resize == "pil_bicubic":
        return normalise_image(_pil_bicubic(image, size))
    normalised = normalise_image(image) if image.dtype == np.uint8 else image
    if size == normalised.shape[:2]:
        return normalised
    if resize == "pil_bicubic":
        return _pil_bicubic(normalised, size)
    resized = resize_bilinear_align_corners(jnp.asarray(normalised)[None], size)[0]
    return np.asarray(resized, np.float32)


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InferenceError(
            f"image must be one (H, W, 3) RGB array, got shape {image.shape}; pass one image at "
            "a time (drop the batch axis, convert grey or RGBA images to RGB)."
        )
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise InferenceError(
            f"image must be uint8 RGB or float ImageNet-normalised, got dtype {image.dtype}."
        )
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
    return image


# ----------------------------------------------------------------------------- prediction

_FORWARD_CACHE: dict[Any, Callable] = {}


def bucket_size(size: int, step: int) -> int:
    """The padded length of an axis of ``size`` pixels: the smallest ``k * step + 1 >= size``.

    ``step`` 0 means no bucketing (``size`` itself). Lengths of the form ``4k + 1`` keep
    SLRNet's stride-4 grid on input pixels ``4i`` of the padded view as of the unpadded one.
    """
    if step <= 0:
        return int(size)
    return max(1, -(-(int(size) - 1) // step)) * step + 1


def pad_view(view: np.ndarray, size: tuple[int, int], mode: str = "constant") -> np.ndarray:
    """(h, w, 3) normalised view -> (size[0], size[1], 3), padded at the bottom and right.

    ``mode``: a NumPy pad mode of :data:`BUCKET_PAD_MODES` (``constant`` pads with 0, the
    ImageNet mean colour after normalisation). The valid region stays at ``[:h, :w]``.
    """
    if mode not in BUCKET_PAD_MODES:
        raise InferenceError(f"unknown bucket_pad {mode!r}; expected one of {BUCKET_PAD_MODES}.")
    extra = (int(size[0]) - view.shape[0], int(size[1]) - view.shape[1])
    if min(extra) < 0:
        raise InferenceError(f"cannot pad a {view.shape[:2]} view to the smaller size {size}.")
    if extra == (0, 0):
        return view
    return np.pad(view, ((0, extra[0]), (0, extra[1]), (0, 0)), mode=mode)


def _grid_length(size: int, stride: int) -> int:
    """Cells of the stride-``stride`` grid of an axis of ``size`` pixels (cell i at pixel s*i)."""
    return (int(size) - 1) // stride + 1


@functools.lru_cache(maxsize=512)
def _axis_matrix(
    valid: int, padded: int, out: int, out_padded: int, stride: int, mirror: bool
) -> np.ndarray:
    """(out_padded, grid of ``padded``) float32: stride grid of a padded network output ->
    the original image axis, as the unpadded path computes it.

    Rows ``out..`` and columns past the valid grid are zero (the crop). With ``stride`` 1
    (no bucketing) it is the align-corners resize valid -> out; otherwise the network's own
    upsampling of its valid grid to ``valid`` pixels composed with that resize. ``mirror``
    folds in flipping the mirrored view back. Composed in float64 from the float32 weights.
    """
    to_image = interp_matrix_np(valid, out)  # (out, valid)
    if mirror:
        to_image = to_image[:, ::-1]
    grid = _grid_length(valid, stride)
    if stride > 1:
        to_image = to_image @ interp_matrix_np(grid, valid)  # (out, grid)
    matrix = np.zeros((out_padded, _grid_length(padded, stride)), np.float32)
    matrix[:out, :grid] = to_image
    return matrix


def valid_class_scores(masks: jax.Array, valid: jax.Array) -> jax.Array:
    """SLRNet's class scores (V, C-1) from its stride-grid masks (V, gh, gw, C), pooled over
    the valid cells ``[:valid[0], :valid[1]]`` only (``valid`` may be traced).

    The main head's background logit is the constant 1, so its logits are ``1 + log(m_c /
    m_0)``; the scores are then ``slr_jax.models.heads.mask_pooled_scores`` restricted to the
    valid cells: ``sum(x*m) / (1 + sum(m)) + (1 - mean m)^3 log(0.01 + mean m)``. With no
    padding this is the network's own ``cls`` (to float rounding, while no probability
    underflows to 0).
    """
    from slr_jax.models.heads import focal_penalty

    rows = jnp.arange(masks.shape[1]) < valid[0]
    cols = jnp.arange(masks.shape[2]) < valid[1]
    weight = (rows[:, None] & cols[None, :]).astype(jnp.float32)[None, :, :, None]
    tiny = jnp.finfo(jnp.float32).tiny
    log_masks = jnp.log(jnp.maximum(masks, tiny))
    logits = 1.0 + log_masks - log_masks[..., :1]
    kept = masks * weight
    pooled = jnp.sum(logits * kept, axis=(1, 2)) / (1.0 + jnp.sum(kept, axis=(1, 2)))
    mean = jnp.sum(kept, axis=(1, 2)) / jnp.sum(weight)
    return (pooled + focal_penalty(mean))[:, 1:]


def _network_fn(apply_fn: ApplyFn, mode: str, stride: int = 1, rescore: bool = False) -> Callable:
    """Jitted ``(variables, views (V, hp, wp, 3), valid (2,) int32) -> (cls (C-1,), grid masks
    (V, gh, gw, C))``: the network's masks sampled on their stride-``stride`` grid (the whole
    map with ``stride`` 1) and its class logits averaged over the views.

    With ``rescore`` the class scores are :func:`valid_class_scores` of the ``valid`` grid
    cells instead of the network's ``cls``. One executable per view shape, one jitted function
    per (apply_fn, mode, stride, rescore).
    """

    def network(variables, views, valid):
        outputs = apply_fn(variables, views, mode=mode)
        masks = outputs["masks"].astype(jnp.float32)
        if masks.shape[1:3] != views.shape[1:3]:
            raise InferenceError(
                f"apply_fn returned masks of shape {masks.shape} for inputs {views.shape}; "
                "inference needs class maps at the input size."
            )
        masks = masks[:, ::stride, ::stride]
        if rescore:
            cls = valid_class_scores(masks, valid)
        else:
            cls = outputs["cls"].astype(jnp.float32)
        return jnp.mean(cls, axis=0), masks

    try:
        key = (apply_fn, mode, stride, rescore)
        hash(key)
    except TypeError:
        return jax.jit(network)
    if key not in _FORWARD_CACHE:
        if len(_FORWARD_CACHE) > 32:
            _FORWARD_CACHE.clear()
        _FORWARD_CACHE[key] = jax.jit(network)
    return _FORWARD_CACHE[key]


@jax.jit
def _grid_to_image(masks, rows, cols, cols_mirror):
    """Grid masks (V, gh, gw, C) -> their sum (Hb, Wb, C) over the views on the image grid.

    ``rows`` (Hb, gh), ``cols`` (Wb, gw) and, for view 1 (the mirrored one), ``cols_mirror``
    crop and resize (see :func:`_axis_matrix`). Cheap to compile, one executable per shape.
    """
    highest = jax.lax.Precision.HIGHEST

    def to_image(view_masks, col_matrix):
        y = jnp.einsum("oh,hwc->owc", rows, view_masks, precision=highest)
        return jnp.einsum("pw,owc->opc", col_matrix, y, precision=highest)

    total = to_image(masks[0], cols)
    if masks.shape[0] == 2:
        total = total + to_image(masks[1], cols_mirror)
    return total


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise InferenceError(f"scales must be a sequence of numbers, got {scales!r}.") from None
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise InferenceError(
            f"scales must be a non-empty list of positive numbers, got {scales}; e.g. "
            "(1.0, 1.5, 2.0, 0.5, 0.75)."
        )
    return scales


def _check_bucket_step(step: Any, stride: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InferenceError(
            f"bucket_step must be an integer >= 0 (0 = no padding), got {step!r}; e.g. 64."
        )
    if int(stride) < 1:
        raise InferenceError(f"mask_stride must be >= 1, got {stride}.")
    if step % stride:
        raise InferenceError(
            f"bucket_step {step} is not a multiple of the network's mask stride {stride}; "
            f"use e.g. {stride * 16} (or 0 to switch buckets off)."
        )
    return int(step)


class PendingPrediction:
    """The device-side sums of :func:`multiscale_predict_async`; :meth:`result` waits for them.

    ``device``: the device the outputs live on (where the forward ran).
    """

    __slots__ = ("cls_total", "masks_total", "size", "num_scales", "views_per_scale")

    def __init__(self, cls_total, masks_total, size, num_scales, views_per_scale):
        self.cls_total, self.masks_total = cls_total, masks_total
        self.size, self.num_scales, self.views_per_scale = size, num_scales, views_per_scale

    @property
    def device(self) -> Any:
        return next(iter(self.masks_total.devices()))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(cls (C-1,), masks (H, W, C)) as NumPy float32; blocks until the device is done."""
        height, width = self.size
        masks_total = np.asarray(self.masks_total)[:height, :width]
        divisor = np.float32(self.views_per_scale * self.num_scales)
        masks_mean = (masks_total / divisor).astype(np.float32)
        cls_mean = np.asarray(self.cls_total / self.num_scales, np.float32)
        return cls_mean, masks_mean


def multiscale_predict(
    apply_fn: ApplyFn, variables: Any, image: np.ndarray, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale (+ mirrored) prediction of one image -> (cls (C-1,), masks (H, W, C)).

    ``apply_fn(variables, images (B, h, w, 3), mode=mode)`` returns ``{'cls': (B, C-1),
    'masks': (B, h, w, C)}`` (e.g. ``model.apply``; ``mode='test_two_view'`` is the
    reference's co-clustering option). ``image``: (H, W, 3) uint8 RGB (exact reference
    pre-processing) or float32 normalised. ``cls`` are logits averaged over views and scales;
    ``masks`` are class probabilities averaged over all views at (H, W).

    ``bucket_step`` > 0 pads every view (``bucket_pad``) to :func:`bucket_size` and the
    accumulated maps to the bucket of (H, W), so images of different sizes share compiled
    programs; it assumes ``apply_fn`` upsamples (align-corners) class maps computed on a
    stride-``mask_stride`` grid whose cell i is input pixel ``mask_stride * i`` (SLRNet: 4).
    The valid part of that grid is cropped before any resize; the result differs from
    ``bucket_step=0`` (the reference computation) only through what the network sees of the
    padding. The returned maps always cover exactly the (H, W) of ``image``. ``rescore``
    (SLRNet's single-view ``mode='test'`` only, not ``semi_wo_cls``) recomputes the class
    scores from the masks of the valid grid (:func:`valid_class_scores`), so the padding does
    not enter them either. ``device``: see :func:`multiscale_predict_async`, whose keyword
    ``options`` (and defaults) these are: ``scales``, ``flip``, ``resize``, ``mode``,
    ``bucket_step``, ``bucket_pad``, ``mask_stride``, ``rescore``, ``device``.
    """
    return multiscale_predict_async(apply_fn, variables, image, **options).result()


def multiscale_predict_async(
    apply_fn: ApplyFn,
    variables: Any,
    image: np.ndarray,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    resize: str = "pil_bicubic",
    mode: str = "test",
    bucket_step: int = 0,
    bucket_pad: str = "constant",
    mask_stride: int = MASK_STRIDE,
    rescore: bool = False,
    device: Any = None,
) -> PendingPrediction:
    """:func:`multiscale_predict` without waiting: the views are prepared on the host and the
    device work is dispatched (JAX runs it asynchronously); ``.result()`` collects it.

    ``device`` None: the inputs are not committed, so everything runs on the default device
    (the single-device path). With a ``jax.Device`` the views are committed to it and the
    forward runs there; ``variables`` must then be on that device too (or NumPy).
    """
    image = _check_image(image)
    scales = _check_scales(scales)
    step = _check_bucket_step(bucket_step, mask_stride)
    stride = int(mask_stride) if step else 1
    height, width = (int(d) for d in image.shape[:2])
    out_padded = (bucket_size(height, step), bucket_size(width, step))
    if rescore and (mode != "test" or not step):
        raise InferenceError(
            f"rescore needs buckets (bucket_step > 0) and the single-view mode 'test' (got "
            f"bucket_step={step}, mode={mode!r})."
        )
    network = _network_fn(apply_fn, mode, stride, bool(rescore))
    masks_total, cls_total = None, None
    for scale in scales:
        view = scaled_input(image, scale, resize)
        views = [view, view[:, ::-1]] if flip else [view]
        h, w = view.shape[:2]
        padded = (bucket_size(h, step), bucket_size(w, step))
        views = np.stack([pad_view(v, padded, bucket_pad) for v in views])
        rows = _axis_matrix(h, padded[0], height, out_padded[0], stride, False)
        cols = _axis_matrix(w, padded[1], width, out_padded[1], stride, False)
        cols_mirror = _axis_matrix(w, padded[1], width, out_padded[1], stride, True)
        valid = np.asarray([_grid_length(h, stride), _grid_length(w, stride)], np.int32)
        views = jnp.asarray(views) if device is None else jax.device_put(views, device)
        cls, grid_masks = network(variables, views, valid)
        masks = _grid_to_image(grid_masks, rows, cols, cols_mirror)
        masks_total = masks if masks_total is None else masks_total + masks
        cls_total = cls if cls_total is None else cls_total + cls
    return PendingPrediction(cls_total, masks_total, (height, width), len(scales), 1 + bool(flip))


# ----------------------------------------------------------------------------- label maps


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic function."""
    x = np.asarray(x, np.float32)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def class_presence(cls: np.ndarray, *, fp_cut: float, top_k: int) -> np.ndarray:
    """(C-1,) bool: ``sigmoid(cls) > fp_cut`` and at least the ``top_k``-th highest score."""
    cls = np.asarray(cls, np.float32).reshape(-1)
    if top_k < 1:
        raise InferenceError(f"top_k must be >= 1, got {top_k}.")
    scores = sigmoid(cls)
    kth_best = np.sort(scores)[::-1][min(int(top_k), scores.size) - 1]
    return (scores > fp_cut) & (scores >= kth_best)


def adjust_probabilities(
    cls: np.ndarray,
    masks: np.ndarray,
    *,
    fp_cut: float = 0.3,
    top_k: int = 6,
    bg_pow: float = 3.0,
    image_labels: np.ndarray | None = None,
    filter_classes: bool = True,
    class_pows: Mapping[int, float] | None = None,
) -> np.ndarray:
    """The reference's post-processing of averaged masks (H, W, C) -> (H, W, C) float32.

    With ``filter_classes`` (all variants but ``semi_wo_cls``): foreground channels of absent
    classes are zeroed (presence from ``image_labels`` (C-1,) multi-hot when given, else
    :func:`class_presence`), then background ** ``bg_pow``. ``class_pows`` {class: power}
    raises further channels afterwards (COCO reference: ``{1: 2 * bg_pow}`` for person).
    """
    probs = np.array(masks, dtype=np.float32, copy=True)
    if probs.ndim != 3:
        raise InferenceError(f"masks must be (H, W, C), got shape {probs.shape}.")
    num_fg = probs.shape[-1] - 1
    if filter_classes:
        if image_labels is not None:
            present = np.asarray(image_labels, np.float32).reshape(-1)
        else:
            cls = np.asarray(cls, np.float32).reshape(-1)
            if cls.size != num_fg:
                raise InferenceError(
                    f"cls has {cls.size} scores but masks have {num_fg} foreground channels."
                )
            present = class_presence(cls, fp_cut=fp_cut, top_k=top_k).astype(np.float32)
        if present.size != num_fg:
            raise InferenceError(
                f"image_labels has {present.size} entries but masks have {num_fg} foreground "
                "channels; pass a (C-1,) multi-hot vector without background."
            )
        probs[..., 1:] *= present
        probs[..., 0] = probs[..., 0] ** np.float32(bg_pow)
    for class_id, power in (class_pows or {}).items():
        if not 0 <= int(class_id) <= num_fg:
            raise InferenceError(f"class_pows names class {class_id} outside 0..{num_fg}.")
        probs[..., int(class_id)] = probs[..., int(class_id)] ** np.float32(power)
    return probs


def crf_settings(crf: Mapping[str, Any] | None) -> dict[str, float]:
    """Validated keyword arguments for :func:`slr_jax.crf.dense_crf` (reference defaults)."""
    crf = dict(crf or {})
    unknown = sorted(set(crf) - set(CRF_KEYS))
    if unknown:
        raise InferenceError(f"unknown CRF settings {unknown}; expected some of {CRF_KEYS}.")
    return crf


def labels_from_probabilities(
    probs: np.ndarray,
    *,
    use_crf: bool = False,
    image_uint8: np.ndarray | None = None,
    crf: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Argmax (H, W) uint8 of (H, W, C) probabilities, optionally after the dense CRF."""
    if probs.shape[-1] > 256:
        raise InferenceError(f"{probs.shape[-1]} classes do not fit a uint8 label map.")
    if use_crf:
        if image_uint8 is None:
            raise InferenceError(
                "use_crf=True needs image_uint8, the (H, W, 3) uint8 photograph the CRF's "
                "bilateral term compares colours in."
            )
        from slr_jax.crf import dense_crf

        # A writable copy: pydensecrf rejects read-only buffers (arrays viewing a PIL image).
        image_uint8 = np.array(image_uint8, dtype=np.uint8, copy=True)
        probs = dense_crf(image_uint8, probs, channels_last=True, **crf_settings(crf))
    return np.argmax(probs, axis=-1).astype(np.uint8)


def masks_to_labels(
    cls: np.ndarray,
    masks: np.ndarray,
    *,
    fp_cut: float = 0.3,
    top_k: int = 6,
    bg_pow: float = 3.0,
    image_labels: np.ndarray | None = None,
    use_crf: bool = False,
    image_uint8: np.ndarray | None = None,
    crf: Mapping[str, Any] | None = None,
    filter_classes: bool = True,
    class_pows: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Label map (H, W) uint8 from cls (C-1,) logits and masks (H, W, C) probabilities.

    :func:`adjust_probabilities`, then the optional dense CRF (``crf``: keyword arguments of
    :func:`slr_jax.crf.dense_crf`; needs ``image_uint8`` (H, W, 3)), then argmax.
    """
    probs = adjust_probabilities(
        cls,
        masks,
        fp_cut=fp_cut,
        top_k=top_k,
        bg_pow=bg_pow,
        image_labels=image_labels,
        filter_classes=filter_classes,
        class_pows=class_pows,
    )
    return labels_from_probabilities(probs, use_crf=use_crf, image_uint8=image_uint8, crf=crf)


# ----------------------------------------------------------------------------- export


def voc_palette() -> list[int]:
    """The 256-entry VOC colour palette, flat [r0, g0, b0, ...] (768 ints)."""
    from slr_jax.data.voc import voc_palette as palette

    return palette()


def _replace_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Writes through ``write(file)`` to a temporary file beside ``path``, then renames it, so
    an interrupted run never leaves a half-written output under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_label_png(
    path: str | os.PathLike, labels: np.ndarray, palette: bool = True, key: str | None = None
) -> Path:
    """Writes (H, W) class indices as a PNG: palette mode 'P' in VOC colours, or grey 'L'.

    Either way the stored pixel values are the class indices. ``key`` is stored in the PNG's
    text chunk :data:`PNG_KEY` (the restart check of :func:`run_inference`). The file appears
    complete or not at all (written to a temporary name, then renamed).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise InferenceError(
            f"label map must be (H, W) with values 0..255, got shape {labels.shape}."
        )
    path = Path(path)
    image = Image.fromarray(labels.astype(np.uint8))
    if palette:
        image = image.convert("P")
        image.putpalette(voc_palette())
    info = PngImagePlugin.PngInfo()
    if key is not None:
        info.add_text(PNG_KEY, key)
    _replace_atomically(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    return path


def _safe_name(name: str) -> str:
    name = str(name)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise InferenceError(
            f"example name {name!r} cannot name an output file; use a relative id such as "
            "'2007_000033'."
        )
    return name


def output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where one example's outputs go: ``pred``/``crf`` PNGs and the ``probs`` .npy."""
    name = _safe_name(name)
    out_dir = Path(out_dir)
    return {
        "pred": out_dir / "pred" / f"{name}.png",
        "crf": out_dir / "crf" / f"{name}.png",
        "probs": out_dir / "probs" / f"{name}.npy",
        "overlay": out_dir / "overlay" / f"{name}.png",
    }


def blend_labels(
    image_uint8: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """(H, W, 3) uint8: ``round((1 - alpha) * image + alpha * colour(labels))`` per pixel,
    colours from the VOC palette (255, the ignore label, is its light boundary colour)."""
    image_uint8, labels = np.asarray(image_uint8), np.asarray(labels)
    if image_uint8.shape[:2] != labels.shape or image_uint8.shape[-1:] != (3,):
        raise InferenceError(
            f"cannot blend labels of shape {labels.shape} into an image of shape "
            f"{image_uint8.shape}; both need the same (H, W)."
        )
    if not 0.0 <= alpha <= 1.0:
        raise InferenceError(f"overlay alpha must lie in [0, 1], got {alpha}.")
    colours = np.asarray(voc_palette(), np.float64).reshape(256, 3)[labels.astype(np.uint8)]
    mixed = (1.0 - alpha) * image_uint8.astype(np.float64) + alpha * colours
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def overlay_image(
    image_uint8: np.ndarray,
    labels: np.ndarray,
    ground_truth: np.ndarray | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """The prediction blended into the image, (H, W, 3) uint8, with the ground-truth blend
    to its right, (H, 2W, 3), when ``ground_truth`` (H, W) is given (see :func:`blend_labels`).
    """
    blended = blend_labels(image_uint8, labels, alpha)
    if ground_truth is None:
        return blended
    return np.concatenate([blended, blend_labels(image_uint8, ground_truth, alpha)], axis=1)


def save_overlay_png(path: str | os.PathLike, overlay: np.ndarray) -> Path:
    """Writes an (H, W, 3) uint8 overlay as an RGB PNG, atomically (temporary name, rename)."""
    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(overlay, np.uint8))
    _replace_atomically(path, lambda handle: image.save(handle, format="PNG"))
    return path


def export_pseudo_labels(
    out_dir: str | os.PathLike,
    name: str,
    labels: np.ndarray,
    *,
    crf_labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    palette: bool = True,
    key: str | None = None,
    overlay: np.ndarray | None = None,
) -> dict[str, Path]:
    """Writes one example's outputs, as the reference lays them out.

    ``out_dir/pred/<name>.png`` (argmax, no CRF), ``out_dir/crf/<name>.png`` when
    ``crf_labels`` is given, ``out_dir/probs/<name>.npy`` (H, W, C) float32 when ``probs`` is
    given, ``out_dir/overlay/<name>.png`` (RGB, :func:`overlay_image`) when ``overlay`` is
    given (not in the reference). Returns the written paths by kind.

    With a ``key`` (restartable runs) the example's earlier PNGs are removed first and the
    label PNGs, which carry the key, are written last; an earlier ``.npy`` or overlay is
    replaced or, when not given, removed. So a label PNG with a given key always sits beside
    the scores and overlay of that same computation, or beside none.
    """
    paths = output_paths(out_dir, name)
    if key is not None:
        for kind in ("pred", "crf"):
            paths[kind].unlink(missing_ok=True)
        if probs is None:
            paths["probs"].unlink(missing_ok=True)
        if overlay is None:
            paths["overlay"].unlink(missing_ok=True)
    written = {}
    if probs is not None:
        array = np.asarray(probs, np.float32)
        _replace_atomically(paths["probs"], lambda handle: np.save(handle, array))
        written["probs"] = paths["probs"]
    if overlay is not None:
        written["overlay"] = save_overlay_png(paths["overlay"], overlay)
    if crf_labels is not None:
        written["crf"] = save_label_png(paths["crf"], crf_labels, palette, key)
    written["pred"] = save_label_png(paths["pred"], labels, palette, key)
    return written


def _read_keyed_png(path: Path, key: str, shape: tuple[int, int], num_classes: int):
    """The (H, W) labels of ``path`` if it is a readable PNG written with ``key``, else None."""
    try:
        with Image.open(path) as png:
            if png.format != "PNG" or png.text.get(PNG_KEY) != key:
                return None
            labels = np.array(png)
    except (OSError, ValueError, SyntaxError):  # missing, truncated or not an image
        return None
    if labels.shape != tuple(shape) or labels.max(initial=0) >= num_classes:
        return None
    return labels


def finished_outputs(
    out_dir: str | os.PathLike,
    name: str,
    key: str,
    shape: tuple[int, int],
    num_classes: int,
    *,
    use_crf: bool,
    save_probs: bool,
) -> dict[str, np.ndarray] | None:
    """The saved label maps {'pred': (H, W)[, 'crf': ...]} of an example a run with the same
    ``key`` completed, or None when any output it needs is missing, unreadable, of another
    size, or was written by a different run (settings, variables or image)."""
    paths = output_paths(out_dir, name)
    labels = {}
    for kind in ("pred", "crf") if use_crf else ("pred",):
        found = _read_keyed_png(paths[kind], key, shape, num_classes)
        if found is None:
            return None
        labels[kind] = found
    if save_probs:
        try:
            probs = np.load(paths["probs"], mmap_mode="r")
        except (OSError, ValueError):
            return None
        if probs.shape != (*shape, num_classes) or probs.dtype != np.float32:
            return None
    return labels


# ----------------------------------------------------------------------------- evaluation


def evaluate_predictions(
    predictions: Mapping[str, np.ndarray] | str | os.PathLike,
    ground_truth: Mapping[str, np.ndarray] | str | os.PathLike,
    num_classes: int,
    ids: Sequence[str] | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> dict[str, Any]:
    """mIoU and per-class scores (``slr_jax.evaluate.segmentation_scores``).

    Either two folders of ``<id>.png`` label maps (``evaluate_folders``) or two mappings
    id -> (H, W) label map; ``ids`` None means every prediction.
    """
    if isinstance(predictions, (str, os.PathLike)) or isinstance(ground_truth, (str, os.PathLike)):
        if not (
            isinstance(predictions, (str, os.PathLike))
            and isinstance(ground_truth, (str, os.PathLike))
        ):
            raise InferenceError("pass either two folders or two mappings, not one of each.")
        return evaluate.evaluate_folders(predictions, ground_truth, ids, num_classes, ignore_index)
    ids = list(predictions) if ids is None else list(ids)
    if not ids:
        raise InferenceError("no predictions to evaluate.")
    missing = [i for i in ids if i not in ground_truth or i not in predictions]
    if missing:
        raise InferenceError(f"{len(missing)} ids lack a prediction or ground truth: {missing[:5]}")
    accumulator = evaluate.ConfusionAccumulator(num_classes, ignore_index)
    for image_id in ids:
        accumulator.update(np.asarray(predictions[image_id]), np.asarray(ground_truth[image_id]))
    return accumulator.result()


# ----------------------------------------------------------------------------- driver


def inference_settings(cfg: Any) -> dict[str, Any]:
    """``cfg.test`` merged over :data:`DEFAULT_TEST` as a plain dict (``cfg`` may lack it)."""
    section = getattr(cfg, "test", None)
    if section is None and isinstance(cfg, Mapping):
        section = cfg.get("test")
    settings = dict(DEFAULT_TEST)
    if section is not None:
        items = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        unknown = sorted(set(items) - set(DEFAULT_TEST))
        if unknown:
            raise InferenceError(
                f"unknown config.test keys {unknown}; expected some of {sorted(DEFAULT_TEST)}."
            )
        settings.update(items)
    settings["scales"] = _check_scales(settings["scales"])
    settings["crf"] = crf_settings(settings["crf"])
    settings["class_pows"] = {int(k): float(v) for k, v in dict(settings["class_pows"]).items()}
    settings["bucket_step"] = _check_bucket_step(settings["bucket_step"], MASK_STRIDE)
    if settings["bucket_pad"] not in BUCKET_PAD_MODES:
        raise InferenceError(
            f"config.test.bucket_pad={settings['bucket_pad']!r}; expected one of "
            f"{BUCKET_PAD_MODES}."
        )
    for flag in ("resume", "save_overlays"):
        if not isinstance(settings[flag], (bool, np.bool_)):
            raise InferenceError(
                f"config.test.{flag} must be True or False, got {settings[flag]!r}."
            )
    return settings


def _model_settings(cfg: Any) -> Any:
    return cfg.model if hasattr(cfg, "model") else cfg["model"]


def variables_fingerprint(variables: Any) -> str:
    """Hex digest of every leaf's path, dtype, shape and bytes (same variables, same digest).

    A leaf sharded over several processes contributes the shards this process holds.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            parts = [(str(s.index), s.data) for s in leaf.addressable_shards]
        else:
            leaf = np.asarray(jax.device_get(leaf))
            parts = [("", leaf)]
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
        for index, part in parts:
            array = np.ascontiguousarray(np.asarray(jax.device_get(part)))
            digest.update(index.encode())
            digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def run_key(settings: Mapping[str, Any], model_cfg: Any, variables: Any, apply_fn: Any) -> str:
    """Digest of everything that decides an image's outputs except the image itself: the
    ``test`` settings (``resume`` and ``save_overlays`` aside: they change no label), the model
    config, the variables, and the name of a custom ``apply_fn``."""
    model = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    unkeyed = ("resume", "save_overlays")
    described = {
        "settings": {k: v for k, v in settings.items() if k not in unkeyed},
        "model": model,
        "apply_fn": getattr(apply_fn, "__qualname__", type(apply_fn).__name__),
        "variables": variables_fingerprint(variables),
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def image_key(key: str, image_uint8: np.ndarray, image_labels: np.ndarray | None) -> str:
    """The restart key of one image: ``key`` (:func:`run_key`) + its pixels (+ labels used)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16)
    digest.update(f"{image_uint8.shape}".encode())
    digest.update(np.ascontiguousarray(image_uint8).reshape(-1))
    if image_labels is not None:
        digest.update(np.asarray(image_labels, np.float32).tobytes())
    return digest.hexdigest()


def _example_fields(example: Mapping[str, Any]) -> dict[str, Any] | None:
    """One example (or an eval batch of one) -> name, uint8 image, labels, mask; None = padding."""

    def single(key):
        value = example.get(key)
        if value is None:
            return None
        value = np.asarray(value)
        return value[0] if batched and value.ndim > 0 else value

    image = np.asarray(example["image"]) if "image" in example else None
    if image is None:
        raise InferenceError("each example needs an 'image' (H, W, 3) entry.")
    batched = image.ndim == 4
    if batched and image.shape[0] != 1:
        raise InferenceError(
            f"examples must come one at a time (batch size 1), got a batch of {image.shape[0]}."
        )
    valid = single("is_valid")
    if valid is not None and not bool(valid):
        return None
    name = single("name")
    if name is None:
        raise InferenceError("each example needs a 'name' to name its output files.")
    name = name.decode() if isinstance(name.item(), bytes) else str(name.item())
    image = single("image")
    raw = single("raw_image")
    if image.dtype == np.uint8:
        image_uint8 = image
    elif raw is not None:
        image_uint8 = np.clip(np.round(255.0 * raw.astype(np.float32)), 0, 255).astype(np.uint8)
    else:
        image_uint8 = denormalise_to_uint8(image)
    return {
        "name": name,
        "image_uint8": _check_image(image_uint8),
        "labels": single("labels"),
        "mask": single("mask"),
    }


def inference_devices(devices: Sequence[Any] | None, variables: Any) -> list[Any]:
    """The local devices :func:`run_inference` spreads images over (default: all of them).

    Variables sharded over several processes cannot be copied whole to one device, so then
    only the default device is used (each process still predicts its own share of examples).
    """
    local = jax.local_devices()
    if devices is None:
        devices = local
    devices = list(devices)
    if not devices:
        raise InferenceError("devices is empty; pass None for all local devices.")
    foreign = [d for d in devices if d not in local]
    if foreign:
        raise InferenceError(
            f"devices {foreign} are not local to this process (jax.local_devices() is {local}); "
            "each process predicts on its own devices."
        )
    sharded = any(
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        for leaf in jax.tree_util.tree_leaves(variables)
    )
    return devices[:1] if sharded else devices


def _device_name(device: Any) -> str:
    return f"{device.platform}:{device.id}"


def run_inference(
    cfg: Any,
    variables: Any,
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    apply_fn: ApplyFn | None = None,
    save_probs: bool = False,
    palette: bool = True,
    log: Callable[[str], None] | None = None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Predicts, exports and (where ground truth exists) scores every example.

    ``examples``: dicts with ``name`` and ``image`` ((H, W, 3) uint8, or the evaluation
    pipeline's batches of one with normalised ``image`` and ``raw_image``), optionally
    ``labels`` (C-1,) and ``mask`` (H, W) ground truth (255 = ignore). The model is built from
    ``cfg.model`` with ``cfg.test.num_iters`` unless ``apply_fn`` is given (with
    ``cfg.test.bucket_step`` > 0 it must follow SLRNet's stride-4 convention, see
    :func:`multiscale_predict`).

    Data parallel over ``devices`` (default all local ones, :func:`inference_devices`): with
    several, the variables are copied to each once, image i's forward passes run on device
    ``i mod n`` and up to ``2 n`` images are in flight while the host prepares the next views
    and post-processes / writes finished images in input order. Results equal the
    one-device path (same program on each device). One device: one image at a time, inputs
    left uncommitted (the default device).

    With ``cfg.test.resume`` (default True) an example whose outputs in ``out_dir`` were
    written by a run with the same settings, model, variables and image is not predicted
    again (:func:`finished_outputs`); its saved label maps are scored instead.
    ``cfg.test.save_overlays`` also writes ``overlay/<name>.png`` (:func:`overlay_image` of
    the CRF labels when the CRF is on, else of ``pred``; for skipped images from their saved
    labels when missing). ``log`` gets one line per example and a last line with the
    throughput.

    Returns {'num_images', 'num_predicted', 'num_skipped', 'num_scored', 'seconds' (whole
    loop), 'images_per_second' (predicted images over the time spent on them: preparing and
    dispatching their views, waiting for their results, CRF and writing; None if none was
    predicted), 'images_per_device' ({'cpu:0': n, ...}: where the predicted images' forward
    outputs lived), 'out_dir', 'scores': {'pred': ..., 'crf': ...} (images with ground
    truth), 'confusions': {'pred': (C, C) int64, ...} (for summing over processes)}.
    """
    settings = inference_settings(cfg)
    model_cfg = _model_settings(cfg)
    variant = model_cfg.get("variant", "wsss")
    num_classes = int(model_cfg.get("num_classes", 21))
    if apply_fn is None:
        from slr_jax.models import build_model

        model = build_model(model_cfg).clone(num_iters=int(settings["num_iters"]))
        apply_fn = model.apply
    filter_classes = variant != "semi_wo_cls"
    use_crf = bool(settings["use_crf"])
    save_overlays = bool(settings["save_overlays"])
    accumulators = {"pred": evaluate.ConfusionAccumulator(num_classes)}
    if use_crf:
        accumulators["crf"] = evaluate.ConfusionAccumulator(num_classes)
    key = run_key(settings, model_cfg, variables, apply_fn)
    devices = inference_devices(devices, variables)
    if len(devices) == 1 and devices[0] == jax.local_devices()[0]:
        placements = [(None, variables)]  # today's single-device path, nothing committed
        window = 1
    else:
        placements = [(d, jax.device_put(variables, d)) for d in devices]
        window = 2 * len(devices)
    counts = {"images": 0, "predicted": 0, "skipped": 0, "scored": 0}
    per_device: dict[str, int] = {}
    predict_seconds = 0.0
    pending: collections.deque[dict[str, Any]] = collections.deque()

    def finish(entry: dict[str, Any]) -> None:
        nonlocal predict_seconds
        finish_started = time.perf_counter()
        fields, outputs = entry["fields"], entry["outputs"]
        name, image_uint8, gt = fields["name"], fields["image_uint8"], fields["mask"]
        # The overlay shows the CRF labels when there are some, else the predictions.
        overlay_of = lambda outputs: overlay_image(
            image_uint8, outputs.get("crf", outputs["pred"]), gt
        )
        if outputs is None:
            device = _device_name(entry["pending"].device)
            outputs, probs = _finish_example(
                entry["pending"], image_uint8, entry["image_labels"], settings, filter_classes
            )
            overlay = overlay_of(outputs) if save_overlays else None
            export_pseudo_labels(
                out_dir,
                name,
                outputs["pred"],
                crf_labels=outputs.get("crf"),
                probs=probs if save_probs else None,
                palette=palette,
                key=entry["key"],
                overlay=overlay,
            )
            counts["predicted"] += 1
            per_device[device] = per_device.get(device, 0) + 1
            predict_seconds += entry["seconds"] + time.perf_counter() - finish_started
            status = f"{counts['predicted'] / predict_seconds:.2f} images/s"
        else:
            counts["skipped"] += 1
            status = "done before, skipped"
            overlay_path = output_paths(out_dir, name)["overlay"]
            if save_overlays and not overlay_path.exists():
                save_overlay_png(overlay_path, overlay_of(outputs))
        if gt is not None and (np.asarray(gt) != IGNORE_LABEL).any():
            for kind, labels in outputs.items():
                accumulators[kind].update(labels, np.asarray(gt))
            counts["scored"] += 1
        counts["images"] += 1
        if log is not None:
            log(f"{name}: {image_uint8.shape[1]}x{image_uint8.shape[0]} ({status})")

    started = time.perf_counter()
    next_device = 0
    for example in examples:
        fields = _example_fields(example)
        if fields is None:
            continue
        example_started = time.perf_counter()
        name, image_uint8 = fields["name"], fields["image_uint8"]
        image_labels = fields["labels"] if settings["use_image_labels"] else None
        if settings["use_image_labels"] and image_labels is None:
            raise InferenceError(
                f"{name}: config.test.use_image_labels is set but the example has no "
                "'labels'; turn it off to use predicted class presence."
            )
        example_key = image_key(key, image_uint8, image_labels)
        entry = {"fields": fields, "key": example_key, "image_labels": image_labels}
        entry["outputs"] = None
        if settings["resume"]:
            entry["outputs"] = finished_outputs(
                out_dir,
                name,
                example_key,
                image_uint8.shape[:2],
                num_classes,
                use_crf=use_crf,
                save_probs=save_probs,
            )
        if entry["outputs"] is None:
            device, device_variables = placements[next_device]
            next_device = (next_device + 1) % len(placements)
            entry["pending"] = _start_example(
                apply_fn, device_variables, image_uint8, settings, filter_classes, device
            )
            entry["seconds"] = time.perf_counter() - example_started
        pending.append(entry)
        while len(pending) >= window:
            finish(pending.popleft())
    while pending:
        finish(pending.popleft())
    seconds = time.perf_counter() - started
    rate = counts["predicted"] / predict_seconds if counts["predicted"] else None
    if log is not None:
        rate_text = f"{rate:.2f} images/s" if rate is not None else "no forward pass"
        spread = ", ".join(f"{d}: {n}" for d, n in sorted(per_device.items()))
        log(
            f"{counts['images']} images in {seconds:.1f} s: {counts['predicted']} predicted "
            f"({rate_text}), {counts['skipped']} already in {out_dir}"
            + (f"; images per device {spread}" if len(per_device) > 1 else "")
        )
    scores = {kind: acc.result() for kind, acc in accumulators.items()} if counts["scored"] else {}
    confusions = {kind: acc.confusion.copy() for kind, acc in accumulators.items()}
    return {
        "num_images": counts["images"],
        "num_predicted": counts["predicted"],
        "num_skipped": counts["skipped"],
        "num_scored": counts["scored"],
        "seconds": seconds,
        "images_per_second": rate,
        "images_per_device": per_device,
        "out_dir": Path(out_dir),
        "scores": scores,
        "confusions": confusions,
    }


def _start_example(
    apply_fn: ApplyFn,
    variables: Any,
    image_uint8: np.ndarray,
    settings: Mapping[str, Any],
    filter_classes: bool,
    device: Any,
) -> PendingPrediction:
    """Dispatches one image's multi-scale forward passes (on ``device``; None = default)."""
    return multiscale_predict_async(
        apply_fn,
        variables,
        image_uint8,
        scales=settings["scales"],
        flip=bool(settings["flip"]),
        resize=settings["resize"],
        mode=settings["mode"],
        bucket_step=settings["bucket_step"],
        bucket_pad=settings["bucket_pad"],
        rescore=bool(settings["bucket_step"]) and filter_classes and settings["mode"] == "test",
        device=device,
    )


def _finish_example(
    prediction: PendingPrediction,
    image_uint8: np.ndarray,
    image_labels: np.ndarray | None,
    settings: Mapping[str, Any],
    filter_classes: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({'pred': (H, W) uint8[, 'crf': ...]}, adjusted probabilities (H, W, C)) of one image
    whose forward passes :func:`_start_example` dispatched (waits for them)."""
    cls, masks = prediction.result()
    probs = adjust_probabilities(
        cls,
        masks,
        fp_cut=float(settings["fp_cut"]),
        top_k=int(settings["top_k"]),
        bg_pow=float(settings["bg_pow"]),
        image_labels=image_labels,
        filter_classes=filter_classes,
        class_pows=settings["class_pows"],
    )
    outputs = {"pred": labels_from_probabilities(probs)}
    if settings["use_crf"]:
        outputs["crf"] = labels_from_probabilities(
            probs, use_crf=True, image_uint8=image_uint8, crf=settings["crf"]
        )
    return outputs, probs


# ----------------------------------------------------------------------------- command line


def collect_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (non-recursively) in folders, sorted per folder."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InferenceError(
                    f"folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})."
                )
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InferenceError(f"{path} is neither an image file nor a folder.")
    if not paths:
        raise InferenceError("no images given; pass --images FOLDER or --images a.jpg b.png.")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise InferenceError(
                f"{stems[path.stem]} and {path} would both write {path.stem}.png; rename one or "
                "run them separately."
            )
        stems[path.stem] = path
    return paths


def read_photograph(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a JPG/PNG photograph; InferenceError when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InferenceError(
            f"cannot read image {path} ({type(error).__name__}: {error}); it is not a readable "
            "JPG/PNG, remove it or convert it."
        ) from None


def _photographs(paths: Sequence[Path]) -> Iterable[dict[str, Any]]:
    for path in paths:
        yield {"name": path.stem, "image": read_photograph(path)}


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        return _check_scales([float(s) for s in text.split(",") if s.strip()])
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--scales expects comma-separated positive numbers such as 1,0.5,1.5 ({error})"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m slr_jax.infer``."""
    parser = argparse.ArgumentParser(
        prog="python -m slr_jax.infer",
        description="Segment photographs with an SLRNet checkpoint; writes label PNGs.",
    )
    parser.add_argument("--checkpoint", required=True, help="variables checkpoint folder")
    parser.add_argument("--images", required=True, nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder (pred/, crf/, probs/)")
    parser.add_argument("--scales", type=_parse_scales, default=DEFAULT_SCALES)
    parser.add_argument("--no-flip", action="store_true", help="skip the mirrored views")
    parser.add_argument("--crf", action="store_true", help="also write dense-CRF labels to crf/")
    parser.add_argument("--fp-cut", type=float, default=DEFAULT_TEST["fp_cut"])
    parser.add_argument("--top-k", type=int, default=DEFAULT_TEST["top_k"])
    parser.add_argument(
        "--bg-pow", type=float, default=None, help="default 3 (wsss, coco) or 1 (semi variants)"
    )
    parser.add_argument("--num-iters", type=int, default=1, help="low-rank iterations")
    parser.add_argument("--save-probs", action="store_true", help="write probs/<name>.npy")
    parser.add_argument(
        "--bucket-step",
        type=int,
        default=DEFAULT_TEST["bucket_step"],
        help="pad inputs to k*STEP+1 px so sizes share compilations (0: exact, no padding)",
    )
    parser.add_argument(
        "--bucket-pad", choices=BUCKET_PAD_MODES, default=DEFAULT_TEST["bucket_pad"]
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="predict again images already in --out"
    )
    parser.add_argument(
        "--save-overlays",
        action="store_true",
        help="also write overlay/<name>.png: the prediction's colours blended into the image",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command entry; returns run_inference's summary. Raises InferenceError / CheckpointError."""
    from slr_jax.checkpoint import check_tree_shapes, load_variables
    from slr_jax.models import build_model, variable_shapes

    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise InferenceError(
            f"checkpoint folder {checkpoint} does not exist; pass the folder written by "
            "`python -m slr_jax.convert` or slr_jax.checkpoint.save_variables."
        )
    paths = collect_image_paths(args.images)
    variables, metadata = load_variables(checkpoint)
    missing = [k for k in ("variant", "num_classes", "width") if k not in metadata]
    if missing:
        raise InferenceError(
            f"checkpoint {checkpoint} metadata lacks {missing}; re-save it with "
            "save_variables(..., metadata={'variant', 'num_classes', 'width', ...})."
        )
    model_cfg = {k: metadata[k] for k in ("variant", "num_classes", "width")}
    model_cfg["num_iters"] = args.num_iters
    model = build_model(model_cfg)
    check_tree_shapes(variable_shapes(model), variables, f"checkpoint {checkpoint}")
    bg_pow = args.bg_pow
    if bg_pow is None:
        bg_pow = 1.0 if str(metadata["variant"]).startswith("semi") else 3.0
    cfg = {
        "model": model_cfg,
        "test": {
            "scales": args.scales,
            "flip": not args.no_flip,
            "num_iters": args.num_iters,
            "fp_cut": args.fp_cut,
            "top_k": args.top_k,
            "bg_pow": bg_pow,
            "use_crf": args.crf,
            "bucket_step": args.bucket_step,
            "bucket_pad": args.bucket_pad,
            "resume": not args.no_resume,
            "save_overlays": args.save_overlays,
        },
    }
    summary = run_inference(
        cfg,
        variables,
        _photographs(paths),
        args.out,
        apply_fn=model.apply,
        save_probs=args.save_probs,
        log=print,
    )
    print(f"{summary['num_images']} label maps in {Path(args.out) / 'pred'}")
    return summary


if __name__ == "__main__":
    from slr_jax.checkpoint import CheckpointError

    try:
        main()
    except (InferenceError, CheckpointError) as err:
        sys.exit(f"error: {err}")
