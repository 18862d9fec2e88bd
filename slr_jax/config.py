"""Config checks: every key known, every value usable, before anything heavy starts.

``configs/common.py`` is the one place where a setting has a default; every other config file
starts from it and the code reads keys without fallbacks, so a config that lacks a key or has
an unknown one is refused here with the key's name.
"""

from __future__ import annotations

from typing import Any

from slr_jax.constants import BUCKET_PAD_MODES, COMPUTE_DTYPES, RESIZE_METHODS, VARIANTS
from slr_jax.errors import ConfigError, PretrainError

# Sections whose entries are free-form mappings rather than fixed keys.
_MAPPING_KEYS = ("crf", "class_pows")
# config.json: the configs a run was started with, beside the current one (slr_jax/resume.py).
CONFIG_HISTORY_KEY = "history"


def flatten_keys(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{'model.width': 1.0, ...}``: the leaf keys of a ConfigDict (or nested dict)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items") and key not in _MAPPING_KEYS:
            out.update(flatten_keys(value, path + "."))
        else:
            out[path] = value
    return out


def check_keys(config: Any) -> None:
    """Raises ConfigError naming keys ``configs/common.py`` does not define, or lacks."""
    # lazy: slr_jax.main imports this module before --config is loaded, and a broken
    # configs/common.py must fail there as one line, not as a traceback at import
    from configs import common

    known = flatten_keys(common.get_config())
    given = flatten_keys(config)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config keys {unknown}; the known keys are listed in configs/common.py."
        )
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config lacks {missing}; build configs from configs/common.py.")


ARCHS = ("slrnet", "deeplab")
OBJECTIVES = ("slrnet", "supervised")
DATASETS = ("voc", "synthetic", "coco")
# The network downsamples 8x, and the second view is a fraction of the crop.
MIN_CROP = 16


# ----------------------------------------------------------------------------- the key table
# Every leaf key of configs/common.py has one row: what its value must be, and whether a resumed
# run may change it. FIXED keys define the network, the data stream or the objective: changing
# them on resume makes another run out of this one (slr_jax/resume.py refuses it unless asked);
# SAFE keys (logging, evaluation, checkpoint cadence, paths, numerics) may change freely.
# tests/test_cli_errors.py checks that the table and configs/common.py have the same keys.
FIXED, SAFE = "fixed", "safe"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(low: int, why: str = ""):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}{why}"
        return None

    return check


def _real(low: float = 0.0, high: float = float("inf"), *, above: bool = False):
    """A number in [low, high], or in (low, high] with ``above``."""

    def check(value):
        ok = _number(value) and (value > low if above else value >= low) and value <= high
        if ok:
            return None
        side = f"> {low}" if above else f">= {low}"
        return f"must be a number {side}" + (f" and <= {high}" if high != float("inf") else "")

    return check


def _choice(*choices):
    return lambda value: None if value in choices else f"not in {choices}"


def _bool(value):
    return None if isinstance(value, bool) else "must be True or False"


def _text(value):
    return None if isinstance(value, str) else "must be a string"


def _name(value):
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _tuple(item, length: int | None = None, *, non_empty: bool = False, ordered: bool = False):
    """A tuple (or list) of ``length`` values (any number when None) each passing ``item``."""

    def check(value):
        if not isinstance(value, (tuple, list)):
            return "must be a tuple"
        if length is not None and len(value) != length:
            return f"must hold {length} values"
        if non_empty and not value:
            return "must hold at least one value"
        bad = [v for v in value if item(v)]
        if bad:
            return f"holds {bad[0]!r}, which {item(bad[0])}"
        if ordered and list(value) != sorted(value):
            return "must be in increasing order (low, high)"
        return None

    return check


def _mapping(value):
    return None if hasattr(value, "items") else "must be a mapping"


_KEEP_WHY = " (0 would delete every checkpoint as it is written)"
_FRACTION = _real(0.0, 1.0)
_POSITIVE = _real(above=True)
KEY_RULES: dict[str, tuple[Any, str]] = {
    "seed": (_int(0), FIXED),
    "compile_cache_dir": (_text, SAFE),
    "model.arch": (_choice(*ARCHS), FIXED),
    "model.variant": (_choice(*VARIANTS), FIXED),
    "model.num_classes": (_int(2), FIXED),
    "model.width": (_POSITIVE, FIXED),
    "model.num_iters": (_int(1), FIXED),
    "model.use_low_rank": (_bool, FIXED),
    "model.temperature": (_POSITIVE, FIXED),
    "model.scale_factor": (_real(0.0, 1.0, above=True), FIXED),
    "model.dtype": (_choice(*COMPUTE_DTYPES), SAFE),
    "model.remat": (_bool, SAFE),
    "model.bn_stat_groups": (_int(1), FIXED),
    "model.depth": (_choice(50, 101), FIXED),
    "model.output_stride": (_choice(8, 16), FIXED),
    "model.train_backbone_norm": (_bool, FIXED),
    "model.aspp_dropout": (_real(0.0, 1.0), FIXED),
    "model.decoder_dropout": (_tuple(_FRACTION, 2), FIXED),
    "loss.objective": (_choice(*OBJECTIVES), FIXED),
    "loss.loss_coeff": (_tuple(_real(), 4), FIXED),
    "loss.aux_weight": (_real(), FIXED),
    "loss.pamr_iters": (_int(1), FIXED),
    "loss.pamr_dilations": (_tuple(_int(1), non_empty=True), FIXED),
    "loss.cutoff_top": (_FRACTION, FIXED),
    "loss.cutoff_low": (_FRACTION, FIXED),
    "loss.bg_scale": (_POSITIVE, FIXED),
    "loss.pamr_bg_pow": (_POSITIVE, FIXED),
    "loss.pos_weight": (_POSITIVE, FIXED),
    "loss.class_weights": (_tuple(_real()), FIXED),
    "dataset.name": (_choice(*DATASETS), FIXED),
    "dataset.source": (_choice("", "folder", "tfds"), FIXED),
    "dataset.tfds_name": (_text, FIXED),
    "dataset.manual_dir": (_text, SAFE),  # where the same files live
    "dataset.data_dir": (_text, SAFE),
    "dataset.train_split": (_name, FIXED),
    "dataset.val_split": (_name, SAFE),
    "dataset.labeled_split": (_text, FIXED),
    "dataset.oversample_rate": (_int(1), FIXED),
    "dataset.num_labeled": (_int(0), FIXED),
    "dataset.labeled_only": (_bool, FIXED),
    "dataset.pseudo_label_dir": (_text, FIXED),
    "dataset.crop_size": (_int(MIN_CROP, " (the network's output stride is 8)"), FIXED),
    "dataset.scale_range": (_tuple(_POSITIVE, 2, ordered=True), FIXED),
    "dataset.ratio_range": (_tuple(_POSITIVE, 2, ordered=True), FIXED),
    "dataset.flip_prob": (_FRACTION, FIXED),
    "dataset.color_jitter": (_tuple(_real(), 4), FIXED),
    "dataset.image_labels_file": (_text, FIXED),
    "dataset.check_files": (_bool, SAFE),
    "dataset.num_parallel_calls": (_int(0), SAFE),
    "dataset.prefetch": (_int(0), SAFE),
    "dataset.num_train": (_int(0), FIXED),
    "dataset.num_val": (_int(0), SAFE),
    "dataset.image_size": (_int(0), FIXED),
    "dataset.synthetic_seed": (_int(0), FIXED),
    "dataset.synthetic_clutter_texture_prob": (_FRACTION, FIXED),
    "train.batch_size": (_int(1), FIXED),
    "train.num_epochs": (_int(1), FIXED),
    "train.pretrain_epochs": (_int(0), FIXED),
    "train.total_steps": (_int(0), FIXED),
    "train.lr": (_POSITIVE, FIXED),
    "train.weight_decay": (_real(), FIXED),
    "train.momentum": (_real(0.0, 1.0), FIXED),
    "train.nesterov": (_bool, FIXED),
    "train.lr_multipliers": (_tuple(_real(), 4), FIXED),
    "train.init_checkpoint": (_text, SAFE),  # a resumed run restores its own state
    "train.log_every_steps": (_int(1), SAFE),
    "train.image_every_steps": (_int(0), SAFE),
    "train.eval_every_epochs": (_int(0), SAFE),
    "train.eval_limit": (_int(0), SAFE),
    "train.max_nonfinite_steps": (_int(0), SAFE),
    "pretrain.steps": (_int(0), FIXED),
    "pretrain.lr": (_POSITIVE, FIXED),
    "pretrain.weight_decay": (_real(), FIXED),
    "pretrain.momentum": (_real(0.0, 1.0), FIXED),
    "checkpoint.every_steps": (_int(1), SAFE),
    "checkpoint.keep": (_int(1, _KEEP_WHY), SAFE),
    "checkpoint.async_save": (_bool, SAFE),
    "test.scales": (_tuple(_POSITIVE, non_empty=True), SAFE),
    "test.flip": (_bool, SAFE),
    "test.num_iters": (_int(1), SAFE),
    "test.fp_cut": (_FRACTION, SAFE),
    "test.top_k": (_int(1), SAFE),
    "test.bg_pow": (_POSITIVE, SAFE),
    "test.use_crf": (_bool, SAFE),
    "test.use_image_labels": (_bool, SAFE),
    "test.resize": (_choice(*RESIZE_METHODS), SAFE),
    "test.mode": (_choice("test", "test_two_view"), SAFE),
    "test.bucket_sizes": (_tuple(_int(1)), SAFE),
    "test.bucket_step": (_int(0), SAFE),
    "test.bucket_pad": (_choice(*BUCKET_PAD_MODES), SAFE),
    "test.resume": (_bool, SAFE),
    "test.save_overlays": (_bool, SAFE),
    "test.crf": (_mapping, SAFE),
    "test.class_pows": (_mapping, SAFE),
    "stage1.config": (_text, FIXED),
    "stage1.workdir": (_text, FIXED),
    "stage1.use_image_labels": (_bool, FIXED),
}


def _table_problems(flat: dict[str, Any]) -> list[str]:
    """Every key's own rule from :data:`KEY_RULES` (a key with no row is a bug: KeyError)."""
    problems = []
    for key, value in flat.items():
        why = KEY_RULES[key][0](value)
        if why:
            problems.append(f"{key}={value!r} {why}")
    return problems


def _x64_enabled() -> bool:
    import jax  # noqa: PLC0415 (this module stays importable without JAX's start-up cost)

    return bool(jax.config.jax_enable_x64)


def _value_problems(config: Any, mode: str) -> list[str]:
    problems = _table_problems(flatten_keys(config))
    if problems:  # the checks across keys below assume each key's own rule holds
        return problems
    model, train = config.model, config.train
    problems += _arch_problems(config)
    if model.dtype == "float64" and not _x64_enabled():
        problems.append("model.dtype='float64' needs 64-bit JAX: run with JAX_ENABLE_X64=1")
    groups = model.bn_stat_groups
    if groups > 1 and train.batch_size % groups:
        problems.append(
            f"train.batch_size={train.batch_size} must be a multiple of "
            f"model.bn_stat_groups={groups} (head BatchNorm statistics per group of "
            "consecutive examples; 1 = the whole batch)"
        )
    if model.variant == "coco" and model.num_classes != 81:
        problems.append("the coco variant needs model.num_classes=81")
    if mode == "train" and not train.pretrain_epochs < train.num_epochs:
        problems.append(
            f"need train.pretrain_epochs ({train.pretrain_epochs}) < "
            f"train.num_epochs ({train.num_epochs})"
        )
    if config.loss.cutoff_low > config.loss.cutoff_top:
        problems.append("loss.cutoff_low must be <= loss.cutoff_top")
    weights = config.loss.class_weights
    if weights and len(weights) != model.num_classes - 1:
        problems.append(
            f"loss.class_weights has {len(weights)} values for {model.num_classes - 1} "
            "foreground classes"
        )
    return problems


def _arch_problems(config: Any) -> list[str]:
    """The model architecture, the objective and what they need of each other."""
    model, problems = config.model, []
    if model.arch == "deeplab":
        if config.loss.objective != "supervised":
            problems.append("model.arch='deeplab' trains with loss.objective='supervised'")
    if config.dataset.labeled_only and config.loss.objective != "supervised":
        problems.append("dataset.labeled_only=True needs loss.objective='supervised'")
    return problems


def check_pretrain_settings(config: Any) -> None:
    """Raises PretrainError for ``config.pretrain`` settings that cannot work, before anything
    is built (``slr_jax.pretrain`` checks them again when it starts)."""
    cfg = config.pretrain
    if int(cfg.steps) < 0 or float(cfg.lr) <= 0 or float(cfg.weight_decay) < 0:
        raise PretrainError(
            "config.pretrain needs steps >= 0, lr > 0 and weight_decay >= 0; got "
            f"steps={cfg.steps}, lr={cfg.lr}, weight_decay={cfg.weight_decay}."
        )
    if not 0 < float(cfg.momentum) < 1:
        raise PretrainError(f"config.pretrain.momentum must be in (0, 1), got {cfg.momentum}.")


def validate_config(config: Any, mode: str = "train") -> None:
    """Rejects keys that ``configs/common.py`` does not define and impossible values, with
    messages naming the key. ``mode`` 'evaluate' / 'infer' skips what only training uses."""
    check_keys(config)
    problems = _value_problems(config, mode)
    if mode == "train":
        try:
            check_pretrain_settings(config)
        except PretrainError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems) + ".")


# The shipped config of each setting: the settings of a converted checkpoint.
SETTING_CONFIGS = {
    "wsss": "voc",
    "semi": "voc_semi",
    "semi_wo_cls": "voc_semi_wo_cls",
    "coco": "coco",
}


def _as_default_type(value: Any, default: Any) -> Any:
    """A JSON value back in the type of the config's default (JSON has no tuples)."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(_as_default_type(v, None) for v in value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with dotted-key ``overrides`` (``{'test.use_crf': True}``) applied; an unknown
    key is a ConfigError."""
    flat = flatten_keys(config)
    unknown = sorted(set(overrides) - set(flat))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; see configs/common.py.")
    config.update_from_flattened_dict(
        {key: _as_default_type(value, flat[key]) for key, value in overrides.items()}
    )
    return config


def config_from_json(text: str) -> Any:
    """A training workdir's ``config.json`` as a locked ConfigDict on configs/common.py's keys."""
    import json

    from configs import common  # lazy: as in check_keys

    saved = json.loads(text)
    saved.pop(CONFIG_HISTORY_KEY, None)
    config = common.get_config()
    flat = flatten_keys(saved)
    try:
        apply_overrides(config, {k: v for k, v in flat.items() if k not in _MAPPING_KEYS})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the saved config does not fit configs/common.py: {error}") from None
    for section in _MAPPING_KEYS:
        if section in saved.get("test", {}):
            config.test[section] = type(config.test[section])(saved["test"][section])
    return common.finalise(config)


def config_for_checkpoint(checkpoint: str) -> Any:
    """The settings a checkpoint was made with: a training workdir's ``config.json``, or for a
    variables checkpoint the shipped config of its setting (``variant``) with its ``width``."""
    import importlib

    from etils import epath

    # lazy: checkpoint imports JAX and orbax; this module stays importable without them
    from slr_jax import checkpoint as checkpoint_lib

    path = epath.Path(checkpoint)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ConfigError(
            f"--checkpoint {checkpoint} {what}; pass a training workdir or the output of "
            "`python -m slr_jax.convert`."
        )
    saved = path / checkpoint_lib.CONFIG_FILE
    if saved.exists():
        return config_from_json(saved.read_text())
    if not (path / checkpoint_lib.METADATA_FILE).exists():
        raise ConfigError(
            f"{checkpoint} holds neither a training config ({checkpoint_lib.CONFIG_FILE}) nor "
            f"checkpoint metadata; pass --config=configs/<setting>.py."
        )
    metadata = checkpoint_lib.load_metadata(path)
    variant = metadata.get("variant")
    if variant not in SETTING_CONFIGS:
        raise ConfigError(
            f"{checkpoint} names no known setting (variant={variant!r}); pass --config."
        )
    config = importlib.import_module(f"configs.{SETTING_CONFIGS[variant]}").get_config()
    with config.unlocked():
        config.model.width = float(metadata.get("width", config.model.width))
        config.model.num_classes = int(metadata.get("num_classes", config.model.num_classes))
    return config
