"""What a resumed run may change, and the record of every config a run was started with.

``WORKDIR/config.json`` holds the config the run last started with (its sections at the top
level, as ``slr_jax.config.config_for_checkpoint`` reads them) and under
:data:`~slr_jax.config.CONFIG_HISTORY_KEY` one entry per start: the step it started from, the
time, the command line, the keys it changed and, when any changed, the whole config.

On resume (the workdir holds a checkpoint) the new config is compared key by key with the
saved one. A changed key that ``slr_jax.config.KEY_RULES`` marks FIXED (network, data stream,
objective) stops the run with one line naming each change, unless the user names it in
``--allow_config_change``; SAFE keys (logging, evaluation, checkpoint cadence, paths, dtype)
may change and are logged.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from slr_jax.config import CONFIG_HISTORY_KEY, FIXED, KEY_RULES, flatten_keys
from slr_jax.errors import ConfigError, FlagError

CONFIG_FILE = "config.json"
# Folders of a training workdir whose numbered steps mean the run has started training.
CHECKPOINT_DIRS = ("checkpoints", "pretrain_checkpoints")


def _plain(config: Any) -> dict:
    """The config as JSON values (tuples as lists), as config.json stores it."""
    return json.loads(config.to_json_best_effort())


def _saved(workdir: str) -> dict | None:
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(
            f"{path} is not valid JSON ({error}); restore it from a copy, or move the workdir "
            "away to start over."
        ) from None
    return saved if isinstance(saved, dict) else None


def has_checkpoint(workdir: str) -> bool:
    """Whether the run in ``workdir`` has saved a training (or pretraining) step."""
    root = epath.Path(workdir)
    for name in CHECKPOINT_DIRS:
        folder = root / name
        if folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
            return True
    return False


def check_allowed_keys(allowed: Sequence[str]) -> None:
    unknown = sorted(set(allowed) - set(KEY_RULES))
    if unknown:
        raise FlagError(
            f"--allow_config_change names no config key: {', '.join(unknown)}; the keys are "
            "listed in configs/common.py."
        )


def config_changes(saved: dict, config: Any) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of the keys whose values differ (keys the saved config lacks,
    e.g. added by a newer slr_jax, count as unchanged)."""
    old = flatten_keys({k: v for k, v in saved.items() if k != CONFIG_HISTORY_KEY})
    new = flatten_keys(_plain(config))
    return {k: (old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]}


def check_resume(config: Any, workdir: str, allowed: Sequence[str] = ()) -> dict:
    """Raises ConfigError when a resumed run changes a FIXED key not in ``allowed``; returns
    the changes (``{key: (old, new)}``, {} for a new run) and logs them."""
    check_allowed_keys(allowed)
    saved = _saved(workdir)
    if saved is None or not has_checkpoint(workdir):
        return {}
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if KEY_RULES[k][1] == FIXED and k not in allowed}
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"--workdir {workdir} holds a run of another config: {listed} (these change the "
            f"network, data or objective). Resume with the run's config ({workdir}/"
            f"{CONFIG_FILE}), start a new --workdir, or pass "
            f"--allow_config_change={','.join(refused)} to change them on purpose."
        )
    for key, (old, new) in changes.items():
        logging.warning("resuming with %s changed: %r -> %r", key, old, new)
    return changes


def record_start(config: Any, workdir: str, step: int, changes: dict) -> None:
    """Writes ``config.json``: ``config`` on top, the history of starts below (process 0)."""
    saved = _saved(workdir) or {}
    history = list(saved.get(CONFIG_HISTORY_KEY, []))
    plain = _plain(config)
    entry = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
    if not history and saved and step > 0:  # a workdir written before the history existed
        history.append({"step": 0, "config": {k: v for k, v in saved.items()}})
    entry["changed"] = {k: [old, new] for k, (old, new) in changes.items()}
    if not history or changes:
        entry["config"] = plain
    history.append(entry)
    text = json.dumps({**plain, CONFIG_HISTORY_KEY: history}, indent=2)
    path = epath.Path(workdir) / CONFIG_FILE
    staging = path.parent / (CONFIG_FILE + ".tmp")
    staging.write_text(text)
    staging.replace(path)  # never a half-written config.json
