"""Training: TrainState, the jit-compiled data-parallel train step, and the training loop.

The step is pure: ``train_step(state, batch) -> (state, metrics)``, compiled with ``jax.jit``
over the device mesh of ``slr_jax.sharding`` (batch sharded, state replicated, state donated).
The head BatchNorms therefore normalise with statistics of the *global* batch (synchronised
BatchNorm); the reference's DistributedDataParallel computes them per GPU (8 images each in
its VOC setting), so small differences in the running statistics are expected. Random numbers
are drawn with global-array semantics (threefry, partitionable), so a config gives the same
numbers on 1 or N devices.

The seg loss switches on inside the compiled step from the step counter (``step >=
pretrain_steps``), so nothing recompiles when it does. A non-finite loss leaves the state
unchanged and is counted; the loop stops with a clear error when more than
``train.max_nonfinite_steps`` happened.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh

from slr_jax import checkpoint as checkpoint_lib
from slr_jax import data as data_lib
from slr_jax import evaluation, optim, pretrain, resume, summaries
from slr_jax.errors import Preempted, TrainingError
from slr_jax.losses import make_objective
from slr_jax.models import build_model, init_variables
from slr_jax.sharding import (
    BATCH_KEYS,
    check_batch_size,
    data_sharded,
    make_mesh,
    replicated,
    shard_batch,
)
from slr_jax.xla_options import compiler_options, mesh_platform

Batch = Mapping[str, Any]


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

    def learning_rate_fn(self, base_lr: float) -> optax.Schedule:
        """The base (multiplier 1) lr: constant, then cosine from ``pretrain_steps``."""
        return optim.learning_rate_schedule(
            float(base_lr), self.pretrain_steps, self.total_steps, self.decay_steps
        )


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


# ----------------------------------------------------------------------------- state


def create_train_state(
    config: Any,
    model: flax.linen.Module,
    learning_rate_fn: optax.Schedule,
    rng: jax.Array,
    *,
    init_checkpoint: str,
) -> TrainState:
    """Initial state: random init (or the weights of ``init_checkpoint``, a variables checkpoint
    or '' for none), the reference optimiser on ``learning_rate_fn``, step 0."""
    init_rng, train_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng)
    if init_checkpoint:
        try:
            variables = checkpoint_lib.load_initial_weights(variables, init_checkpoint)
        except checkpoint_lib.CheckpointError as error:
            raise TrainingError(f"config.train.init_checkpoint: {error}") from None
    params = variables["params"]
    tx = optim.make_optimizer(config.train, learning_rate_fn, params)
    # One compiled init instead of hundreds of eager zeros_like dispatches.
    opt_state = jax.jit(tx.init)(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=variables["batch_stats"],
        rng=jax.random.key_data(train_rng),
    )


# ----------------------------------------------------------------------------- the step


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def dropout_key(state: TrainState) -> jax.Array:
    """The ``'dropout'`` key of the step ``state`` is about to take: the base key folded with
    the step. A forward with it reports that step's masks (``slr_jax.models.noise``)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    objective: Callable,
    pretrain_steps: int,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch (see ``docs/design.md`` for the batch layout).

    ``objective(outputs, batch, seg_weight=...) -> (total, terms, visuals)``
    (``losses.make_objective``). Returns the new state and scalar metrics: every loss term,
    ``lr``, ``seg_weight``, ``nonfinite`` (1 when the update was skipped) and ``grad_norm`` (of
    the trainable leaves).
    """
    step_key = dropout_key(state)
    seg_weight = (state.step >= pretrain_steps).astype(jnp.float32)

    def loss_fn(params):
        # Frozen leaves (stem, backbone BatchNorms: ``optim``) enter as constants: their weight
        # gradients are never computed nor held (they would be discarded by the optimiser).
        params = optim.without_frozen_gradients(params)
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = state.apply_fn(
            variables,
            batch["image"],
            mode="train",
            train=True,
            rngs={"dropout": step_key},
            mutable=["batch_stats"],
        )
        total, terms, _ = objective(outputs, batch, seg_weight=seg_weight)
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


def compile_train_step(
    config: Any, plan: StepPlan, learning_rate_fn: optax.Schedule, mesh: Mesh, state: TrainState
):
    """``jax.jit`` of :func:`train_step` with the state replicated (and donated) and the
    batch sharded over ``mesh``, with slr_jax's compiler options for its platform and dtype."""
    step_fn = functools.partial(
        train_step,
        objective=make_objective(config),
        pretrain_steps=plan.pretrain_steps,
        learning_rate_fn=learning_rate_fn,
    )
    state_sharding = jax.tree_util.tree_map(lambda _: replicated(mesh), state)
    batch_sharding = {key: data_sharded(mesh) for key in BATCH_KEYS}
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(mesh_platform(mesh), config.model.dtype),
    )


def release_freed_host_memory() -> None:
    """Returns the C heap's free pages to the operating system (glibc's ``malloc_trim``; a
    no-op where the C library has none).

    XLA's compiler frees about 1 GiB of heap after compiling the full-width train step on the
    CPU, but glibc keeps those pages in its per-thread arenas, so the step's buffers would come
    on top of them: the process's peak RSS at crop 161, batch 2 is 1.84 GiB above the state's
    with this call after compiling, 2.77 GiB without (docs/benchmarks.md)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def compile_ahead(step_fn: Callable, *args: Any) -> Callable:
    """``step_fn`` (a ``jax.jit`` function) compiled for ``args``' shapes and shardings now,
    with the compiler's freed memory returned (``release_freed_host_memory``) before anything
    runs."""
    compiled = step_fn.lower(*args).compile()
    release_freed_host_memory()
    return compiled


# ----------------------------------------------------------------------------- the loop


def _nonfinite_error(count: int, limit: int, step: int, metrics: dict) -> TrainingError:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    return TrainingError(
        f"non-finite loss or gradients in {count} step(s) up to step {step}; non-finite terms: "
        f"{', '.join(bad) or 'gradients only'} (those updates were skipped and the last good "
        f"state was checkpointed; limit config.train.max_nonfinite_steps={limit}). Metrics: "
        f"{terms}. Lower config.train.lr, check the input data, or use float32."
    )


def _initial_weights(config: Any, workdir: str, mesh: Mesh) -> str:
    """``train.init_checkpoint``, or the backbone pretrained on image labels when the config
    asks for one (``pretrain.steps > 0`` and no init checkpoint), or '' (random weights)."""
    init_checkpoint = str(config.train.init_checkpoint)
    if not init_checkpoint and int(config.pretrain.steps) > 0:
        init_checkpoint = pretrain.pretrain_backbone(config, workdir, mesh)
    return init_checkpoint


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    train_iterator_fn: Callable[[int], Iterator[Batch]] | None = None,
    allow_config_change: Sequence[str] = (),
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluates on the
    validation split at the end, and returns ``{'step', 'metrics', 'history', 'eval',
    'preempted'}`` (``history``: the metrics of every logging step).

    ``train_iterator_fn(start_position)`` yields this process's NumPy batches from the given
    position of the global stream (examples consumed, as the checkpoint records it); by default
    the tf.data pipeline of ``config.dataset``, whose stream depends on the seed alone.

    A resumed run must keep the keys that define the network and the data
    (``slr_jax.resume``) unless they are named in ``allow_config_change``.
    """
    workdir = os.fspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    changes = resume.check_resume(config, workdir, allow_config_change)
    mesh = make_mesh()
    check_batch_size(int(config.train.batch_size), mesh)
    # Every listed training and validation file is checked before any compute is spent.
    plan = plan_steps(config.train, data_lib.num_train_examples(config))
    data_lib.eval_examples(config, check_files=True)
    logging.info("plan: %s on %d devices", plan, mesh.devices.size)
    model = build_model(config.model)
    learning_rate_fn = plan.learning_rate_fn(config.train.lr)
    try:
        init_checkpoint = _initial_weights(config, workdir, mesh)
    except Preempted:
        return {"step": 0, "metrics": {}, "history": [], "eval": {}, "preempted": True}
    state = create_train_state(
        config, model, learning_rate_fn, jax.random.key(int(config.seed)),
        init_checkpoint=init_checkpoint,
    )  # fmt: skip
    checkpoints = checkpoint_lib.TrainCheckpoints(workdir, config.checkpoint)
    restored = checkpoints.restore_latest(state, mesh)
    step = 0
    position = 0
    if restored is not None:
        state, extra = restored
        step = int(jax.device_get(state.step))
        # Recorded, not step * batch_size: the batch size may have changed (allowed on purpose).
        position = int(extra.get("data_position", step * int(config.train.batch_size)))
        logging.info("resumed from step %d (example %d of the data stream)", step, position)
    state = jax.device_put(state, replicated(mesh))
    if jax.process_index() == 0:
        resume.record_start(config, workdir, step, changes)
        summaries.truncate_metrics(workdir, step)
    if train_iterator_fn is None:
        train_iterator_fn = lambda start: data_lib.train_dataset(config, start_position=start)
    batches = train_iterator_fn(position)
    loop = TrainLoop(config, workdir, plan, mesh, model, checkpoints, start=(step, position))
    try:
        return loop.run(
            state, batches, compile_train_step(config, plan, learning_rate_fn, mesh, state)
        )
    finally:
        checkpoints.close()
        if hasattr(batches, "close"):
            batches.close()


class TrainLoop:
    """The step loop of :func:`train_and_evaluate`: steps, logging, images, checkpoints,
    periodic evaluation and preemption."""

    def __init__(self, config, workdir, plan, mesh, model, checkpoints, start=(0, 0)):
        self.config, self.workdir, self.plan, self.mesh = config, workdir, plan, mesh
        self.start_step, self.start_position = start
        self.model, self.checkpoints = model, checkpoints
        self.log_every = max(int(config.train.log_every_steps), 1)
        self.eval_every = int(config.train.eval_every_epochs) * plan.steps_per_epoch
        self.image_every = int(config.train.image_every_steps)
        self.writer = summaries.summary_writer(workdir)
        self.nonfinite, self.pending, self.history = 0, [], []
        self.last_metrics: dict[str, float] = {}
        self.visuals_fn = None

    def extra(self, step: int) -> dict:
        """What a checkpoint records beside the state: the position in the global data stream
        (examples consumed: the position the run started from, plus this run's batches) and
        the epoch."""
        batches = step - self.start_step
        position = self.start_position + batches * int(self.config.train.batch_size)
        return {"data_position": position, "epoch": step / self.plan.steps_per_epoch}

    def run(self, state: TrainState, batches: Iterator[Batch], step_fn) -> dict[str, Any]:
        start_step = int(jax.device_get(state.step))
        step, eval_summary, compiled = start_step, {}, None
        self.tick, self.tick_step = time.perf_counter(), start_step
        with checkpoint_lib.Preemption() as preemption:
            while step < self.plan.total_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    raise TrainingError(
                        "the training input ended; it should repeat forever."
                    ) from None
                batch_on_devices = shard_batch(batch, self.mesh)
                if compiled is None:
                    compiled = compile_ahead(step_fn, state, batch_on_devices)
                state, metrics = compiled(state, batch_on_devices)
                self.pending.append(metrics)
                step += 1
                eval_summary = self.after_step(state, batch, step) or eval_summary
                if preemption.requested or self.checkpoints.reached_preemption(step):
                    self.checkpoints.save(state, self.extra(step), force=True)
                    self.checkpoints.wait()
                    logging.warning("stopped at step %d for preemption; rerun to resume.", step)
                    return self.result(step, {}, preempted=True)
        self.checkpoints.save(state, self.extra(step), force=True)
        if step > start_step or not eval_summary:
            eval_summary = self.evaluate(state, step)
        self.checkpoints.wait()
        return self.result(step, eval_summary, preempted=False)

    def result(self, step: int, eval_summary: dict, preempted: bool) -> dict[str, Any]:
        return {"step": step, "metrics": self.last_metrics, "history": self.history,
                "eval": eval_summary, "preempted": preempted}  # fmt: skip

    def after_step(self, state: TrainState, batch: Batch, step: int) -> dict | None:
        """Logging, images, checkpoints and periodic evaluation after ``step``; returns the
        evaluation's results when one ran."""
        if step % self.log_every == 0 or step == self.plan.total_steps:
            self.log(state, step)
        images = self.image_every > 0 and self.config.loss.objective == "slrnet"
        if self.writer is not None and images and step % self.image_every == 0:
            self.visuals_fn = self.visuals_fn or evaluation.make_visuals_fn(self.config, self.model)
            variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
            summaries.write_images(self.writer, self.visuals_fn, variables, batch, step)
        every = int(self.config.checkpoint.every_steps)
        if step % every == 0 or step % self.plan.steps_per_epoch == 0:
            self.checkpoints.save(state, self.extra(step))
        if self.eval_every and step % self.eval_every == 0 and step < self.plan.total_steps:
            return self.evaluate(state, step)
        return None

    def evaluate(self, state: TrainState, step: int) -> dict:
        return evaluation.evaluate_and_keep_best(
            self.config, state, self.checkpoints, self.workdir, step, self.writer
        )

    def log(self, state: TrainState, step: int) -> None:
        """Averages the pending metrics, logs them, and stops on too many non-finite steps."""
        stacked = jax.device_get(self.pending)
        self.pending = []
        metrics = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
        self.nonfinite += int(sum(m["nonfinite"] for m in stacked))
        elapsed = time.perf_counter() - self.tick
        metrics["steps_per_s"] = (step - self.tick_step) / max(elapsed, 1e-9)
        metrics["images_per_s"] = metrics["steps_per_s"] * int(self.config.train.batch_size)
        metrics["epoch"] = step / self.plan.steps_per_epoch
        self.tick, self.tick_step = time.perf_counter(), step
        self.last_metrics = metrics
        self.history.append({"step": step, **metrics})
        summaries.log_metrics(self.writer, self.workdir, step, self.plan.total_steps, metrics)
        limit = int(self.config.train.max_nonfinite_steps)
        if self.nonfinite > limit:
            # Non-finite updates were skipped: the state is the last good one.
            self.checkpoints.save(state, self.extra(step), force=True)
            self.checkpoints.wait()
            raise _nonfinite_error(self.nonfinite, limit, step, metrics)
