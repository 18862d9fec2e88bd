"""The benchmark's settings: an ml_collections config file with ``--config.KEY=VALUE``
overrides typed like the values they replace, and the error for settings it cannot run."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/voc.py"


class BenchError(ValueError):
    """The benchmark cannot run with these settings."""


def load_config(path: str, overrides: list[tuple[str, str]] = ()) -> Any:
    """``get_config()`` of an ml_collections config file, with ``key=value`` overrides.

    ``overrides``: ``[('model.width', '0.25'), ...]``; values are parsed to the type of the
    current value (tuples and lists as Python literals).
    """
    file = Path(path)
    if not file.is_file() and not file.is_absolute():
        file = REPO_ROOT / path
    if not file.is_file():
        raise BenchError(f"config file {path!r} not found; e.g. --config {DEFAULT_CONFIG}")
    spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, text in overrides:
        _override(config, key, text)
    return config


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise BenchError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return type(current)(float(text)) if isinstance(current, float) else int(text)
        except ValueError:
            raise BenchError(f"expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise BenchError(f"cannot parse {text!r} as a Python literal") from None
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def _override(config: Any, key: str, text: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    try:
        for name in parents:
            node = node[name]
        current = node[leaf]
    except (KeyError, AttributeError, TypeError):
        raise BenchError(
            f"unknown config key {key!r}; the keys are those of configs/common.py"
        ) from None
    try:
        node[leaf] = _parse_value(text, current)
    except (BenchError, TypeError) as e:
        raise BenchError(f"--config.{key}: {e}") from None


def split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """``['--config.a.b=1', '--config.c', '2']`` -> ``[('a.b', '1'), ('c', '2')]``."""
    out, i = [], 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--config."):
            raise BenchError(f"unrecognised argument {token!r}")
        key = token[len("--config.") :]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(extra):
            i += 1
            value = extra[i]
        else:
            raise BenchError(f"{token} needs a value")
        out.append((key, value))
        i += 1
    return out
