"""Training: TrainState, the jit-compiled data-parallel train step, and the training loop.

Parallelism is ``jax.jit`` over a 1-D ``Mesh`` of every device (axis ``data``): the global
batch is sharded along its first axis, parameters and optimiser state are replicated, and XLA
inserts the gradient all-reduce. The head BatchNorms therefore normalise with statistics of
the *global* batch (synchronised BatchNorm); the reference's DistributedDataParallel computes
them per GPU (8 images each in its VOC setting), so small differences in the running
statistics are expected. Random numbers are drawn with global-array semantics (threefry,
partitionable), so a config gives the same numbers on 1 or N devices.

The step is pure: ``train_step(state, batch) -> (state, metrics)``. The seg loss switches on
inside the compiled step from the step counter (``step >= pretrain_steps``), so nothing
recompiles when it does. A non-finite loss leaves the state unchanged and is counted; the
loop stops with a clear error when more than ``train.max_nonfinite_steps`` happened.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slr_jax import checkpoint as checkpoint_lib
from slr_jax import optim, pretrain
from slr_jax.losses import slrnet_objective
from slr_jax.models import build_model, init_variables

Batch = Mapping[str, Any]
BATCH_KEYS = ("image", "raw_image", "labels", "mask", "is_labeled")
# Checkpoint sources that hold only the backbone (the rest of the model starts at random).
BACKBONE_SOURCES = ("imagenet_backbone", pretrain.SOURCE)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad initial checkpoint, bad config)."""


class TrainState(train_state.TrainState):
    """params / opt_state / step / tx from flax, plus the head BatchNorm statistics and the
    base RNG key (raw uint32 key data so that Orbax can save it)."""

    batch_stats: Any = None
    rng: jax.Array = None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How long the run is and where the seg loss and cosine lr start (all in steps)."""

    steps_per_epoch: int
    total_steps: int
    pretrain_steps: int
    decay_steps: int


def plan_steps(cfg_train: Any, num_examples: int) -> StepPlan:
    """Epoch length from the data (drop_last, like the reference) or from ``total_steps``.

    ``total_steps > 0`` fixes the run length exactly; its epochs (for the schedule, checkpoints
    and evaluation) are ``total_steps // num_epochs`` steps long (at least 1).
    """
    batch_size = int(cfg_train.batch_size)
    num_epochs = int(cfg_train.num_epochs)
    total_steps = int(cfg_train.total_steps)
    if total_steps > 0:
        steps_per_epoch = max(total_steps // num_epochs, 1)
    else:
        steps_per_epoch = num_examples // batch_size
        if steps_per_epoch < 1:
            raise TrainingError(
                f"{num_examples} training examples do not fill one batch of {batch_size}; "
                "lower config.train.batch_size or set config.train.total_steps."
            )
    pretrain_steps, decay_steps = optim.reference_schedule_steps(
        num_epochs, int(cfg_train.pretrain_epochs), steps_per_epoch
    )
    if total_steps <= 0:
        total_steps = num_epochs * steps_per_epoch
    return StepPlan(steps_per_epoch, total_steps, pretrain_steps, decay_steps)


# ----------------------------------------------------------------------------- devices


def make_mesh() -> Mesh:
    """1-D mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch % devices or global_batch % jax.process_count():
        raise TrainingError(
            f"config.train.batch_size={global_batch} must be divisible by the {devices} devices "
            f"and {jax.process_count()} processes; use a multiple of {devices}."
        )


def shard_batch(
    batch: Batch, mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS
) -> dict[str, jax.Array]:
    """This process's share of the batch (NumPy) -> global arrays sharded on axis ``data``
    (the entries ``keys``)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
        for key in keys
    }


# ----------------------------------------------------------------------------- state


def load_initial_weights(variables: dict, path: str) -> dict:
    """Replaces leaves of ``variables`` by a converted checkpoint (``python -m slr_jax.convert``).

    A backbone file (metadata ``source`` ``imagenet_backbone`` from ``slr_jax.convert``, or
    ``image_label_backbone`` from ``slr_jax.pretrain``) supplies only the ``backbone``
    subtrees; a full checkpoint supplies everything. Shapes are checked.
    """
    loaded, metadata = checkpoint_lib.load_variables(path)
    backbone_only = metadata.get("source") in BACKBONE_SOURCES
    out = jax.tree_util.tree_map(lambda x: x, variables)
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            continue
        if collection not in loaded:
            raise TrainingError(f"{path} holds no '{collection}' collection.")
        if backbone_only:
            expected, given = variables[collection]["backbone"], loaded[collection]["backbone"]
            checkpoint_lib.check_tree_shapes(expected, given, f"backbone {collection} of {path}")
            out[collection] = {**variables[collection], "backbone": given}
        else:
            checkpoint_lib.check_tree_shapes(variables[collection], loaded[collection], path)
            out[collection] = loaded[collection]
    return jax.tree_util.tree_map(jnp.asarray, out)


def create_train_state(
    config: Any,
    model: flax.linen.Module,
    plan: StepPlan,
    rng: jax.Array,
    *,
    init_checkpoint: str | None = None,
) -> TrainState:
    """Initial state: random init (or the weights of ``init_checkpoint``, by default
    ``train.init_checkpoint``), optimiser, step 0."""
    init_rng, train_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng)
    if init_checkpoint is None:
        init_checkpoint = config.train.init_checkpoint
    if init_checkpoint:
        variables = load_initial_weights(variables, init_checkpoint)
    schedule = optim.learning_rate_schedule(
        float(config.train.lr), plan.pretrain_steps, plan.total_steps, plan.decay_steps
    )
    tx = optim.make_optimizer(
        config.train,
        variables["params"],
        learning_rate=schedule,
        train_backbone_norm=bool(config.model.train_backbone_norm),
    )
    params = variables["params"]
    # One compiled init instead of hundreds of eager zeros_like dispatches.
    opt_state = jax.jit(tx.init)(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=variables.get("batch_stats", {}),
        rng=jax.random.key_data(train_rng),
    )


# ----------------------------------------------------------------------------- the step


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_cfg: Any,
    variant: str,
    pretrain_steps: int,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch (see ``docs/design.md`` for the batch layout).

    Returns the new state and scalar metrics: every loss term, ``lr``, ``seg_weight``,
    ``nonfinite`` (1 when the update was skipped) and ``grad_norm``.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    seg_weight = (state.step >= pretrain_steps).astype(jnp.float32)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = state.apply_fn(
            variables,
            batch["image"],
            mode="train",
            train=True,
            rngs={"dropout": step_key},
            mutable=["batch_stats"],
        )
        total, terms, _ = slrnet_objective(
            outputs, batch, loss_cfg=loss_cfg, variant=variant, seg_weight=seg_weight
        )
        return total, (terms, updates["batch_stats"])

    (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jnp.isfinite(terms["total"]) & _all_finite(grads)
    updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # A non-finite loss or gradient must not reach the weights: keep the old state, count it.
    new_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(finite, new, old), updated, state.replace(step=state.step + 1)
    )
    metrics = dict(terms)
    metrics.update(
        lr=learning_rate_fn(state.step),
        seg_weight=seg_weight,
        nonfinite=1.0 - finite.astype(jnp.float32),
        grad_norm=optax.global_norm(grads),
    )
    return new_state, metrics


def compile_train_step(config: Any, plan: StepPlan, mesh: Mesh, state: TrainState):
    """``jax.jit`` of :func:`train_step` with the state replicated and the batch sharded."""
    schedule = optim.learning_rate_schedule(
        float(config.train.lr), plan.pretrain_steps, plan.total_steps, plan.decay_steps
    )
    step_fn = functools.partial(
        train_step,
        loss_cfg=config.loss,
        variant=config.model.variant,
        pretrain_steps=plan.pretrain_steps,
        learning_rate_fn=schedule,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, state)
    batch_sharding = {key: data for key in BATCH_KEYS}
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Orbax managers under ``workdir``: ``checkpoints/`` (every N steps and each epoch end,
    the last ``keep``) and ``best/`` (the best validation mIoU). Saves are asynchronous; a save
    also records the data position so that a resumed run continues the same stream."""

    def __init__(self, workdir: str, config: Any):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(config.checkpoint.keep),
            enable_async_checkpointing=bool(config.checkpoint.async_save),
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
    def _items(state: TrainState) -> dict:
        return {"params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state, "step": state.step, "rng": state.rng}  # fmt: skip

    def save(self, state: TrainState, extra: dict, force: bool = False) -> None:
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

    def save_best(self, state: TrainState, miou: float, extra: dict) -> None:
        step = int(jax.device_get(state.step))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        self.best.save(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), extra=ocp.args.JsonSave(extra)
            ),
            metrics={"miou": float(miou)},
        )

    def restore_latest(self, state: TrainState, mesh: Mesh) -> tuple[TrainState, dict] | None:
        """The latest checkpoint laid onto ``state``'s structure, replicated on ``mesh`` (any
        device count), or None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        replicated = NamedSharding(mesh, PartitionSpec())
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=replicated),
            self._items(state),
        )
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
            ),
        )
        items = restored["state"]
        state = state.replace(
            params=items["params"],
            batch_stats=items["batch_stats"],
            opt_state=items["opt_state"],
            step=items["step"],
            rng=items["rng"],
        )
        return state, dict(restored["extra"] or {})

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
    raise checkpoint_lib.CheckpointError(
        f"no training checkpoint under {root} (looked in best/ and checkpoints/); pass the "
        "workdir of a training run or a converted checkpoint folder."
    )


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM into a flag the loop polls (save, then stop), as TPU preemption needs."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _summary_writer(workdir: str):
    if jax.process_index() != 0:
        return None
    from flax.metrics import tensorboard

    return tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))


def _colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 with the VOC palette (255 = white)."""
    from slr_jax.infer import voc_palette

    palette = np.asarray(voc_palette(), np.uint8).reshape(-1, 3)
    return palette[np.clip(labels, 0, palette.shape[0] - 1)]


def evaluate_model(config: Any, variables: Any, out_dir: str, limit: int = 0) -> dict:
    """Multi-scale inference on the validation split (``config.test``); returns run_inference's
    summary. Every process scores its own shard; the confusion matrices are summed."""
    from slr_jax import evaluate
    from slr_jax.data import eval_dataset
    from slr_jax.infer import run_inference

    examples = eval_dataset(config, limit=limit or None)
    summary = run_inference(config, variables, examples, out_dir, save_probs=False)
    if jax.process_count() > 1 and summary.get("confusions"):
        from jax.experimental import multihost_utils

        scores = {}
        for kind, conf in summary["confusions"].items():
            total = multihost_utils.process_allgather(conf).sum(axis=0)
            scores[kind] = evaluate.segmentation_scores(total)
        summary["scores"] = scores
        counts = multihost_utils.process_allgather(np.asarray([summary["num_scored"]]))
        summary["num_scored"] = int(np.sum(counts))
    return summary


def _log_metrics(writer, workdir: str, step: int, total_steps: int, metrics: dict) -> None:
    """Console line with progress and ETA, TensorBoard scalars and ``metrics.jsonl``."""
    rate = metrics.get("steps_per_s", 0.0)
    eta = (total_steps - step) / rate if rate > 0 else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    logging.info(
        "step %d/%d (%.0f%%) loss %.4g | %.3g steps/s | ETA %s",
        step, total_steps, 100.0 * step / total_steps, metrics.get("total", float("nan")),
        rate, eta_text,
    )  # fmt: skip
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if jax.process_index() != 0:
        return
    with (epath.Path(workdir) / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "loss": metrics.get("total"), **metrics}) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            writer.scalar(f"train/{key}", value, step)
        writer.flush()


def _nonfinite_error(count: int, limit: int, step: int, metrics: dict) -> TrainingError:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    return TrainingError(
        f"non-finite loss or gradients in {count} step(s) up to step {step}; non-finite terms: "
        f"{', '.join(bad) or 'gradients only'} (those updates were skipped and the last good "
        f"state was checkpointed; limit config.train.max_nonfinite_steps={limit}). Metrics: "
        f"{terms}. Lower config.train.lr, check the input data, or use float32."
    )


def train_and_evaluate(
    config: Any, workdir: str, *, train_iterator_fn: Callable[[int], Iterator[Batch]] | None = None
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluates on the
    validation split at the end, and returns ``{'step', 'metrics', 'history', 'eval',
    'preempted'}`` (``history``: the metrics of every logging step).

    ``train_iterator_fn(start_position)`` yields this process's NumPy batches from the given
    stream position; by default the tf.data pipeline of ``config.dataset``.
    """
    from slr_jax import data as data_lib

    workdir = os.fspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    check_batch_size(int(config.train.batch_size), mesh)
    plan = plan_steps(config.train, data_lib.num_train_examples(config))
    logging.info("plan: %s on %d devices", plan, mesh.devices.size)

    model = build_model(config.model)
    init_checkpoint = str(config.train.init_checkpoint)
    if not init_checkpoint and int(config.pretrain.steps) > 0:
        init_checkpoint = pretrain.pretrain_backbone(config, workdir, mesh)
    state = create_train_state(
        config, model, plan, jax.random.key(int(config.seed)), init_checkpoint=init_checkpoint
    )
    checkpoints = Checkpoints(workdir, config)
    restored = checkpoints.restore_latest(state, mesh)
    extra: dict[str, Any] = {}
    if restored is not None:
        state, extra = restored
        logging.info("resumed from step %d", int(state.step))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

    per_process_batch = int(config.train.batch_size) // jax.process_count()
    start_step = int(jax.device_get(state.step))
    position = int(extra.get("data_position", start_step * per_process_batch))
    if train_iterator_fn is None:
        train_iterator_fn = lambda start: data_lib.train_dataset(config, start_position=start)
    batches = train_iterator_fn(position)
    step_fn = compile_train_step(config, plan, mesh, state)
    writer = _summary_writer(workdir)
    try:
        return _loop(
            config, workdir, plan, mesh, state, batches, step_fn, checkpoints, writer,
            position=position, per_process_batch=per_process_batch, model=model,
        )  # fmt: skip
    finally:
        checkpoints.close()
        if hasattr(batches, "close"):
            batches.close()


def _loop(config, workdir, plan, mesh, state, batches, step_fn, checkpoints, writer, *,
          position, per_process_batch, model) -> dict[str, Any]:  # fmt: skip
    """The step loop of :func:`train_and_evaluate` (see there)."""
    start_step = int(jax.device_get(state.step))
    log_every = max(int(config.train.log_every_steps), 1)
    eval_every = int(config.train.eval_every_epochs) * plan.steps_per_epoch
    nonfinite, pending, last_metrics, history = 0, [], {}, []
    eval_summary: dict[str, Any] = {}
    tick, tick_step = time.perf_counter(), start_step
    visuals_fn = None

    def extra_info(step):
        return {"data_position": position, "epoch": step / plan.steps_per_epoch}

    with _Preemption() as preemption:
        step = start_step
        while step < plan.total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise TrainingError("the training input ended; it should repeat forever.") from None
            position += per_process_batch
            state, metrics = step_fn(state, shard_batch(batch, mesh))
            pending.append(metrics)
            step += 1
            if step % log_every == 0 or step == plan.total_steps:
                stacked = jax.device_get(pending)
                pending = []
                last_metrics = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
                nonfinite += int(sum(m["nonfinite"] for m in stacked))
                elapsed = time.perf_counter() - tick
                last_metrics["steps_per_s"] = (step - tick_step) / max(elapsed, 1e-9)
                last_metrics["images_per_s"] = last_metrics["steps_per_s"] * int(
                    config.train.batch_size
                )
                last_metrics["epoch"] = step / plan.steps_per_epoch
                tick, tick_step = time.perf_counter(), step
                history.append({"step": step, **last_metrics})
                _log_metrics(writer, workdir, step, plan.total_steps, last_metrics)
                if nonfinite > int(config.train.max_nonfinite_steps):
                    # Non-finite updates were skipped: the state is the last good one.
                    checkpoints.save(state, extra_info(step), force=True)
                    checkpoints.wait()
                    raise _nonfinite_error(
                        nonfinite, int(config.train.max_nonfinite_steps), step, last_metrics
                    )
            image_every = int(config.train.image_every_steps)
            if writer is not None and image_every > 0 and step % image_every == 0:
                visuals_fn = visuals_fn or make_visuals_fn(config, model)
                _write_images(writer, visuals_fn, state, batch, step)
            if step % int(config.checkpoint.every_steps) == 0 or step % plan.steps_per_epoch == 0:
                checkpoints.save(state, extra_info(step))
            if eval_every and step % eval_every == 0 and step < plan.total_steps:
                eval_summary = _evaluate_and_keep_best(
                    config, state, checkpoints, workdir, step, writer
                )
            if preemption.requested or checkpoints.latest.reached_preemption(step):
                checkpoints.save(state, extra_info(step), force=True)
                checkpoints.wait()
                logging.warning("stopped at step %d for preemption; rerun to resume.", step)
                return {"step": step, "metrics": last_metrics, "history": history, "eval": {},
                        "preempted": True}  # fmt: skip
    checkpoints.save(state, extra_info(step), force=True)
    if step > start_step or not eval_summary:
        eval_summary = _evaluate_and_keep_best(config, state, checkpoints, workdir, step, writer)
    checkpoints.wait()
    return {"step": step, "metrics": last_metrics, "history": history, "eval": eval_summary,
            "preempted": False}  # fmt: skip


def pseudo_label_scores(config: Any, variables: Any, limit: int = 0) -> dict | None:
    """Scores of the training pseudo labels on the validation split (image labels from the
    ground truth, as in training): each image is resized (PIL bicubic) to the training crop
    size, the pseudo label computed as the loss computes it, resized back (nearest) and
    scored; pixels the pseudo label leaves unassigned count as background, the evaluation's
    convention for ignored predictions. One compiled program for every image size."""
    from PIL import Image

    from slr_jax import evaluate
    from slr_jax.data import eval_dataset
    from slr_jax.infer import _example_fields, normalise_image

    crop = config.dataset.crop_size
    size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    visuals_fn = make_visuals_fn(config, build_model(config.model))
    num_classes = int(config.model.num_classes)
    accumulator = evaluate.ConfusionAccumulator(num_classes)
    for example in eval_dataset(config, limit=limit or None):
        fields = _example_fields(example)
        if fields is None or fields["mask"] is None or fields["labels"] is None:
            continue
        gt = np.asarray(fields["mask"])
        if not (gt != 255).any():
            continue
        height, width = gt.shape
        resized = Image.fromarray(fields["image_uint8"]).resize(
            (size[1], size[0]), Image.Resampling.BICUBIC
        )
        image = np.asarray(resized)
        batch = {
            "image": normalise_image(image)[None],
            "raw_image": (image.astype(np.float32) / 255.0)[None],
            "labels": np.asarray(fields["labels"], np.float32)[None],
            "mask": np.full((1, *size), 255, np.int32),
            "is_labeled": np.zeros((1,), bool),
        }
        pseudo = np.asarray(jax.device_get(visuals_fn(variables, batch))["pseudo"][0])
        labels = np.where(pseudo.sum(-1) > 0, pseudo.argmax(-1), 0).astype(np.uint8)
        labels = np.asarray(
            Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST)
        )
        accumulator.update(labels, gt)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        accumulator.confusion = multihost_utils.process_allgather(accumulator.confusion).sum(0)
    if not accumulator.confusion.any():
        return None
    return accumulator.result()


def _class_names(num_classes: int) -> list[str]:
    from slr_jax import evaluate

    if num_classes == len(evaluate.VOC_CLASSES):
        return list(evaluate.VOC_CLASSES)
    return [f"class_{c}" for c in range(num_classes)]


def _evaluate_and_keep_best(config, state, checkpoints, workdir, step, writer) -> dict:
    """Val-split inference (config.test), pseudo-label scores, best checkpoint and
    ``WORKDIR/results.json`` ({'miou', 'pseudo_label_miou', 'per_class_iou', ...})."""
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    out_dir = os.path.join(workdir, "eval", f"step_{step}")
    limit = int(config.train.eval_limit)
    summary = evaluate_model(config, variables, out_dir, limit)
    scores = summary.get("scores", {}).get("pred")
    if scores is None:
        logging.warning("no validation image has ground truth; skipped scoring.")
        return {}
    pseudo = pseudo_label_scores(config, variables, limit)
    miou = float(scores["miou"])
    pseudo_miou = float(pseudo["miou"]) if pseudo is not None else float("nan")
    logging.info(
        "step %d: val mIoU %.4f (pseudo labels %.4f) over %d images",
        step, miou, pseudo_miou, summary["num_scored"],
    )  # fmt: skip
    if writer is not None:
        writer.scalar("val/miou", miou, step)
        writer.scalar("val/pseudo_label_miou", pseudo_miou, step)
        writer.scalar("val/pixel_accuracy", float(scores["pixel_accuracy"]), step)
        writer.flush()
    if math.isfinite(miou):
        checkpoints.save_best(state, miou, {"miou": miou, "step": step})
    names = _class_names(int(config.model.num_classes))
    per_class = lambda iou: {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, iou)}
    result = {
        "step": step,
        "split": config.dataset.val_split,
        "num_images": summary["num_scored"],
        "miou": miou,
        "pseudo_label_miou": pseudo_miou,
        "per_class_iou": per_class(scores["iou"]),
        "pseudo_label_per_class_iou": per_class(pseudo["iou"]) if pseudo is not None else {},
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "out_dir": out_dir,
    }
    if "crf" in summary.get("scores", {}):
        result["crf_miou"] = float(summary["scores"]["crf"]["miou"])
        result["crf_per_class_iou"] = per_class(summary["scores"]["crf"]["iou"])
    if jax.process_index() == 0:
        text = json.dumps(result, indent=2)
        (epath.Path(out_dir) / "results.json").write_text(text)
        (epath.Path(workdir) / "results.json").write_text(text)
    return result


def make_visuals_fn(config: Any, model: flax.linen.Module) -> Callable:
    """jit: (variables, batch of NumPy arrays) -> visuals (cam, refined, pseudo) in eval mode."""

    def visuals(variables, batch):
        outputs = model.apply(variables, batch["image"], mode="train", train=False)
        _, _, out = slrnet_objective(
            outputs, batch, loss_cfg=config.loss, variant=config.model.variant, seg_weight=1.0
        )
        return out

    return jax.jit(visuals)


def _write_images(writer, visuals_fn, state, batch, step) -> None:
    """The first training image, then overlays of its CAM, PAMR-refined mask and pseudo label
    (argmax; white = unassigned), side by side, as the reference's visualisation shows."""
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    one = {k: np.asarray(batch[k])[:1] for k in BATCH_KEYS}
    visuals = jax.device_get(visuals_fn(variables, one))
    raw = (one["raw_image"][0] * 255).clip(0, 255).astype(np.uint8)
    pseudo = visuals["pseudo"][0]
    pseudo_labels = np.where(pseudo.sum(-1) > 0, pseudo.argmax(-1), 255)
    cam = visuals["cam"][0].argmax(-1)
    refined = visuals["refined"][0].argmax(-1)
    overlay = lambda labels: (0.5 * raw + 0.5 * _colourise(labels)).astype(np.uint8)
    panel = np.concatenate([raw, overlay(cam), overlay(refined), overlay(pseudo_labels)], axis=1)
    writer.image("train/image_cam_refined_pseudo", panel, step)
    writer.flush()
