"""Config checks: every key known, every value usable, before anything heavy starts.

``configs/common.py`` is the one place where a setting has a default; every other config file
starts from it and the code reads keys without fallbacks, so a config that lacks a key or has
an unknown one is refused here with the key's name.
"""

from __future__ import annotations

from typing import Any

from slr_jax.constants import COMPUTE_DTYPES, VARIANTS
from slr_jax.errors import ConfigError

# Sections whose entries are free-form mappings rather than fixed keys.
_MAPPING_KEYS = ("crf", "class_pows")


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


# Counts and intervals that must be at least 1 (a checkpoint kept, a log line written, ...)
# or at least 0 (0 switches the feature off).
_AT_LEAST_ONE = (
    "checkpoint.keep", "checkpoint.every_steps", "train.batch_size", "train.num_epochs",
    "train.log_every_steps", "model.num_iters", "test.num_iters", "test.top_k",
    "loss.pamr_iters", "dataset.oversample_rate", "model.bn_stat_groups",
)  # fmt: skip
_AT_LEAST_ZERO = (
    "train.total_steps", "train.pretrain_epochs", "train.image_every_steps",
    "train.eval_every_epochs", "train.eval_limit", "train.max_nonfinite_steps",
    "pretrain.steps", "dataset.num_train", "dataset.num_val", "test.bucket_step",
    "dataset.num_labeled",
)  # fmt: skip
ARCHS = ("slrnet", "deeplab")
OBJECTIVES = ("slrnet", "supervised")


def _bound_problems(flat: dict[str, Any]) -> list[str]:
    problems = []
    for key, low in [(k, 1) for k in _AT_LEAST_ONE] + [(k, 0) for k in _AT_LEAST_ZERO]:
        value = flat[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            why = " (0 would delete every checkpoint as it is written)"
            meaning = why if key == "checkpoint.keep" else ""
            problems.append(f"{key}={value!r} must be an integer >= {low}{meaning}")
    for key in ("model.width", "train.lr", "model.temperature"):
        if not flat[key] > 0:
            problems.append(f"{key}={flat[key]!r} must be > 0")
    return problems


def _x64_enabled() -> bool:
    import jax  # noqa: PLC0415 (this module stays importable without JAX's start-up cost)

    return bool(jax.config.jax_enable_x64)


def _value_problems(config: Any, mode: str) -> list[str]:
    problems = _bound_problems(flatten_keys(config))
    model, train = config.model, config.train
    problems += _arch_problems(config)
    if model.variant not in VARIANTS:
        problems.append(f"model.variant={model.variant!r} not in {VARIANTS}")
    if model.dtype not in COMPUTE_DTYPES:
        problems.append(f"model.dtype={model.dtype!r} must be one of {COMPUTE_DTYPES}")
    elif model.dtype == "float64" and not _x64_enabled():
        problems.append("model.dtype='float64' needs 64-bit JAX: run with JAX_ENABLE_X64=1")
    groups = model.bn_stat_groups
    if isinstance(groups, int) and groups > 1 and train.batch_size % groups:
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
    if len(config.loss.loss_coeff) != 4:
        problems.append("loss.loss_coeff needs 4 values (cls, mask, code, seg)")
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
    if model.arch not in ARCHS:
        problems.append(f"model.arch={model.arch!r} not in {ARCHS}")
    if config.loss.objective not in OBJECTIVES:
        problems.append(f"loss.objective={config.loss.objective!r} not in {OBJECTIVES}")
    if model.arch == "deeplab":
        if config.loss.objective != "supervised":
            problems.append("model.arch='deeplab' trains with loss.objective='supervised'")
        if model.depth not in (50, 101):
            problems.append(f"model.depth={model.depth!r} must be 50 or 101")
        if model.output_stride not in (8, 16):
            problems.append(f"model.output_stride={model.output_stride!r} must be 8 or 16")
    if config.dataset.labeled_only and config.loss.objective != "supervised":
        problems.append("dataset.labeled_only=True needs loss.objective='supervised'")
    return problems


def validate_config(config: Any, mode: str = "train") -> None:
    """Rejects keys that ``configs/common.py`` does not define and impossible values, with
    messages naming the key. ``mode`` 'evaluate' / 'infer' skips what only training uses."""
    from slr_jax import pretrain

    check_keys(config)
    problems = _value_problems(config, mode)
    if mode == "train":
        try:
            pretrain.check_settings(config)
        except pretrain.PretrainError as error:
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

    from configs import common

    saved = json.loads(text)
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

    from slr_jax import checkpoint as checkpoint_lib

    path = epath.Path(checkpoint)
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
