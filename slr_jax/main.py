"""The slr_jax entry point: train, evaluate or infer with an ``ml_collections`` config file.

    python -m slr_jax.main --config=configs/voc.py --workdir=DIR [--config.train.lr=1e-3]
    python -m slr_jax.main --config=configs/voc.py --mode=evaluate --checkpoint=DIR --output=OUT
    python -m slr_jax.main --config=configs/voc.py --mode=infer --checkpoint=DIR --output=OUT \
        [--split=val | --images=PHOTO_DIR] [--save_scores] [--use_cls_label]

The same command runs on one CPU, one GPU or every host of a TPU pod: with several processes
(TPU pod workers, or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
set, see ``launch/``) it calls ``jax.distributed.initialize()`` first. ``--checkpoint`` is a
training workdir (its best, else latest, checkpoint) or a variables checkpoint written by
``python -m slr_jax.convert``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

# Config files import ``configs.common``: make the repository root importable wherever the
# command is started from.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "evaluate", "infer")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (configs/*.py)", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "training directory (local or gs://)")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "what to run")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "evaluate/infer: training workdir or converted variables checkpoint"
)
_OUTPUT = flags.DEFINE_string("output", None, "evaluate/infer: output folder")
_SPLIT = flags.DEFINE_string("split", None, "evaluate/infer: dataset split (default: val split)")
_IMAGES = flags.DEFINE_string("images", None, "infer: a folder of JPEG/PNG photographs")
_SAVE_SCORES = flags.DEFINE_bool("save_scores", False, "infer: also write STEM.npy score maps")
_USE_CLS_LABEL = flags.DEFINE_bool(
    "use_cls_label", False, "infer/evaluate: class presence from the image labels"
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ("auto", "on", "off"), "call jax.distributed.initialize()"
)


class ConfigError(ValueError):
    """The config has unknown keys or values the code cannot use."""


def _flatten_keys(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items") and key not in ("crf", "class_pows"):
            out.update(_flatten_keys(value, path + "."))
        else:
            out[path] = value
    return out


def validate_config(config: Any) -> None:
    """Rejects keys that ``configs/common.py`` does not define and impossible values, with
    messages naming the key, before anything heavy starts."""
    from configs import common
    from slr_jax import pretrain
    from slr_jax.models.slrnet import VARIANTS

    known = _flatten_keys(common.get_config())
    given = _flatten_keys(config)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config keys {unknown}; the known keys are listed in configs/common.py."
        )
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config lacks {missing}; build configs from configs/common.py.")
    problems = []
    if config.model.variant not in VARIANTS:
        problems.append(f"model.variant={config.model.variant!r} not in {VARIANTS}")
    if config.model.dtype not in ("float32", "bfloat16"):
        problems.append(f"model.dtype={config.model.dtype!r} must be 'float32' or 'bfloat16'")
    if config.model.variant == "coco" and config.model.num_classes != 81:
        problems.append("the coco variant needs model.num_classes=81")
    if config.train.batch_size < 1:
        problems.append(f"train.batch_size={config.train.batch_size} must be >= 1")
    if not 0 <= config.train.pretrain_epochs < config.train.num_epochs:
        problems.append(
            f"need 0 <= train.pretrain_epochs ({config.train.pretrain_epochs}) < "
            f"train.num_epochs ({config.train.num_epochs})"
        )
    if config.checkpoint.every_steps < 1:
        problems.append("checkpoint.every_steps must be >= 1")
    try:
        pretrain.check_settings(config)
    except pretrain.PretrainError as error:
        problems.append(str(error))
    if len(config.loss.loss_coeff) != 4:
        problems.append("loss.loss_coeff needs 4 values (cls, mask, code, seg)")
    weights = config.loss.class_weights
    if weights and len(weights) != config.model.num_classes - 1:
        problems.append(
            f"loss.class_weights has {len(weights)} values for {config.model.num_classes - 1} "
            "foreground classes"
        )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems) + ".")


def maybe_initialize_distributed(mode: str) -> None:
    """``jax.distributed.initialize()`` on TPU pods and configured multi-process GPU runs."""
    import jax

    env = os.environ
    multi_gpu = int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "on" or (mode == "auto" and (multi_gpu or tpu_pod)):
        if multi_gpu:
            jax.distributed.initialize(
                coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env.get("JAX_PROCESS_ID", "0")),
            )
        else:
            jax.distributed.initialize()
        logging.info("process %d of %d", jax.process_index(), jax.process_count())


def load_model_variables(config: Any, checkpoint: str) -> dict:
    """Variables from a training workdir or a converted checkpoint, checked against the model."""
    import jax

    from slr_jax import checkpoint as checkpoint_lib
    from slr_jax.models import build_model, variable_shapes
    from slr_jax.train import latest_variables

    path = Path(checkpoint)
    if not checkpoint.startswith("gs://") and not path.is_dir():
        raise checkpoint_lib.CheckpointError(
            f"--checkpoint {checkpoint} is not a folder; pass a training workdir or the output "
            "of `python -m slr_jax.convert`."
        )
    if (path / checkpoint_lib.VARIABLES_DIR).exists():
        variables, metadata = checkpoint_lib.load_variables(checkpoint)
        for key in ("variant", "num_classes"):
            if key in metadata and metadata[key] != config.model[key]:
                raise checkpoint_lib.CheckpointError(
                    f"{checkpoint} was converted for {key}={metadata[key]!r} but the config has "
                    f"model.{key}={config.model[key]!r}; use the matching configs/*.py."
                )
    else:
        variables, step = latest_variables(checkpoint)
        logging.info("using the checkpoint of step %d in %s", step, checkpoint)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    shapes = variable_shapes(build_model(config.model))
    checkpoint_lib.check_tree_shapes(shapes, variables, f"checkpoint {checkpoint}")
    return jax.tree_util.tree_map(lambda x: x, variables)


def write_scores(out_dir: str, scores: dict, num_classes: int) -> str:
    """Console table plus ``scores.json`` and ``scores.csv`` (per-class IoU/FP/FN) in out_dir."""
    import numpy as np

    from slr_jax import evaluate

    names = evaluate.VOC_CLASSES if num_classes == len(evaluate.VOC_CLASSES) else None
    table = evaluate.format_iou_table(scores, names)
    os.makedirs(out_dir, exist_ok=True)
    plain = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in scores.items()}
    with open(os.path.join(out_dir, "scores.json"), "w") as handle:
        json.dump(plain, handle, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "fp", "fn", "class_accuracy"])
        for c in range(num_classes):
            name = names[c] if names else str(c)
            writer.writerow([name] + [plain[k][c] for k in ("iou", "fp", "fn", "class_accuracy")])
    return table


def run_evaluate_or_infer(config: Any, mode: str) -> dict:
    from slr_jax import data as data_lib
    from slr_jax.infer import collect_image_paths, read_photograph, run_inference

    if not _CHECKPOINT.value or not _OUTPUT.value:
        raise ConfigError(f"--mode={mode} needs --checkpoint=DIR and --output=DIR.")
    if _USE_CLS_LABEL.value:
        config.test.use_image_labels = True
    variables = load_model_variables(config, _CHECKPOINT.value)
    if _IMAGES.value:
        if mode == "evaluate":
            raise ConfigError("--images has no ground truth; use --mode=infer for photographs.")
        paths = collect_image_paths([_IMAGES.value])
        examples = ({"name": p.stem, "image": read_photograph(p)} for p in paths)
    else:
        examples = data_lib.eval_dataset(config, split=_SPLIT.value)
    summary = run_inference(
        config, variables, examples, _OUTPUT.value, save_probs=_SAVE_SCORES.value, log=print
    )
    print(f"wrote {summary['num_images']} predictions to {_OUTPUT.value}")
    for kind, scores in summary.get("scores", {}).items():
        out_dir = os.path.join(_OUTPUT.value, f"scores_{kind}")
        print(f"[{kind}]\n" + write_scores(out_dir, scores, int(config.model.num_classes)))
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from slr_jax.checkpoint import CheckpointError
    from slr_jax.data import DataError
    from slr_jax.infer import InferenceError
    from slr_jax.pretrain import PretrainError
    from slr_jax.train import TrainingError, train_and_evaluate

    config = _CONFIG.value
    try:
        if config is None:
            raise ConfigError("--config=configs/<setting>.py is required.")
        validate_config(config)
        maybe_initialize_distributed(_DISTRIBUTED.value)
        if _MODE.value == "train":
            if not _WORKDIR.value:
                raise ConfigError("--mode=train needs --workdir=DIR (local or gs://).")
            result = train_and_evaluate(config, _WORKDIR.value)
            if result["eval"]:
                ev = result["eval"]
                crf = f", after the dense CRF {ev['crf_miou']:.4f}" if "crf_miou" in ev else ""
                print(
                    f"final step {result['step']}: val mIoU {ev['miou']:.4f}{crf}, pseudo-label "
                    f"mIoU {ev['pseudo_label_miou']:.4f} ({_WORKDIR.value}/results.json)"
                )
        else:
            run_evaluate_or_infer(config, _MODE.value)
    except (
        ConfigError,
        CheckpointError,
        DataError,
        InferenceError,
        PretrainError,
        TrainingError,
    ) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
