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

import contextlib
import json
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from slr_jax.cli import free_space, storage_cause
from slr_jax.errors import CheckpointError, StorageError
from slr_jax.models import build_model, variable_shapes
from slr_jax.models.shapes import check_tree_shapes
from slr_jax.sharding import replicated

METADATA_FILE = "slr_jax_metadata.json"
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"  # a training workdir's config
# Metadata ``source`` of checkpoints that hold only the backbone (the heads start at random).
IMAGENET_BACKBONE = "imagenet_backbone"
IMAGE_LABEL_BACKBONE = "image_label_backbone"
BACKBONE_SOURCES = (IMAGENET_BACKBONE, IMAGE_LABEL_BACKBONE)
IMAGENET_RESNET = "imagenet_resnet"  # + depth: a torchvision ResNet for DeepLab (convert.py)


def _abs(path: str | os.PathLike) -> epath.Path:
    p = epath.Path(path)
    return p if str(p).startswith("gs://") else epath.Path(os.path.abspath(os.fspath(path)))


def save_variables(directory: str | os.PathLike, variables: Any, metadata: dict) -> epath.Path:
    """Writes ``variables`` (a pytree of arrays) and ``metadata`` (JSON-able) to ``directory``."""
    directory = _abs(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; write the checkpoint to a folder.")
    tree = jax.tree_util.tree_map(np.asarray, variables)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory / VARIABLES_DIR, tree, force=True)
            ckptr.wait_until_finished()
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    except Exception as error:
        cause = storage_cause(error)
        if cause is None and not isinstance(error, OSError):
            raise
        reason = f"{cause.strerror}; {free_space(os.fspath(directory))}" if cause else None
        raise CheckpointError(
            f"cannot write the checkpoint to {directory} ({reason or _first_line(error)}); "
            "choose a folder you can write to."
        ) from None
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
    try:
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(directory / VARIABLES_DIR)
    # Orbax and TensorStore raise many error types for damaged files.
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"cannot read the variables in {directory} ({_first_line(error)}); the files are "
            "damaged: write them again (e.g. `python -m slr_jax.convert`)."
        ) from None
    return variables, metadata


def load_metadata(directory: str | os.PathLike) -> dict:
    """The metadata of a variables checkpoint ({} when it has none)."""
    meta_path = _abs(directory) / METADATA_FILE
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def load_initial_weights(variables: dict, path: str) -> dict:
    """Replaces leaves of ``variables`` by a variables checkpoint (``python -m slr_jax.convert``).

    A backbone file (metadata ``source`` in :data:`BACKBONE_SOURCES`, or ``imagenet_resnet*``
    for DeepLab) supplies only the ``backbone`` subtrees; a full checkpoint supplies everything.
    Shapes are checked.
    """
    loaded, metadata = load_variables(path)
    backbone_only = metadata.get("source") in BACKBONE_SOURCES
    if str(metadata.get("source", "")).startswith(IMAGENET_RESNET):
        # A converted torchvision ResNet: its variables are DeepLab's 'backbone' subtrees.
        loaded = {k: {"backbone": v} for k, v in loaded.items()}
        backbone_only = True
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


class Preemption:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a flag a training loop polls (save, then stop),
    as TPU preemption needs; a second Ctrl-C ends the process at once (killed by SIGINT: status
    130 in a shell; nothing more saved). The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            # The kernel's default action for the next one: it ends the process at once, even
            # inside a long XLA call, where a Python handler would only run after the call.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        logging.warning(
            "%s received: saving a checkpoint after this step and stopping; Ctrl-C again stops "
            "at once without saving (the checkpoints already written stay intact).", name,
        )  # fmt: skip
        self.requested = True

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(self._items(state)), extra=ocp.args.JsonSave(extra)
        )
        with self._storage_guard(self.latest, "state"):
            self.latest.save(step, args=args, force=force)

    def save_best(self, state: Any, miou: float, extra: dict) -> None:
        step = int(jax.device_get(state.step))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        args = ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), extra=ocp.args.JsonSave(extra)
        )
        with self._storage_guard(self.best, "variables"):
            self.best.save(step, args=args, metrics={"miou": float(miou)})

    @contextlib.contextmanager
    def _storage_guard(self, manager: ocp.CheckpointManager, item: str):
        """A full disk or a permission error (also one raised by an earlier asynchronous save)
        becomes one StorageError naming the folder, the free space and the newest checkpoint,
        which is read back first to confirm it is intact."""
        try:
            yield
        except Exception as error:
            cause = storage_cause(error)
            if cause is None:
                raise
            logging.warning("checkpoint save in %s failed", manager.directory, exc_info=True)
            _remove_partial_saves(manager.directory)
            raise StorageError(
                f"cannot write a checkpoint to {manager.directory} ({cause.strerror}; "
                f"{free_space(os.fspath(manager.directory))}); {_newest_intact(manager, item)}. "
                "Free space there (or fix its permissions), then rerun the same command to resume."
            ) from None

    def restore_latest(self, state: Any, mesh: Mesh) -> tuple[Any, dict] | None:
        """The newest intact checkpoint laid onto ``state``'s structure, replicated on ``mesh``
        (any device count), or None when there is none.

        A step that cannot be restored (truncated or missing files) is moved aside to
        ``WORKDIR/damaged_checkpoints/<step>`` with a warning naming it and the error, and the
        next older step is tried; a CheckpointError lists them when none restores.
        """
        sharding = replicated(mesh)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
            self._items(state),
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
        )
        self._check_stored_shapes(target)
        found = restore_newest_intact(self.latest, args)
        if found is None:
            return None
        restored, _, damaged = found
        for step in damaged:
            self._set_aside(step)
        return state.replace(**restored["state"]), dict(restored["extra"] or {})

    def _check_stored_shapes(self, target: dict) -> None:
        """Raises one CheckpointError when the newest step's stored variables have other shapes
        than ``target``'s: the network changed (a config change), the files are not damaged.
        A step whose metadata cannot be read is left to the damaged-step fallback."""
        steps = self.latest.all_steps()
        if not steps:
            return
        try:
            with ocp.StandardCheckpointer() as reader:
                stored = reader.metadata(self.latest.directory / str(max(steps)) / "state")
            stored = stored.item_metadata
            stored = {k: stored[k] for k in ("params", "batch_stats")}
        except Exception:  # noqa: BLE001 - unreadable: the fallback tries older steps
            return
        try:
            check_tree_shapes({k: target[k] for k in stored}, stored, "stored")
        except CheckpointError as error:
            head, first = (str(error).splitlines() + [""])[:2]
            counts = head[head.find("(") + 1 : head.rfind(")")]
            raise CheckpointError(
                f"the checkpoints in {self.latest.directory} are intact but were written by "
                f"another network ({counts}; e.g. {first.strip()}). The config changed since "
                f"they were written (compare with {self.latest.directory.parent}/{CONFIG_FILE}):"
                " resume with the run's config, or start a new --workdir."
            ) from None

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of ``checkpoints/`` (kept for inspection, never deleted),
        so that the run can save that step number again."""
        if jax.process_index() == 0:
            folder = self.latest.directory / str(step)
            aside = self.latest.directory.parent / "damaged_checkpoints" / str(step)
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{step}.{os.getpid()}")
            folder.rename(aside)
            logging.warning("moved the damaged checkpoint of step %d to %s", step, aside)
        self.latest.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.latest.reached_preemption(step)

    def wait(self) -> None:
        with self._storage_guard(self.latest, "state"):
            self.latest.wait_until_finished()
        with self._storage_guard(self.best, "variables"):
            self.best.wait_until_finished()

    def close(self) -> None:
        """Closes both managers; a failed save that :meth:`wait` already reported is only
        logged here, so that it does not hide the error being raised."""
        for manager in (self.latest, self.best):
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - reported by wait/save; see the log
                logging.warning("closing %s", manager.directory, exc_info=True)


def _remove_partial_saves(directory: epath.Path) -> None:
    """Deletes the temporary folders of saves that failed (never a committed step), so that the
    space they hold comes back."""
    if jax.process_index() != 0:
        return
    for path in directory.iterdir():
        if ".orbax-checkpoint-tmp" in path.name:
            path.rmtree(missing_ok=True)


def _newest_intact(manager: ocp.CheckpointManager, item: str) -> str:
    """'the checkpoint of step N in DIR is intact' after reading back the metadata of its
    arrays, for the newest step of ``manager`` that reads back."""
    manager.reload()
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            with ocp.StandardCheckpointer() as reader:
                reader.metadata(manager.directory / str(step) / item)
        except Exception:  # noqa: BLE001 - any failure: not intact, try an older step
            continue
        return f"the checkpoint of step {step} in {manager.directory} is intact"
    return f"{manager.directory} holds no intact checkpoint yet"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def restore_newest_intact(
    manager: ocp.CheckpointManager, args
) -> tuple[Any, int, list[int]] | None:
    """(restored items, their step, damaged newer steps) of the newest step of ``manager`` that
    restores with ``args``; None when the manager holds no step. Each damaged step is logged."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    damaged, reasons = [], []
    for step in steps:
        try:
            restored = manager.restore(step, args=args)
        # Orbax and TensorStore raise many error types for damaged files; any of them means
        # this step is unusable, and an older one may still be intact.
        except Exception as error:  # noqa: BLE001
            damaged.append(step)
            reasons.append(f"step {step}: {_first_line(error)}")
            logging.warning(
                "checkpoint step %d in %s cannot be restored (%s); trying an older step.",
                step, manager.directory, _first_line(error),
            )  # fmt: skip
            continue
        if damaged:
            logging.warning(
                "using step %d of %s; skipped damaged step(s) %s", step, manager.directory, damaged
            )
        return restored, step, damaged
    raise CheckpointError(
        f"no checkpoint in {manager.directory} can be restored ({'; '.join(reasons)}); the "
        "files are damaged: restore them from a copy, or move the folder away to start over."
    )


def latest_variables(workdir: str, prefer_best: bool = True) -> tuple[dict, int]:
    """``{'params', 'batch_stats'}`` and the step of a training workdir's best (or latest)
    checkpoint, as NumPy arrays (no model needed). A damaged step is skipped with a warning:
    the newest intact one of ``best/``, else of ``checkpoints/``, is used."""
    root = epath.Path(workdir)
    problems = []
    for sub, item in (("best", "variables"), ("checkpoints", "state"))[0 if prefer_best else 1 :]:
        folder = root / sub
        if not folder.exists():
            continue
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore()})
        with ocp.CheckpointManager(folder) as manager:
            try:
                found = restore_newest_intact(manager, args)
            except CheckpointError as error:
                problems.append(str(error))
                continue
            if found is None:
                continue
            restored, step, _ = found
            tree = restored[item]
            return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, step
    if problems:
        raise CheckpointError(" ".join(problems))
    raise CheckpointError(
        f"no training checkpoint under {root} (looked in best/ and checkpoints/); pass the "
        "workdir of a training run or a converted checkpoint folder."
    )


def is_variables_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_variables` (not a training workdir)."""
    return (_abs(path) / VARIABLES_DIR).exists()


# Model settings that decide the variables' shapes, compared before the shapes themselves.
SHAPE_SETTINGS = ("arch", "variant", "num_classes", "width", "use_low_rank", "depth")


def saved_model_settings(checkpoint: str | os.PathLike) -> dict:
    """The model settings a checkpoint records: a training workdir's ``config.json`` model
    section, or a variables checkpoint's metadata ({} when it records none)."""
    path = _abs(checkpoint)
    if (path / CONFIG_FILE).exists():
        try:
            return dict(json.loads((path / CONFIG_FILE).read_text()).get("model", {}))
        except (ValueError, AttributeError):
            return {}
    return load_metadata(path) if (path / METADATA_FILE).exists() else {}


def check_model_settings(model_cfg: Any, checkpoint: str) -> None:
    """Raises one CheckpointError naming every shape-deciding setting (``SHAPE_SETTINGS``) in
    which the checkpoint and the config differ."""
    saved = saved_model_settings(checkpoint)
    differ = [
        key for key in SHAPE_SETTINGS if key in saved and saved[key] != model_cfg[key]
    ]  # fmt: skip
    if differ:
        mine = ", ".join(f"{key} {saved[key]!r}" for key in differ)
        theirs = ", ".join(f"{key} {model_cfg[key]!r}" for key in differ)
        raise CheckpointError(
            f"checkpoint {checkpoint} has model {mine}; the config has model {theirs}. Drop "
            "--config to use the checkpoint's own settings, or pass the config it was made with."
        )


def load_model_variables(model_cfg: Any, checkpoint: str) -> dict:
    """``{'params', 'batch_stats'}`` from a training workdir (its best, else latest, intact
    step) or a variables checkpoint, checked against the model ``model_cfg`` builds: first the
    settings the checkpoint records, then every leaf's shape."""
    path = _abs(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint {checkpoint} is not a folder; pass a training workdir or the output "
            "of `python -m slr_jax.convert`."
        )
    check_model_settings(model_cfg, checkpoint)
    if is_variables_checkpoint(path):
        variables, _ = load_variables(path)
    else:
        variables, step = latest_variables(checkpoint)
        logging.info("using the checkpoint of step %d in %s", step, checkpoint)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    check_tree_shapes(
        variable_shapes(build_model(model_cfg)), variables, f"checkpoint {checkpoint}"
    )
    return variables
