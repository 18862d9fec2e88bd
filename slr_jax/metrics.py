"""Segmentation metrics on the host (NumPy): confusion matrices, IoU tables, folder scoring.

Conventions follow the reference evaluation scripts (``tools/eval_voc.py``): the confusion
matrix has ground truth on the rows and predictions on the columns; pixels whose ground truth
is ``ignore_index`` are skipped; prediction pixels equal to ``ignore_index`` count as
background (class 0). Per class, with ``tp`` the diagonal, ``gt`` the row sum and ``pred`` the
column sum, and ``union = gt + pred - tp``:

- ``iou = tp / union``
- ``fp = (pred - tp) / union``: the share of the union predicted as the class but not it;
- ``fn = (gt - tp) / union``: the share of the union that is the class but was missed.

A class absent from both prediction and ground truth has ``union == 0``; its scores are NaN and
left out of every mean (``np.nanmean``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from slr_jax.constants import IGNORE_LABEL
from slr_jax.errors import EvaluationError


def _check_labels(name: str, labels: np.ndarray, num_classes: int, allowed: int | None) -> None:
    """Raises EvaluationError for values outside [0, num_classes) other than ``allowed``."""
    valid = (labels >= 0) & (labels < num_classes)
    if allowed is not None:
        valid |= labels == allowed
    if not valid.all():
        bad = np.unique(labels[~valid])
        raise EvaluationError(
            f"{name} holds labels {bad[:10].tolist()} outside [0, {num_classes}) "
            f"(and not the ignore value {allowed}); check num_classes or the label encoding "
            "(palette PNGs must store class indices, not colours)."
        )


def confusion_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_LABEL,
) -> np.ndarray:
    """Confusion matrix (num_classes, num_classes) int64; rows ground truth, columns prediction.

    ``pred`` and ``gt`` are integer label maps of the same shape (any rank, e.g. (H, W) or
    (B, H, W)). Ground-truth pixels equal to ``ignore_index`` are skipped; prediction pixels
    equal to ``ignore_index`` count as class 0 (background), as in the reference evaluation.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise EvaluationError(
            f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; resize "
            "predictions to the label size (nearest neighbour) before scoring."
        )
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise EvaluationError(
                f"{name} must be an integer label map, got dtype {arr.dtype}; take the argmax "
                "over classes first."
            )
    pred = pred.astype(np.int64).ravel()
    gt = gt.astype(np.int64).ravel()
    _check_labels("ground truth", gt, num_classes, ignore_index)
    _check_labels("prediction", pred, num_classes, ignore_index)
    keep = gt != ignore_index
    pred = np.where(pred[keep] == ignore_index, 0, pred[keep])
    counts = np.bincount(gt[keep] * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray) -> dict[str, np.ndarray | float]:
    """Scores from a confusion matrix (C, C), rows ground truth, columns prediction.

    Returns ``iou``, ``fp``, ``fn``, ``class_accuracy`` (each (C,), NaN for classes with no
    pixels), and the floats ``miou``, ``pixel_accuracy``, ``mean_class_accuracy``,
    ``bg_fp``, ``bg_fn``, ``mean_fg_fp``, ``mean_fg_fn``.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}.")
    tp = np.diag(conf)
    gt_total = conf.sum(axis=1)
    pred_total = conf.sum(axis=0)
    union = gt_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        fp = np.where(union > 0, (pred_total - tp) / union, np.nan)
        fn = np.where(union > 0, (gt_total - tp) / union, np.nan)
        class_accuracy = np.where(gt_total > 0, tp / gt_total, np.nan)
    total = conf.sum()

    def nanmean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return {
        "iou": iou,
        "fp": fp,
        "fn": fn,
        "class_accuracy": class_accuracy,
        "miou": nanmean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_accuracy": nanmean(class_accuracy),
        "bg_fp": float(fp[0]),
        "bg_fn": float(fn[0]),
        "mean_fg_fp": nanmean(fp[1:]),
        "mean_fg_fn": nanmean(fn[1:]),
    }


class ConfusionAccumulator:
    """Sums confusion matrices over many label maps; ``result()`` gives segmentation_scores."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_updates = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Adds one label map (H, W) or a batch (B, H, W); shapes of pred and gt must match."""
        self.confusion += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        self.num_updates += 1

    def reset(self) -> None:
        """Clears the running matrix."""
        self.confusion[...] = 0
        self.num_updates = 0

    def result(self) -> dict[str, np.ndarray | float]:
        """segmentation_scores of the summed matrix."""
        return segmentation_scores(self.confusion)


def format_iou_table(
    scores: dict[str, np.ndarray | float], class_names: Sequence[str] | None = None
) -> str:
    """A readable table: summary lines, then one row per class (IoU, FP, FN, accuracy)."""
    iou = np.asarray(scores["iou"])
    if class_names is None:
        class_names = [str(i) for i in range(len(iou))]
    if len(class_names) != len(iou):
        raise ValueError(
            f"{len(class_names)} class names given for {len(iou)} classes; pass the names of the "
            "dataset that produced the scores (slr_jax.constants.class_names)."
        )
    width = max(15, max(len(n) for n in class_names) + 1)
    lines = [
        f"mIoU: {scores['miou']:.4f}   pixel acc: {scores['pixel_accuracy']:.4f}   "
        f"mean class acc: {scores['mean_class_accuracy']:.4f}",
        f"background fp: {scores['bg_fp']:.4f}, fn: {scores['bg_fn']:.4f}   "
        f"mean foreground fp: {scores['mean_fg_fp']:.4f}, fn: {scores['mean_fg_fn']:.4f}",
        "",
        f"{'class':<{width}} {'iou':>7} {'fp':>7} {'fn':>7} {'acc':>7}",
    ]
    for name, i, p, n, a in zip(
        class_names, iou, scores["fp"], scores["fn"], scores["class_accuracy"], strict=True
    ):
        lines.append(f"{name:<{width}} {i:>7.4f} {p:>7.4f} {n:>7.4f} {a:>7.4f}")
    return "\n".join(lines)


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Reads a single-channel PNG label map (mode L or P) as (H, W) int64 class indices."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            labels = np.array(image)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise EvaluationError(f"cannot read label map {path}: {err}") from err
    if labels.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise EvaluationError(
            f"{path} is a {mode} image of shape {labels.shape}; label maps must be single-channel "
            "PNGs (mode L or P) holding class indices, not colour visualisations."
        )
    return labels.astype(np.int64)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    ids: Sequence[str] | None,
    num_classes: int,
    ignore_index: int = IGNORE_LABEL,
) -> dict[str, np.ndarray | float]:
    """Scores ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` for every id.

    ``ids`` None means every ``*.png`` in ``pred_dir``. Raises EvaluationError listing missing
    files before reading anything, and naming the image whose shapes disagree.
    """
    pred_dir, gt_dir = os.fspath(pred_dir), os.fspath(gt_dir)
    for d in (pred_dir, gt_dir):
        if not os.path.isdir(d):
            raise EvaluationError(f"{d} is not a directory.")
    if ids is None:
        ids = sorted(n[:-4] for n in os.listdir(pred_dir) if n.endswith(".png"))
    ids = list(ids)
    if not ids:
        raise EvaluationError(f"no images to evaluate (no ids given and no PNG in {pred_dir}).")
    for kind, d in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        missing = [i for i in ids if not os.path.isfile(os.path.join(d, f"{i}.png"))]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise EvaluationError(
                f"{len(missing)} of {len(ids)} {kind} PNGs missing in {d}: {shown}; run "
                "inference for these ids or pass the ids that were exported."
            )
    accumulator = ConfusionAccumulator(num_classes, ignore_index)
    for image_id in ids:
        pred = read_label_png(os.path.join(pred_dir, f"{image_id}.png"))
        gt = read_label_png(os.path.join(gt_dir, f"{image_id}.png"))
        if pred.shape != gt.shape:
            raise EvaluationError(
                f"{image_id}: prediction {pred.shape} and ground truth {gt.shape} differ in size; "
                "predictions must be saved at the original image size."
            )
        try:
            accumulator.update(pred, gt)
        except EvaluationError as err:
            raise EvaluationError(f"{image_id}: {err}") from err
    return accumulator.result()


def score_predictions(
    predictions: Mapping[str, np.ndarray] | str | os.PathLike,
    ground_truth: Mapping[str, np.ndarray] | str | os.PathLike,
    num_classes: int,
    ids: Sequence[str] | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> dict[str, Any]:
    """mIoU and per-class scores (:func:`segmentation_scores`).

    Either two folders of ``<id>.png`` label maps (``evaluate_folders``) or two mappings
    id -> (H, W) label map; ``ids`` None means every prediction.
    """
    if isinstance(predictions, (str, os.PathLike)) or isinstance(ground_truth, (str, os.PathLike)):
        if not (
            isinstance(predictions, (str, os.PathLike))
            and isinstance(ground_truth, (str, os.PathLike))
        ):
            raise EvaluationError("pass either two folders or two mappings, not one of each.")
        return evaluate_folders(predictions, ground_truth, ids, num_classes, ignore_index)
    ids = list(predictions) if ids is None else list(ids)
    if not ids:
        raise EvaluationError("no predictions to evaluate.")
    missing = [i for i in ids if i not in ground_truth or i not in predictions]
    if missing:
        raise EvaluationError(
            f"{len(missing)} ids lack a prediction or ground truth: {missing[:5]}"
        )
    accumulator = ConfusionAccumulator(num_classes, ignore_index)
    for image_id in ids:
        accumulator.update(np.asarray(predictions[image_id]), np.asarray(ground_truth[image_id]))
    return accumulator.result()
