"""Checkpoints: Flax variables on disk (Orbax), plus the training CheckpointManager.

A *variables checkpoint* is a folder holding ``variables/`` (an Orbax PyTree checkpoint of
``{'params': ..., 'batch_stats': ...}``) and ``slr_jax_metadata.json`` (at least ``variant``,
``num_classes``, ``width`` and ``source``). ``slr_jax.convert`` writes them; training, inference
and evaluation read them. Paths may be local or ``gs://``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

METADATA_FILE = "slr_jax_metadata.json"
VARIABLES_DIR = "variables"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def _abs(path: str | os.PathLike) -> epath.Path:
    p = epath.Path(path)
    return p if str(p).startswith("gs://") else epath.Path(os.path.abspath(os.fspath(path)))


def save_variables(directory: str | os.PathLike, variables: Any, metadata: dict) -> epath.Path:
    """Writes ``variables`` (a pytree of arrays) and ``metadata`` (JSON-able) to ``directory``."""
    directory = _abs(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree = jax.tree_util.tree_map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / VARIABLES_DIR, tree, force=True)
        ckptr.wait_until_finished()
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return directory


def load_variables(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Reads a variables checkpoint written by :func:`save_variables` -> (variables, metadata)."""
    directory = _abs(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not (directory / VARIABLES_DIR).exists():
        raise CheckpointError(
            f"{directory} is not a slr_jax variables checkpoint (no '{VARIABLES_DIR}/' inside); "
            "convert PyTorch weights with `python -m slr_jax.convert`, or point at a training "
            "workdir's checkpoint"
        )
    meta_path = directory / METADATA_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / VARIABLES_DIR)
    return variables, metadata


def check_tree_shapes(expected: Any, actual: Any, what: str = "checkpoint") -> None:
    """Raises one CheckpointError listing every missing, unexpected or wrong-shaped leaf."""
    exp = {jax.tree_util.keystr(k): np.shape(v) for k, v in _flatten(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in _flatten(actual)}
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    wrong = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"{what} does not fit the model:"]
        lines += [f"  missing: {k} {exp[k]}" for k in missing]
        lines += [f"  unexpected: {k} {got[k]}" for k in unexpected]
        lines += [f"  wrong shape: {k} expected {exp[k]}, got {got[k]}" for k in wrong]
        raise CheckpointError("\n".join(lines))


def _flatten(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree)[0]
