"""The slr_jax entry point: train, evaluate or infer with an ``ml_collections`` config file.

    python -m slr_jax.main --config=configs/voc.py --workdir=DIR [--config.train.lr=1e-3]
    python -m slr_jax.main --mode=evaluate --checkpoint=DIR --output=OUT [--config=...]
    python -m slr_jax.main --mode=infer --checkpoint=DIR --output=OUT \
        [--split=val | --images=PHOTOS] [--save_scores] [--use_cls_label] [--config=...]

``python -m slr_jax.infer`` is the same command with ``--mode=infer``. The same command runs on
one CPU, one GPU or every host of a TPU pod: with several processes (TPU pod workers, or
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set, see ``launch/``) it
calls ``jax.distributed.initialize()`` first.

``--checkpoint`` is a training workdir (its best, else latest, checkpoint) or a variables
checkpoint written by ``python -m slr_jax.convert``. For evaluate/infer without ``--config``
the settings are the checkpoint's own (``slr_jax.config.config_for_checkpoint``); overrides
such as ``--config.test.use_crf=True`` apply to them.

Exit status (``slr_jax.cli``): 0 when the run finished, 1 for a user error (one line on stderr
naming the culprit; ``--debug`` shows the traceback) and for evaluate/infer runs that skipped
unreadable images (every readable one is processed; the skipped ones are listed), 2 for bad
flags, :data:`EXIT_PREEMPTED` when training stopped on SIGTERM or Ctrl-C after saving a
checkpoint (rerun the same command to resume), 130 for an interrupt that could not save.

Training takes the workdir's lock (``slr_jax.workdir_lock``) and, on resume, refuses a config
that changes the network or the data unless ``--allow_config_change`` names the keys
(``slr_jax.resume``); both are described in docs/scaling.md.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from slr_jax import _REPO_ROOT, cli, resume, workdir_lock
from slr_jax import config as config_lib
from slr_jax.errors import ConfigError, FlagError, Preempted

MODES = ("train", "evaluate", "infer")
EXIT_PREEMPTED = cli.EXIT_PREEMPTED
COMMON_CONFIG = os.path.join(_REPO_ROOT, "configs", "common.py")

# config_flags reads ``--config.KEY=...`` overrides from sys.argv when the flag is defined or
# parsed and raises on an unknown KEY; the error is reported as one line when flags are parsed.
_STARTUP_ERRORS: list[str] = []


def _unknown_key_message(error: BaseException) -> str:
    """One line from ml_collections' "'lrr'\\nDid you mean "lr" instead of "lrr"?" error."""
    text = str(error).replace("\\n", "\n").replace("\\", "").replace("'", "")
    key, _, hint = text.strip().partition("\n")
    hint = f"; {hint.strip()[:1].lower()}{hint.strip()[1:]}" if hint.strip() else ""
    return (
        f"a --config.KEY override names no config key ({key.strip()}{hint}); the known keys "
        "are listed in configs/common.py."
    )


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", COMMON_CONFIG, "ml_collections config file (configs/*.py)", lock_config=True
    )
except (AttributeError, KeyError, TypeError, ValueError) as _error:
    _STARTUP_ERRORS.append(_unknown_key_message(_error))
    _CONFIG = None
_WORKDIR = flags.DEFINE_string("workdir", None, "training directory (local or gs://)")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "what to run")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "evaluate/infer: training workdir or converted variables checkpoint"
)
_OUTPUT = flags.DEFINE_string("output", None, "evaluate/infer: output folder")
_SPLIT = flags.DEFINE_string("split", None, "evaluate/infer: dataset split (default: val split)")
_IMAGES = flags.DEFINE_list("images", None, "infer: JPEG/PNG photographs or folders of them")
_SAVE_SCORES = flags.DEFINE_bool("save_scores", False, "infer: also write STEM.npy score maps")
_USE_CLS_LABEL = flags.DEFINE_bool(
    "use_cls_label", False, "infer/evaluate: class presence from the image labels"
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ("auto", "on", "off"), "call jax.distributed.initialize()"
)
_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of user errors")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change",
    [],
    "train: config keys (KEY,KEY) a resumed run may change although they define the network, "
    "the data or the objective (docs/scaling.md)",
)


def _config_given() -> bool:
    return _CONFIG is not None and flags.FLAGS["config"].present


def _loaded_config() -> Any:
    """The ``--config`` file's config (or configs/common.py's) with the overrides applied."""
    try:
        config = _CONFIG.value
        config.keys()  # config_flags reports a file it could not load at the first access
        return config
    except OSError as error:
        detail = str(error).strip().splitlines()[-1].strip()
        name = config_flags.get_config_filename(flags.FLAGS["config"])
        raise ConfigError(f"--config {name} cannot be loaded ({detail}).") from None


def resolve_config(mode: str) -> Any:
    """The run's config: the ``--config`` file for training (required); for evaluate/infer
    the ``--config`` file if given, else the checkpoint's own settings, overrides applied."""
    if mode == "train" and not _config_given():
        raise ConfigError("--mode=train needs --config=configs/<setting>.py.")
    if mode == "train" or _config_given():
        return _loaded_config()
    if not _CHECKPOINT.value:
        raise ConfigError(f"--mode={mode} needs --checkpoint=DIR and --output=DIR.")
    config = config_lib.config_for_checkpoint(_CHECKPOINT.value)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    return config_lib.apply_overrides(config, overrides)


def enable_compilation_cache(config: Any, folder: str) -> str | None:
    """Turns on JAX's persistent compilation cache in ``config.compile_cache_dir`` ('' =
    ``folder/compile_cache``; 'none' = off); returns the folder used."""
    import jax

    setting = str(config.compile_cache_dir)
    if setting.lower() == "none":
        return None
    cache = setting or os.path.join(folder, "compile_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    # Every program goes in: the network's compile takes seconds to minutes, its pieces less.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.info("persistent compilation cache: %s", cache)
    return cache


def run_evaluate_or_infer(config: Any, mode: str) -> dict:
    """Predictions (and scores where there is ground truth) of a checkpoint on a dataset split
    or on photographs, written to ``--output``."""
    # lazy: JAX, orbax and tfds load only after the flags parse (fast --help and flag errors)
    from slr_jax import data as data_lib
    from slr_jax import evaluation
    from slr_jax.checkpoint import load_model_variables
    from slr_jax.infer import run_inference
    from slr_jax.infer.preprocess import collect_image_paths, photographs
    from slr_jax.infer.runner import prepare_output_dir

    if not _CHECKPOINT.value or not _OUTPUT.value:
        raise ConfigError(f"--mode={mode} needs --checkpoint=DIR and --output=DIR.")
    if _USE_CLS_LABEL.value:
        config.test.use_image_labels = True
    prepare_output_dir(_OUTPUT.value)  # before loading anything
    enable_compilation_cache(config, _OUTPUT.value)
    variables = load_model_variables(config.model, _CHECKPOINT.value)
    if _IMAGES.value:
        if mode == "evaluate":
            raise ConfigError("--images has no ground truth; use --mode=infer for photographs.")
        examples = photographs(collect_image_paths(_IMAGES.value))
    else:
        examples = data_lib.eval_dataset(config, split=_SPLIT.value)
    summary = run_inference(
        config, variables, examples, _OUTPUT.value, save_probs=_SAVE_SCORES.value, log=print
    )
    print(f"wrote {summary['num_images']} predictions to {_OUTPUT.value}")
    for kind, scores in summary["scores"].items():
        out_dir = os.path.join(_OUTPUT.value, f"scores_{kind}")
        table = evaluation.write_scores(out_dir, scores, int(config.model.num_classes))
        print(f"[{kind}]\n{table}")
    for name, why in summary["failed"]:
        print(f"error: skipped {name}: {why}", file=sys.stderr)
    return summary


def check_workdir(workdir: str | None) -> None:
    """A missing ``--workdir``, or one that is an existing file or cannot be created, is a
    ConfigError (before any compute)."""
    if not workdir:
        raise ConfigError("--mode=train needs --workdir=DIR (local or gs://).")
    if "://" in workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file; pass a folder (new, or a run's).")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create --workdir {workdir} ({error.strerror}).") from None


def training_log(workdir: str) -> str:
    """The log file of this process: ``WORKDIR/train.log`` (process i > 0: ``train.i.log``);
    for a gs:// workdir, the same name in a local temporary folder."""
    import tempfile

    import jax

    index = jax.process_index()
    name = "train.log" if index == 0 else f"train.{index}.log"
    folder = workdir if "://" not in workdir else os.path.join(tempfile.gettempdir(), "slr_jax")
    return os.path.join(folder, name)


def run_train(config: Any) -> int:
    """Trains in ``--workdir``; returns the exit status (0, or :data:`EXIT_PREEMPTED`)."""
    # lazy: JAX, orbax and tfds load only after the flags parse (fast --help and flag errors)
    from slr_jax import stage2
    from slr_jax.train import train_and_evaluate

    check_workdir(_WORKDIR.value)
    resume.check_allowed_keys(_ALLOW_CONFIG_CHANGE.value)
    try:
        with workdir_lock.hold(_WORKDIR.value):
            cli.log_to_file(training_log(_WORKDIR.value))
            enable_compilation_cache(config, _WORKDIR.value)
            config = stage2.prepare(config, _WORKDIR.value)  # pseudo labels of a first stage
            result = train_and_evaluate(
                config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
            )
    except Preempted:
        result = {"preempted": True, "step": 0}
    if result["preempted"]:
        print(
            f"stopped at step {result['step']} for preemption after saving a checkpoint; rerun "
            f"the same command to resume (exit status {EXIT_PREEMPTED})."
        )
        return EXIT_PREEMPTED
    if result["eval"]:
        ev = result["eval"]
        crf = f", after the dense CRF {ev['crf_miou']:.4f}" if "crf_miou" in ev else ""
        pseudo = ev["pseudo_label_miou"]
        pseudo = f", pseudo-label mIoU {pseudo:.4f}" if pseudo == pseudo else ""  # NaN: none
        print(
            f"final step {result['step']}: val mIoU {ev['miou']:.4f}{crf}{pseudo} "
            f"({_WORKDIR.value}/results.json)"
        )
    return 0


def main(argv: list[str], default_mode: str = "train") -> None:
    """absl's main: runs the mode under :func:`slr_jax.cli.run_cli` (one line per user error)."""
    cli.run_cli(functools.partial(_main, argv, default_mode), debug=_DEBUG.value)


def _main(argv: list[str], default_mode: str) -> int:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments {argv[1:]} (see --help)")
    # lazy: sharding imports JAX, needed only once the flags parse
    from slr_jax.sharding import maybe_initialize_distributed

    mode = _MODE.value if flags.FLAGS["mode"].present else default_mode
    config = resolve_config(mode)
    config_lib.validate_config(config, mode)
    maybe_initialize_distributed(_DISTRIBUTED.value)
    if mode == "train":
        return run_train(config)
    return 1 if run_evaluate_or_infer(config, mode)["failed"] else 0


def _config_file_error(error: BaseException) -> str:
    """One line for a config file that raised while loading (syntax error, bad code)."""
    args = sys.argv[1:]
    name = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if name is None and "--config" in args[:-1]:
        name = args[args.index("--config") + 1]
    name = name or "(configs/common.py)"
    if isinstance(error, SyntaxError):
        where = f"line {error.lineno}: {error.msg}"
    else:
        frames = traceback.extract_tb(error.__traceback__)
        mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(name)]
        line = f"line {mine[-1].lineno}: " if mine else ""
        where = f"{line}{type(error).__name__}: {_first_line(error)}"
    return f"--config {name} cannot be loaded ({where}); fix the file."


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag reported as one line (exit status 2) and a config
    file that cannot be loaded as one line (exit status 1)."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        message = _STARTUP_ERRORS[0] if _STARTUP_ERRORS else f"{error} (see --help)"
        sys.exit(print(f"error: {message}", file=sys.stderr) or cli.EXIT_BAD_FLAGS)
    except (AttributeError, KeyError) as error:  # config_flags: an override of no config key
        _STARTUP_ERRORS.append(_unknown_key_message(error))
    except Exception as error:  # noqa: BLE001 - the user's config file raised while loading
        print(f"error: {_config_file_error(error)}", file=sys.stderr)
        sys.exit(cli.EXIT_USER_ERROR)
    if _STARTUP_ERRORS:
        sys.exit(print(f"error: {_STARTUP_ERRORS[0]}", file=sys.stderr) or cli.EXIT_BAD_FLAGS)
    return remaining


def main_infer(argv: list[str]) -> None:
    """``python -m slr_jax.infer``: :func:`main` with ``--mode=infer`` unless given."""
    main(argv, default_mode="infer")


def run(default_mode: str = "train") -> None:
    app.run(functools.partial(main, default_mode=default_mode), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
