"""Evaluation of a model on the validation split: scores, the best checkpoint, results.json.

During training (``train.eval_every_epochs`` and at the end) and with ``--mode=evaluate``:
multi-scale inference of every validation image (``config.test``, ``slr_jax.infer``) scored
against its ground truth, without and with the dense CRF, plus the scores of the training
pseudo labels the objective would make for those images. ``WORKDIR/results.json`` holds the
latest evaluation; ``WORKDIR/best/`` the variables of the best ``miou``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from slr_jax import metrics
from slr_jax.constants import IGNORE_LABEL, class_names
from slr_jax.data import eval_dataset
from slr_jax.infer import normalise_image, run_inference
from slr_jax.infer.preprocess import example_error, example_fields
from slr_jax.losses import slrnet_objective
from slr_jax.models import build_model

RESULTS_FILE = "results.json"


def _sum_over_processes(array: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array).sum(axis=0)


def evaluate_model(config: Any, variables: Any, out_dir: str, limit: int = 0) -> dict:
    """Multi-scale inference on the validation split (``config.test``); returns
    ``run_inference``'s summary with scores over every process (each scores its own shard)."""
    examples = eval_dataset(config, limit=limit or None)
    summary = run_inference(config, variables, examples, out_dir, save_probs=False)
    if jax.process_count() > 1 and summary["confusions"]:
        confusions = {k: _sum_over_processes(c) for k, c in summary["confusions"].items()}
        summary["scores"] = {k: metrics.segmentation_scores(c) for k, c in confusions.items()}
        summary["num_scored"] = int(_sum_over_processes(np.asarray([summary["num_scored"]]))[0])
    return summary


def make_visuals_fn(config: Any, model: flax.linen.Module) -> Callable:
    """jit: (variables, batch of NumPy arrays) -> the objective's visuals (``cam``, ``refined``,
    ``pseudo``, each (B, h, w, C)) with the model in eval mode."""

    def visuals(variables, batch):
        outputs = model.apply(variables, batch["image"], mode="train", train=False)
        _, _, out = slrnet_objective(
            outputs, batch, loss_cfg=config.loss, variant=config.model.variant, seg_weight=1.0
        )
        return out

    return jax.jit(visuals)


def _pseudo_label_map(visuals_fn, variables, image_uint8, labels, size) -> np.ndarray:
    """(H, W) uint8 training pseudo label of one image: resized (PIL bicubic) to the crop size
    ``size``, labelled as the loss labels it, resized back (nearest); unassigned = 0."""
    height, width = image_uint8.shape[:2]
    resized = Image.fromarray(image_uint8).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    image = np.asarray(resized)
    batch = {
        "image": normalise_image(image)[None],
        "raw_image": (image.astype(np.float32) / 255.0)[None],
        "labels": np.asarray(labels, np.float32)[None],
        "mask": np.full((1, *size), IGNORE_LABEL, np.int32),
        "is_labeled": np.zeros((1,), bool),
    }
    pseudo = np.asarray(jax.device_get(visuals_fn(variables, batch))["pseudo"][0])
    label_map = np.where(pseudo.sum(-1) > 0, pseudo.argmax(-1), 0).astype(np.uint8)
    return np.asarray(Image.fromarray(label_map).resize((width, height), Image.Resampling.NEAREST))


def pseudo_label_scores(config: Any, variables: Any, limit: int = 0) -> dict | None:
    """Scores of the training pseudo labels on the validation split (image labels from the
    ground truth, as in training; see :func:`_pseudo_label_map`); pixels the pseudo label
    leaves unassigned count as background, the evaluation's convention for ignored
    predictions. One compiled program for every image size. None without ground truth."""
    crop = config.dataset.crop_size
    size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    visuals_fn = make_visuals_fn(config, build_model(config.model))
    accumulator = metrics.ConfusionAccumulator(int(config.model.num_classes))
    for example in eval_dataset(config, limit=limit or None):
        if example_error(example):
            continue  # listed by evaluate_model's inference
        fields = example_fields(example)
        if fields is None or fields["mask"] is None or fields["labels"] is None:
            continue
        gt = np.asarray(fields["mask"])
        if (gt != IGNORE_LABEL).any():
            label_map = _pseudo_label_map(
                visuals_fn, variables, fields["image_uint8"], fields["labels"], size
            )
            accumulator.update(label_map, gt)
    accumulator.confusion = _sum_over_processes(accumulator.confusion)
    return accumulator.result() if accumulator.confusion.any() else None


def _per_class(names, iou) -> dict[str, float | None]:
    return {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, iou)}


def results_of(config, step: int, summary: dict, pseudo: dict | None, out_dir: str) -> dict:
    """The ``results.json`` record of one evaluation."""
    scores = summary["scores"]["pred"]
    names = class_names(int(config.model.num_classes))
    result = {
        "step": step,
        "split": config.dataset.val_split,
        "num_images": summary["num_scored"],
        "miou": float(scores["miou"]),
        "pseudo_label_miou": float(pseudo["miou"]) if pseudo is not None else float("nan"),
        "per_class_iou": _per_class(names, scores["iou"]),
        "pseudo_label_per_class_iou": _per_class(names, pseudo["iou"]) if pseudo else {},
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "out_dir": out_dir,
        "unreadable": [{"name": name, "error": why} for name, why in summary["failed"]],
    }
    if "crf" in summary["scores"]:
        result["crf_miou"] = float(summary["scores"]["crf"]["miou"])
        result["crf_per_class_iou"] = _per_class(names, summary["scores"]["crf"]["iou"])
    return result


def evaluate_and_keep_best(config, state, checkpoints, workdir: str, step: int, writer) -> dict:
    """Val-split inference (``config.test``), pseudo-label scores, the best checkpoint (via
    ``checkpoints.save_best``) and ``WORKDIR/results.json``; returns the results record, or
    {} when no validation image has ground truth. Unreadable validation examples (a corrupt
    file, a mask of another size) are skipped, logged and listed under ``unreadable``: a
    finished training run is never thrown away for one bad file."""
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    out_dir = os.path.join(workdir, "eval", f"step_{step}")
    limit = int(config.train.eval_limit)
    summary = evaluate_model(config, variables, out_dir, limit)
    for name, why in summary["failed"]:
        logging.warning("evaluation skipped %s: %s", name, why)
    if "pred" not in summary["scores"]:
        logging.warning("no validation image has ground truth; skipped scoring.")
        return {}
    pseudo = None
    if config.loss.objective == "slrnet":  # a supervised model makes no pseudo labels
        pseudo = pseudo_label_scores(config, variables, limit)
    result = results_of(config, step, summary, pseudo, out_dir)
    logging.info(
        "step %d: val mIoU %.4f (pseudo labels %.4f) over %d images",
        step, result["miou"], result["pseudo_label_miou"], result["num_images"],
    )  # fmt: skip
    if writer is not None:
        for key in ("miou", "pseudo_label_miou", "pixel_accuracy"):
            writer.scalar(f"val/{key}", result[key], step)
        writer.flush()
    if math.isfinite(result["miou"]):
        checkpoints.save_best(state, result["miou"], {"miou": result["miou"], "step": step})
    if jax.process_index() == 0:
        text = json.dumps(result, indent=2)
        (epath.Path(out_dir) / RESULTS_FILE).write_text(text)
        (epath.Path(workdir) / RESULTS_FILE).write_text(text)
    return result


def write_scores(out_dir: str, scores: dict, num_classes: int) -> str:
    """Writes ``scores.json`` and ``scores.csv`` (per-class IoU/FP/FN) in ``out_dir``; returns
    the console table."""
    names = class_names(num_classes)
    table = metrics.format_iou_table(scores, names)
    os.makedirs(out_dir, exist_ok=True)
    plain = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in scores.items()}
    with open(os.path.join(out_dir, "scores.json"), "w") as handle:
        json.dump(plain, handle, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "fp", "fn", "class_accuracy"])
        for c in range(num_classes):
            row = [plain[k][c] for k in ("iou", "fp", "fn", "class_accuracy")]
            writer.writerow([names[c], *row])
    return table
