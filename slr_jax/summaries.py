"""What training writes as it goes: the console line, ``metrics.jsonl`` and TensorBoard.

Only process 0 writes files; every process logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from slr_jax.constants import IGNORE_LABEL, voc_palette
from slr_jax.sharding import BATCH_KEYS

METRICS_FILE = "metrics.jsonl"


def summary_writer(workdir: str):
    """A TensorBoard writer under ``WORKDIR/tensorboard`` on process 0, else None."""
    if jax.process_index() != 0:
        return None
    from flax.metrics import tensorboard

    return tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))


def log_metrics(writer, workdir: str, step: int, total_steps: int, metrics: dict) -> None:
    """Console line with progress and ETA, TensorBoard scalars and ``metrics.jsonl``."""
    rate = metrics.get("steps_per_s", 0.0)
    eta = (total_steps - step) / rate if rate > 0 else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    logging.info(
        "step %d/%d (%.0f%%) loss %.4g | %.3g steps/s | ETA %s",
        step, total_steps, 100.0 * step / total_steps, metrics.get("total", float("nan")),
        rate, eta_text,
    )  # fmt: skip
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if jax.process_index() != 0:
        return
    with (epath.Path(workdir) / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps({"step": step, "loss": metrics.get("total"), **metrics}) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            writer.scalar(f"train/{key}", value, step)
        writer.flush()


def colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 in the VOC palette (255 = its boundary colour)."""
    palette = np.asarray(voc_palette(), np.uint8).reshape(-1, 3)
    return palette[np.clip(labels, 0, palette.shape[0] - 1)]


def write_images(
    writer, visuals_fn: Callable, variables: Any, batch: Mapping[str, Any], step: int
) -> None:
    """The first training image, then overlays of its CAM, PAMR-refined mask and pseudo label
    (argmax; unassigned pixels in the ignore colour), side by side, as the reference's
    visualisation shows. ``visuals_fn``: ``evaluation.make_visuals_fn``."""
    one = {k: np.asarray(batch[k])[:1] for k in BATCH_KEYS}
    visuals = jax.device_get(visuals_fn(variables, one))
    raw = (one["raw_image"][0] * 255).clip(0, 255).astype(np.uint8)
    pseudo = visuals["pseudo"][0]
    pseudo_labels = np.where(pseudo.sum(-1) > 0, pseudo.argmax(-1), IGNORE_LABEL)
    cam = visuals["cam"][0].argmax(-1)
    refined = visuals["refined"][0].argmax(-1)
    overlay = lambda labels: (0.5 * raw + 0.5 * colourise(labels)).astype(np.uint8)
    panel = np.concatenate([raw, overlay(cam), overlay(refined), overlay(pseudo_labels)], axis=1)
    writer.image("train/image_cam_refined_pseudo", panel, step)
    writer.flush()


def truncate_metrics(workdir: str, step: int) -> None:
    """Drops the ``metrics.jsonl`` lines of steps after ``step`` (a run resumed from an older
    checkpoint logs those steps again), so each step appears once."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        staging = path.parent / (METRICS_FILE + ".tmp")
        staging.write_text("".join(kept))
        staging.replace(path)
        logging.info("dropped %d lines after step %d from %s", len(lines) - len(kept), step, path)


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a line cut short by a crash: dropped, the step is logged again
