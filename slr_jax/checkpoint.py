"""Checkpoints: every use of Orbax in slr_jax.

Two kinds of folder, local or ``gs://``:

- A *variables checkpoint*: ``variables/`` (an Orbax PyTree checkpoint of ``{'params': ...,
  'batch_stats': ...}``) and ``slr_jax_metadata.json`` (at least ``variant``, ``num_classes``,
  ``width`` and ``source``). ``slr_jax.convert`` and backbone pretraining write them; training
  starts from them, inference and evaluation read them.
- A *training workdir*: ``checkpoints/`` (the full train state every N steps and at each epoch
  end, the last ``checkpoint.keep``) and ``best/`` (the variables of the best validation mIoU),
  two Orbax ``CheckpointManager`` folders, plus ``config.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from slr_jax.errors import CheckpointError

METADATA_FILE = "slr_jax_metadata.json"
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"  # a training workdir's config
# Metadata ``source`` of checkpoints that hold only the backbone (the heads start at random).
IMAGENET_BACKBONE = "imagenet_backbone"
IMAGE_LABEL_BACKBONE = "image_label_backbone"
BACKBONE_SOURCES = (IMAGENET_BACKBONE, IMAGE_LABEL_BACKBONE)


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
    metadata = load_metadata(directory)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / VARIABLES_DIR)
    return variables, metadata


def load_metadata(directory: str | os.PathLike) -> dict:
    """The metadata of a variables checkpoint ({} when it has none)."""
    meta_path = _abs(directory) / METADATA_FILE
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


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


def load_initial_weights(variables: dict, path: str) -> dict:
    """Replaces leaves of ``variables`` by a variables checkpoint (``python -m slr_jax.convert``).

    A backbone file (metadata ``source`` in :data:`BACKBONE_SOURCES`) supplies only the
    ``backbone`` subtrees; a full checkpoint supplies everything. Shapes are checked.
    """
    loaded, metadata = load_variables(path)
    backbone_only = metadata.get("source") in BACKBONE_SOURCES
    out = jax.tree_util.tree_map(lambda x: x, variables)
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            continue
        if collection not in loaded:
            raise CheckpointError(f"{path} holds no '{collection}' collection.")
        if backbone_only:
            expected, given = variables[collection]["backbone"], loaded[collection]["backbone"]
            check_tree_shapes(expected, given, f"backbone {collection} of {path}")
            out[collection] = {**variables[collection], "backbone": given}
        else:
            check_tree_shapes(variables[collection], loaded[collection], path)
            out[collection] = loaded[collection]
    return jax.tree_util.tree_map(jnp.asarray, out)


# ----------------------------------------------------------------------------- training workdirs

TRAIN_STATE_ITEMS = ("params", "batch_stats", "opt_state", "step", "rng")


class TrainCheckpoints:
    """Orbax managers under a training workdir: ``checkpoints/`` (every N steps and each epoch
    end, the last ``keep``) and ``best/`` (the best validation mIoU). Saves are asynchronous;
    a save also records ``extra`` (JSON: the data position, so that a resumed run continues
    the same stream).

    ``state`` is any object with the attributes :data:`TRAIN_STATE_ITEMS` and a ``replace``
    method (``slr_jax.train.TrainState``).
    """

    def __init__(self, workdir: str, checkpoint_cfg: Any):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(checkpoint_cfg.keep),
            enable_async_checkpointing=bool(checkpoint_cfg.async_save),
            create=True,
        )
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda metrics: metrics["miou"],
            best_mode="max",
            enable_async_checkpointing=False,
            create=True,
        )
        root = epath.Path(workdir)
        self.latest = ocp.CheckpointManager(root / "checkpoints", options=options)
        self.best = ocp.CheckpointManager(root / "best", options=best_options)

    @staticmethod
    def _items(state: Any) -> dict:
        return {name: getattr(state, name) for name in TRAIN_STATE_ITEMS}

    def save(self, state: Any, extra: dict, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if step in self.latest.all_steps():
            return
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self._items(state)), extra=ocp.args.JsonSave(extra)
            ),
            force=force,
        )

    def save_best(self, state: Any, miou: float, extra: dict) -> None:
        step = int(jax.device_get(state.step))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        self.best.save(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), extra=ocp.args.JsonSave(extra)
            ),
            metrics={"miou": float(miou)},
        )

    def restore_latest(self, state: Any, mesh: Mesh) -> tuple[Any, dict] | None:
        """The latest checkpoint laid onto ``state``'s structure, replicated on ``mesh`` (any
        device count), or None when there is none."""
        from slr_jax.sharding import replicated

        step = self.latest.latest_step()
        if step is None:
            return None
        sharding = replicated(mesh)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
            self._items(state),
        )
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
            ),
        )
        return state.replace(**restored["state"]), dict(restored["extra"] or {})

    def reached_preemption(self, step: int) -> bool:
        return self.latest.reached_preemption(step)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def latest_variables(workdir: str, prefer_best: bool = True) -> tuple[dict, int]:
    """``{'params', 'batch_stats'}`` and the step of a training workdir's best (or latest)
    checkpoint, as NumPy arrays (no model needed)."""
    root = epath.Path(workdir)
    for sub, item in (("best", "variables"), ("checkpoints", "state"))[0 if prefer_best else 1 :]:
        folder = root / sub
        if not folder.exists():
            continue
        with ocp.CheckpointManager(folder) as manager:
            step = manager.latest_step()
            if step is None:
                continue
            restored = manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()})
            )
            tree = restored[item]
            return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, step
    raise CheckpointError(
        f"no training checkpoint under {root} (looked in best/ and checkpoints/); pass the "
        "workdir of a training run or a converted checkpoint folder."
    )


def is_variables_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_variables` (not a training workdir)."""
    return (_abs(path) / VARIABLES_DIR).exists()


def load_model_variables(model_cfg: Any, checkpoint: str) -> dict:
    """``{'params', 'batch_stats'}`` from a training workdir (its best, else latest, step) or a
    variables checkpoint, checked against the model ``model_cfg`` builds."""
    from slr_jax.models import build_model, variable_shapes

    path = _abs(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint {checkpoint} is not a folder; pass a training workdir or the output "
            "of `python -m slr_jax.convert`."
        )
    if is_variables_checkpoint(path):
        variables, metadata = load_variables(path)
        for key in ("variant", "num_classes"):
            if key in metadata and metadata[key] != model_cfg[key]:
                raise CheckpointError(
                    f"{checkpoint} was converted for {key}={metadata[key]!r} but the config has "
                    f"model.{key}={model_cfg[key]!r}; use the matching configs/*.py."
                )
    else:
        variables, step = latest_variables(checkpoint)
        logging.info("using the checkpoint of step %d in %s", step, checkpoint)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    check_tree_shapes(
        variable_shapes(build_model(model_cfg)), variables, f"checkpoint {checkpoint}"
    )
    return variables
