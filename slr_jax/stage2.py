"""Two-stage training: a first stage's predictions on the training split become the pixel labels
of a fully supervised second stage (the paper's pseudo labels -> DeepLabV3+ row).

The second stage is an ordinary training run (``train.train_and_evaluate``) whose config reads
its training masks from ``dataset.pseudo_label_dir`` (``data/voc.py: with_pseudo_labels``).
With ``stage1.config`` set and ``dataset.pseudo_label_dir`` empty, :func:`prepare` finds or makes
those labels first:

1. the first stage (``stage1.config``, with this run's ``dataset.data_dir``/``manual_dir``) is
   trained in ``stage1.workdir`` ('' = ``WORKDIR/stage1``), resuming a stopped run; a finished
   one is only evaluated again;
2. its best (else latest) checkpoint predicts every image of its training split with its
   ``test`` settings and, with ``stage1.use_image_labels``, class presence from the image
   labels (``infer.run_inference``), written to ``WORKDIR_1/pseudo_labels/{pred,crf}/<id>.png``
   with their scores against the ground truth in ``WORKDIR_1/pseudo_labels/scores_*``;
3. ``dataset.pseudo_label_dir`` becomes ``WORKDIR_1/pseudo_labels/crf`` (``pred`` when the first
   stage's ``test.use_crf`` is off).

Labels already complete there are used as they are. An explicit ``dataset.pseudo_label_dir``
is never written: it must already hold one ``<id>.png`` per training image.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from absl import logging

from slr_jax import _REPO_ROOT, evaluation
from slr_jax import data as data_lib
from slr_jax.checkpoint import load_model_variables
from slr_jax.config import validate_config
from slr_jax.data import pipeline
from slr_jax.errors import ConfigError, DataError, Preempted
from slr_jax.infer import run_inference
from slr_jax.train import train_and_evaluate

EXPORT_DIR = "pseudo_labels"


def load_config_file(path: str) -> Any:
    """``get_config()`` of a config file (a path, or relative to the repository root)."""
    found = path if os.path.isfile(path) else os.path.join(_REPO_ROOT, path)
    if not os.path.isfile(found):
        raise ConfigError(f"config.stage1.config {path} does not exist (nor under {_REPO_ROOT}).")
    spec = importlib.util.spec_from_file_location("slr_jax_stage1_config", found)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def first_stage_config(config: Any) -> Any:
    """The first stage's config: ``stage1.config`` reading this run's dataset folders."""
    first = load_config_file(str(config.stage1.config))
    first.dataset.data_dir = config.dataset.data_dir
    first.dataset.manual_dir = config.dataset.manual_dir
    first.compile_cache_dir = config.compile_cache_dir
    validate_config(first, "train")
    return first


def _labels_complete(config: Any) -> bool:
    try:
        pipeline.train_examples(config)
    except DataError:
        return False
    return True


def prepare(config: Any, workdir: str) -> Any:
    """``config`` with ``dataset.pseudo_label_dir`` pointing at complete first-stage labels,
    made first when missing (see the module docstring); ``config`` itself when it names no
    first stage. Raises ``Preempted`` when the first stage stopped for preemption."""
    if not config.stage1.config or config.dataset.pseudo_label_dir:
        return config
    first = first_stage_config(config)
    first_workdir = str(config.stage1.workdir) or os.path.join(workdir, "stage1")
    out_dir = os.path.join(first_workdir, EXPORT_DIR)
    config.dataset.pseudo_label_dir = os.path.join(out_dir, "crf" if first.test.use_crf else "pred")
    if _labels_complete(config):
        logging.info("stage 1: using the pseudo labels in %s", config.dataset.pseudo_label_dir)
        return config
    started = os.path.isdir(os.path.join(first_workdir, "checkpoints"))
    if not (started or first.train.init_checkpoint or int(first.pretrain.steps)):
        raise ConfigError(
            f"the pseudo labels are not in {config.dataset.pseudo_label_dir} and the first "
            f"stage {config.stage1.config} has no initial weights to train from: pass "
            "--config.dataset.pseudo_label_dir=LABELS, --config.stage1.workdir=A_FINISHED_RUN, "
            "or set the first stage's train.init_checkpoint in its config file."
        )
    train_first_stage(first, first_workdir)
    export_pseudo_labels(first, first_workdir, out_dir, bool(config.stage1.use_image_labels))
    return config


def train_first_stage(first: Any, workdir: str) -> dict:
    """Trains (or resumes, or re-evaluates a finished) first stage in ``workdir``."""
    logging.info("stage 1: training %s in %s", first.model.variant, workdir)
    result = train_and_evaluate(first, workdir)
    if result["preempted"]:
        raise Preempted("the first stage stopped for preemption")
    return result


def export_pseudo_labels(first: Any, workdir: str, out_dir: str, use_image_labels: bool) -> dict:
    """Predictions of the first stage's checkpoint in ``workdir`` on its training split, as
    ``out_dir/{pred,crf}/<id>.png`` (+ scores against the ground truth); returns the summary."""
    variables = load_model_variables(first.model, workdir)
    first.test.use_image_labels = use_image_labels
    examples = data_lib.eval_dataset(first, split=first.dataset.train_split)
    summary = run_inference(first, variables, examples, out_dir)
    for kind, scores in summary["scores"].items():
        evaluation.write_scores(
            os.path.join(out_dir, f"scores_{kind}"), scores, int(first.model.num_classes)
        )
        logging.info("stage 1: %s pseudo labels, train mIoU %.4f", kind, scores["miou"])
    return summary
