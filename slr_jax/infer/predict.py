"""Multi-scale + flip prediction of one image: the network's averaged class maps and scores.

The reference's procedure (``tools/infer_voc.py``), for every scale of ``test.scales``: the
view (``preprocess.scaled_input``) and its horizontal mirror go through the single-view
``mode='test'`` forward together; the mirrored view's masks are flipped back and added to the
first view's, and that sum is resized to the image size (bilinear, align-corners). Masks are
averaged over all ``2 * len(scales)`` views, class logits over scales.

Exact padding (``test.bucket_sizes``, the default; SLRNet's ``mode='test'``): an image whose
longer side fits in a size B of ``bucket_sizes`` is treated as padded (bottom and right) to
B x B, so each of its views at scale s to ``round(B*s)`` px per side; SLRNet's padded forward
(``SLRNet(..., region=...)``) computes exactly the unpadded forward on the valid part, and its
stride-4 class maps go to the image through the unpadded path's two resizes, composed
(:func:`_axis_matrix`). One program per (B, scale) does a scale's forward, resize and
accumulation, so an evaluation compiles ``len(scales)`` programs per bucket its images use.
Images larger than every bucket, other modes and other networks run unpadded.

Approximate size buckets (``test.bucket_step`` > 0, not in the reference, kept for networks
without a padded forward such as stage 2's DeepLab): every view is padded to
``k * bucket_step + 1`` pixels; the network's class maps are cropped to the valid region on
their stride-4 grid and resized as the unpadded forward would resize them, and the class
scores can be recomputed from the valid cells (``rescore``), but the network itself sees the
padding. ``bucket_step`` > 0 takes precedence over ``bucket_sizes``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slr_jax.constants import MASK_STRIDE
from slr_jax.errors import InferenceError
from slr_jax.infer.preprocess import (
    bucket_size,
    check_bucket_sizes,
    check_image,
    pad_view,
    reference_scaled_size,
    scaled_input,
    square_bucket,
)
from slr_jax.models.heads import focal_penalty
from slr_jax.models.slrnet import SLRNet, padded_region
from slr_jax.ops.resize import interp_matrix_np  # float64 NumPy weights (cached)
from slr_jax.xla_options import compiler_options

ApplyFn = Callable[..., Mapping[str, Any]]
_FORWARD_CACHE: dict[Any, Callable] = {}


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

    return _cached_jit((apply_fn, mode, stride, rescore), network)


def _cached_jit(key: tuple, network: Callable) -> Callable:
    """``jax.jit(network)`` with slr_jax's compiler options for the default backend (those of
    float64 under 64-bit JAX: the parity tools' exact runs), kept in ``_FORWARD_CACHE`` under
    ``key`` and the 64-bit mode (not kept when ``key`` is unhashable)."""
    x64 = bool(jax.config.jax_enable_x64)
    options = compiler_options(jax.default_backend(), jnp.float64 if x64 else jnp.float32)
    key = (*key, x64)
    try:
        hash(key)
    except TypeError:
        return jax.jit(network, compiler_options=options)
    if key not in _FORWARD_CACHE:
        if len(_FORWARD_CACHE) > 32:
            _FORWARD_CACHE.clear()
        _FORWARD_CACHE[key] = jax.jit(network, compiler_options=options)
    return _FORWARD_CACHE[key]


def _padded_program(apply_fn: ApplyFn) -> Callable:
    """Jitted ``(variables, views (V, P, Q, 3), region, rows, cols, cols_mirror, masks_total
    (B, B, C), cls_total (C-1,)) -> (masks_total + this scale's masks on the image grid,
    cls_total + its class logits averaged over the views)``: one scale of the exact padded
    prediction, one program per shape (one per (bucket, scale))."""

    def network(variables, views, region, rows, cols, cols_mirror, masks_total, cls_total):
        outputs = apply_fn(variables, views, mode="test", region=region)
        masks = _grid_to_image(outputs["grid_masks"].astype(jnp.float32), rows, cols, cols_mirror)
        cls = jnp.mean(outputs["cls"].astype(jnp.float32), axis=0)
        return masks_total + masks, cls_total + cls

    return _cached_jit((apply_fn, "padded"), network)


_ZEROS: dict[Any, jax.Array] = {}


def _device_zeros(shape: tuple[int, ...], device: Any) -> jax.Array:
    """A float32 zero array on ``device`` (the default one for None), transferred once and
    kept: ``jnp.zeros`` would compile a program of its own per shape."""
    key = (shape, device)
    if key not in _ZEROS:
        if len(_ZEROS) > 16:
            _ZEROS.clear()
        zeros = np.zeros(shape, np.float32)
        _ZEROS[key] = jax.device_put(zeros) if device is None else jax.device_put(zeros, device)
    return _ZEROS[key]


def padded_model(apply_fn: ApplyFn) -> SLRNet | None:
    """The SLRNet behind ``apply_fn`` (a bound ``model.apply``) when it has the exact padded
    forward, else None (a custom function, DeepLab)."""
    model = getattr(apply_fn, "__self__", None)
    return model if isinstance(model, SLRNet) else None


def eval_program_group(size: tuple[int, int], test_cfg: Any, apply_fn: ApplyFn | None) -> tuple:
    """What decides the programs the prediction of an image of ``size`` (H, W) compiles:
    ``('padded', B)`` when exact padding applies (images of one bucket share every program),
    else ``('unpadded', H, W)`` (``apply_fn`` None: assume a network with the padded forward).
    """
    padded = apply_fn is None or padded_model(apply_fn) is not None
    bucket = square_bucket(size, check_bucket_sizes(test_cfg.get("bucket_sizes", ())))
    if padded and bucket and not test_cfg["bucket_step"] and str(test_cfg["mode"]) == "test":
        return ("padded", bucket)
    return ("unpadded", int(size[0]), int(size[1]))


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


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
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


def check_bucket_step(step: Any, stride: int) -> int:
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
        # On the host: a division of the device array would compile a program per shape.
        cls_mean = np.asarray(self.cls_total, np.float32) / np.float32(self.num_scales)
        return cls_mean.astype(np.float32), masks_mean


def multiscale_predict(
    apply_fn: ApplyFn, variables: Any, image: np.ndarray, test_cfg: Any, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale (+ mirrored) prediction of one image -> (cls (C-1,), masks (H, W, C)).

    ``apply_fn(variables, images (B, h, w, 3), mode=mode)`` returns ``{'cls': (B, C-1),
    'masks': (B, h, w, C)}`` (e.g. ``model.apply``; ``mode='test_two_view'`` is the
    reference's co-clustering option). ``image``: (H, W, 3) uint8 RGB (exact reference
    pre-processing) or float32 normalised. ``test_cfg``: ``config.test`` (or the dict of
    ``runner.inference_settings``); read: ``scales``, ``flip``, ``resize``, ``mode``,
    ``bucket_sizes``, ``bucket_step``, ``bucket_pad``. ``cls`` are logits averaged over views
    and scales;
    ``masks`` class probabilities averaged over all views, always at the (H, W) of ``image``.
    ``options``: those of :func:`multiscale_predict_async`.
    """
    return multiscale_predict_async(apply_fn, variables, image, test_cfg, **options).result()


def multiscale_predict_async(
    apply_fn: ApplyFn,
    variables: Any,
    image: np.ndarray,
    test_cfg: Any,
    *,
    mask_stride: int = MASK_STRIDE,
    rescore: bool = False,
    device: Any = None,
) -> PendingPrediction:
    """:func:`multiscale_predict` without waiting: the views are prepared on the host and the
    device work is dispatched (JAX runs it asynchronously); ``.result()`` collects it.

    Exact padding (``bucket_sizes``) applies when ``apply_fn`` is an SLRNet's ``apply``
    (:func:`eval_program_group`). With approximate buckets (``bucket_step``), ``apply_fn`` must
    upsample (align-corners) class maps computed on a stride-``mask_stride`` grid whose cell i
    is input pixel ``mask_stride * i`` (SLRNet: 4).
    ``rescore`` (SLRNet's single-view ``mode='test'`` with buckets, not ``semi_wo_cls``)
    recomputes the class scores from the masks of the valid grid (:func:`valid_class_scores`),
    so the padding does not enter them. ``device`` None: nothing is committed, everything runs
    on the default device. With a ``jax.Device`` the views are committed to it and the forward
    runs there; ``variables`` must then be on that device too (or NumPy).
    """
    image = check_image(image)
    scales = check_scales(test_cfg["scales"])
    step = check_bucket_step(test_cfg["bucket_step"], mask_stride)
    mode, flip = str(test_cfg["mode"]), bool(test_cfg["flip"])
    group = eval_program_group(image.shape[:2], test_cfg, apply_fn)
    if group[0] == "padded" and not rescore:
        return _padded_predict(apply_fn, variables, image, test_cfg, scales, group[1], device)
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
        view = scaled_input(image, scale, test_cfg["resize"])
        views = [view, view[:, ::-1]] if flip else [view]
        h, w = view.shape[:2]
        padded = (bucket_size(h, step), bucket_size(w, step))
        views = np.stack([pad_view(v, padded, test_cfg["bucket_pad"]) for v in views])
        rows = _axis_matrix(h, padded[0], height, out_padded[0], stride, False)
        cols = _axis_matrix(w, padded[1], width, out_padded[1], stride, False)
        cols_mirror = _axis_matrix(w, padded[1], width, out_padded[1], stride, True)
        valid = np.asarray([_grid_length(h, stride), _grid_length(w, stride)], np.int32)
        views = jax.device_put(views, device)  # jnp.asarray would compile a copy program
        cls, grid_masks = network(variables, views, valid)
        masks = _grid_to_image(grid_masks, rows, cols, cols_mirror)
        masks_total = masks if masks_total is None else masks_total + masks
        cls_total = cls if cls_total is None else cls_total + cls
    return PendingPrediction(cls_total, masks_total, (height, width), len(scales), 1 + flip)


def _padded_predict(apply_fn, variables, image, test_cfg, scales, bucket, device):
    """:func:`multiscale_predict_async` with exact padding to ``bucket`` x ``bucket``."""
    model = padded_model(apply_fn)
    coords = "float64" if jnp.dtype(model.dtype) == jnp.float64 else "float32"
    flip = bool(test_cfg["flip"])
    height, width = (int(d) for d in image.shape[:2])
    program = _padded_program(apply_fn)
    masks_total = _device_zeros((bucket, bucket, model.num_classes), device)
    cls_total = _device_zeros((model.num_classes - 1,), device)
    for scale in scales:
        view = scaled_input(image, scale, test_cfg["resize"])
        h, w = view.shape[:2]
        padded = reference_scaled_size((bucket, bucket), scale)
        views = [view, view[:, ::-1]] if flip else [view]
        views = np.stack([pad_view(v, padded, "constant") for v in views])
        region = padded_region(padded, (h, w), coords)
        rows = _axis_matrix(h, padded[0], height, bucket, MASK_STRIDE, False)
        cols = _axis_matrix(w, padded[1], width, bucket, MASK_STRIDE, False)
        cols_mirror = _axis_matrix(w, padded[1], width, bucket, MASK_STRIDE, True)
        views = jax.device_put(views, device)  # jnp.asarray would compile a copy program
        masks_total, cls_total = program(
            variables, views, region, rows, cols, cols_mirror, masks_total, cls_total
        )
    return PendingPrediction(cls_total, masks_total, (height, width), len(scales), 1 + flip)


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation


@contextlib.contextmanager
def count_compilations() -> Iterator[list[float]]:
    """Yields a list that gets one entry (its seconds) per XLA compilation made inside the
    block (JAX's monitoring event; programs loaded from the persistent cache do not count)."""
    seconds: list[float] = []

    def listener(event: str, duration: float, **_: Any) -> None:
        if event == COMPILE_EVENT:
            seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def eval_programs_compiled(
    apply_fn: ApplyFn, variables: Any, image_sizes: Iterable[tuple[int, int]], test_cfg: Any
) -> dict[str, int]:
    """How many XLA programs an evaluation of images of ``image_sizes`` compiles, counted.

    Images whose :func:`eval_program_group` is equal run the same programs, so one image of
    each group is predicted (a grey photograph of that size) and the compilations are counted
    (:func:`count_compilations`); ``tests/test_padded_eval.py`` pins that predicting every image
    compiles no more. Call it in a fresh process (or after ``jax.clear_caches()``): programs
    compiled before are not counted again. Returns ``{'images', 'groups', 'programs'}``.
    """
    sizes = [(int(h), int(w)) for h, w in image_sizes]
    groups = {eval_program_group(size, test_cfg, apply_fn): size for size in sizes}
    with count_compilations() as compiled:
        for height, width in groups.values():
            image = np.full((height, width, 3), 128, np.uint8)
            multiscale_predict(apply_fn, variables, image, test_cfg)
    return {"images": len(sizes), "groups": len(groups), "programs": len(compiled)}
