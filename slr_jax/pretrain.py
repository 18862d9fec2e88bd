"""Backbone pretraining on a dataset's image labels (a stand-in for the ImageNet start).

SLRNet starts from an ImageNet WideResNet38 and keeps its stem and BatchNorms frozen. A dataset
with no such backbone (the synthetic demo) gets one here: the backbone, global average pooling
of its ``conv6`` features and a linear layer are trained from scratch with the multi-label
soft-margin loss on the training split's image labels (the supervision WSSS has anyway), with
batch-statistics BatchNorm and zero-initialised residual branches (a from-scratch WideResNet38
does not learn otherwise, docs/results.md). The backbone's ``params`` and ``batch_stats`` are
written as a variables checkpoint (``source`` = ``image_label_backbone``) that
``checkpoint.load_initial_weights`` reads like a converted ImageNet backbone, so the SLRNet stage
then runs the reference recipe unchanged.

``train_and_evaluate`` runs this first when ``config.pretrain.steps > 0`` and
``config.train.init_checkpoint`` is empty; the checkpoint goes to ``WORKDIR/pretrained_backbone``
and is reused when the run restarts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from slr_jax import checkpoint as checkpoint_lib
from slr_jax import data as data_lib
from slr_jax.config import check_pretrain_settings
from slr_jax.errors import Preempted, PretrainError
from slr_jax.losses import multilabel_soft_margin
from slr_jax.models.backbone import WideResNet38
from slr_jax.models.resnet import RESNET_LAYERS, ResNet, dilation_for_output_stride
from slr_jax.sharding import data_sharded, replicated, shard_batch
from slr_jax.xla_options import compiler_options, mesh_platform

CHECKPOINT_DIR = "pretrained_backbone"
PROGRESS_DIR = "pretrain_checkpoints"
METRICS_FILE = "pretrain_metrics.jsonl"


class BackboneClassifier(nn.Module):
    """Backbone -> mean of its last features over space -> linear: (B, H, W, 3) ->
    (B, num_labels). The backbone is WideResNet38 (``conv6``), or with ``resnet_layers`` the
    DeepLab ResNet (``layer4``, dilated to ``output_stride``).

    The backbone is the submodule ``backbone``, named as in ``SLRNet`` and ``DeepLabV3Plus``,
    so its variables drop into the segmentation model unchanged.
    """

    num_labels: int
    width: float = 1.0
    dtype: Any = jnp.float32
    resnet_layers: tuple[int, ...] = ()  # () = WideResNet38
    output_stride: int = 8

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.resnet_layers:
            features = ResNet(
                self.resnet_layers,
                dilation_for_output_stride(self.output_stride),
                self.width,
                self.dtype,
                batch_norm_stats=True,
                zero_init_residual=True,
                name="backbone",
            )(images, train)["layer4"]
        else:
            features = WideResNet38(
                self.width,
                self.dtype,
                batch_norm_stats=True,
                zero_init_residual=True,
                name="backbone",
            )(images, train)["conv6"]
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_labels, name="classifier")(pooled)


def _weights_only(params: Any) -> Any:
    """Mask for weight decay: convolution and dense kernels, not biases or BatchNorm affines."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path[-1:]) == "['kernel']", params
    )


def make_optimizer(pretrain_cfg: Any) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, cosine decay of ``lr`` over ``steps``, decay on kernels."""
    schedule = optax.cosine_decay_schedule(float(pretrain_cfg.lr), int(pretrain_cfg.steps))
    return optax.chain(
        optax.add_decayed_weights(float(pretrain_cfg.weight_decay), mask=_weights_only),
        optax.sgd(schedule, momentum=float(pretrain_cfg.momentum), nesterov=True),
    )


def _labelled_data(config: Any) -> Any:
    """The config whose training images pretraining reads: ``config``, except that the
    semi_wo_cls setting has image labels only where it has pixel labels, so its backbone
    learns from its pixel-labelled images alone (their labels come from their masks)."""
    if config.model.variant != "semi_wo_cls":
        return config
    config = config.copy_and_resolve_references()
    config.dataset.labeled_only = True
    return config


def make_step(model: BackboneClassifier, tx: optax.GradientTransformation) -> Callable:
    """Pure step: (params, batch_stats, opt_state, images, labels, key) -> (..., loss)."""

    def step(params, batch_stats, opt_state, images, labels, key):
        def loss_fn(p):
            scores, updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            loss = jnp.mean(multilabel_soft_margin(scores, labels.astype(jnp.float32)))
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def _metadata(config: Any) -> dict:
    cfg = config.pretrain
    return {
        "source": checkpoint_lib.IMAGE_LABEL_BACKBONE,
        "arch": str(config.model.arch),
        "variant": str(config.model.variant),
        "num_classes": int(config.model.num_classes),
        "width": float(config.model.width),
        "pretrain": {
            "steps": int(cfg.steps),
            "lr": float(cfg.lr),
            "weight_decay": float(cfg.weight_decay),
            "momentum": float(cfg.momentum),
            "batch_size": int(config.train.batch_size),
            "seed": int(config.seed),
            "dataset": str(config.dataset.name),
            "num_labeled": int(config.dataset.num_labeled),
            "depth": int(config.model.depth),
            "output_stride": int(config.model.output_stride),
        },
    }


def build_classifier(config: Any) -> BackboneClassifier:
    """The backbone + classifier that pretraining trains, from ``config.model``."""
    deeplab = config.model.arch == "deeplab"
    return BackboneClassifier(
        int(config.model.num_classes) - 1,
        float(config.model.width),
        jnp.dtype(config.model.dtype),
        resnet_layers=tuple(RESNET_LAYERS[int(config.model.depth)]) if deeplab else (),
        output_stride=int(config.model.output_stride),
    )


def init_state(config: Any, model: BackboneClassifier, key: jax.Array) -> tuple:
    """(params, batch_stats, opt_state) of a fresh pretraining run; ``jax.eval_shape`` of it
    gives the shapes without computing anything (``slr_jax.preflight``)."""
    crop = int(config.dataset.crop_size)
    variables = model.init(key, jnp.zeros((1, crop, crop, 3)), train=False)
    tx = make_optimizer(config.pretrain)
    return variables["params"], variables["batch_stats"], tx.init(variables["params"])


def sharded_step(config: Any, model: BackboneClassifier, mesh: Mesh) -> Callable:
    """The jitted step: state replicated and donated, images and labels sharded over ``mesh``."""
    state_sharding, data = replicated(mesh), data_sharded(mesh)
    return jax.jit(
        make_step(model, make_optimizer(config.pretrain)),
        in_shardings=(*(state_sharding,) * 3, data, data, state_sharding),
        out_shardings=state_sharding,
        donate_argnums=(0, 1, 2),
        compiler_options=compiler_options(mesh_platform(mesh), config.model.dtype),
    )


def _build(config: Any, mesh: Mesh):
    """(jitted sharded step, initial (params, batch_stats, opt_state), step key)."""
    model = build_classifier(config)
    init_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(int(config.seed)), 1))
    state = jax.jit(lambda k: init_state(config, model, k))(init_key)
    step_fn = sharded_step(config, model, mesh)
    return step_fn, jax.device_put(state, replicated(mesh)), step_key


class _ProgressCheckpoints:
    """The pretraining state (params, batch_stats, opt_state) every ``checkpoint.every_steps``
    steps and on SIGTERM, under ``WORKDIR/pretrain_checkpoints``, so a stopped pretraining
    resumes where it stopped; removed once the finished backbone is written."""

    def __init__(self, workdir: str, config: Any, metadata: dict):
        self.folder = epath.Path(workdir) / PROGRESS_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=int(config.checkpoint.keep), create=True)
        self.manager = ocp.CheckpointManager(self.folder, options=options)
        self.metadata = metadata

    def restore(self, state: tuple, mesh: Mesh) -> tuple[tuple, int]:
        """(state, step) of the newest intact checkpoint made with the same settings, else
        (``state``, 0)."""
        sharding = replicated(mesh)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), list(state)
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
        )
        found = checkpoint_lib.restore_newest_intact(self.manager, args)
        if found is None:
            return state, 0
        restored, step, _ = found
        if restored["extra"] != self.metadata:
            logging.warning(
                "backbone pretraining: %s has other settings; starting over.", self.folder
            )
            return state, 0
        logging.info("backbone pretraining: resuming at step %d", step)
        return tuple(restored["state"]), step

    def save(self, state: tuple, step: int) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(list(state)), extra=ocp.args.JsonSave(self.metadata)
        )
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def remove(self) -> None:
        self.manager.close()
        if jax.process_index() == 0:
            self.folder.rmtree(missing_ok=True)


def pretrain_backbone(
    config: Any,
    workdir: str,
    mesh: Mesh,
    *,
    batches: Iterator[dict[str, np.ndarray]] | None = None,
) -> str:
    """Trains the backbone classifier for ``config.pretrain.steps`` steps; returns the path of
    the backbone checkpoint under ``workdir``. A checkpoint already written there with the same
    settings is returned as it is (a restarted run does not pretrain again); a pretraining
    stopped part way (SIGTERM: :class:`slr_jax.errors.Preempted` after saving; or killed)
    resumes from its last saved step.

    ``batches`` yields this process's NumPy batches (``image`` (B, H, W, 3), ``labels``
    (B, C-1)); by default the training pipeline of ``config.dataset``. The batch is sharded over
    the ``data`` axis of ``mesh`` and the variables replicated, as in the SLRNet step.
    """
    check_pretrain_settings(config)
    out_dir = epath.Path(workdir) / CHECKPOINT_DIR
    metadata = _metadata(config)
    meta_file = out_dir / checkpoint_lib.METADATA_FILE
    if meta_file.exists() and json.loads(meta_file.read_text()) == metadata:
        logging.info("backbone pretraining: reusing %s", out_dir)
        return os.fspath(out_dir)
    step_fn, state, step_key = _build(config, mesh)
    progress = _ProgressCheckpoints(workdir, config, metadata)
    state, start = progress.restore(state, mesh)
    own_batches = batches is None
    if own_batches:
        position = start * int(config.train.batch_size)
        batches = data_lib.train_dataset(_labelled_data(config), start_position=position)
    try:
        params, batch_stats, _ = _train_loop(
            config, workdir, step_fn, state, batches, mesh, step_key, start, progress
        )
    finally:
        if own_batches and hasattr(batches, "close"):
            batches.close()
    variables = {"params": {"backbone": params["backbone"]},
                 "batch_stats": {"backbone": batch_stats["backbone"]}}  # fmt: skip
    # The metadata file is written last: a half-written checkpoint is never reused.
    if meta_file.exists():
        meta_file.unlink()
    checkpoint_lib.save_variables(out_dir, jax.device_get(variables), metadata)
    progress.remove()
    logging.info("backbone pretraining: wrote %s", out_dir)
    return os.fspath(out_dir)


def _log_line(config: Any, workdir: str, line: dict, truncate: bool) -> None:
    """Appends one logged step to ``WORKDIR/pretrain_metrics.jsonl`` (process 0)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if truncate else "a") as handle:
        handle.write(json.dumps(line) + "\n")
    total = int(config.pretrain.steps)
    logging.info(
        "backbone pretraining step %d/%d: loss %.4f | %.2f steps/s",
        line["step"], total, line["loss"], line["steps_per_s"],
    )  # fmt: skip


def _train_loop(config, workdir, step_fn, state, batches, mesh, step_key, start, progress):
    """Runs pretraining steps ``start + 1 .. pretrain.steps`` -> the final state. Saves it
    every ``checkpoint.every_steps`` steps; on SIGTERM saves it and raises Preempted."""
    cfg = config.pretrain
    total, log_every = int(cfg.steps), max(int(config.train.log_every_steps), 1)
    save_every = int(config.checkpoint.every_steps)
    pending, tick, first_line = [], time.perf_counter(), start == 0
    with checkpoint_lib.Preemption() as preemption:
        for step in range(start + 1, total + 1):
            batch = shard_batch(next(batches), mesh, keys=("image", "labels"))
            key = jax.random.fold_in(step_key, step)
            *state, loss = step_fn(*state, batch["image"], batch["labels"], key)
            pending.append(loss)
            if step % log_every == 0 or step == total:
                losses = np.asarray(jax.device_get(pending), np.float64)
                pending = []
                if not np.all(np.isfinite(losses)):
                    raise PretrainError(
                        f"backbone pretraining: non-finite loss by step {step}; lower "
                        f"config.pretrain.lr (now {cfg.lr})."
                    )
                rate = len(losses) / max(time.perf_counter() - tick, 1e-9)
                tick = time.perf_counter()
                line = {"step": step, "loss": float(losses.mean()), "steps_per_s": rate}
                _log_line(config, workdir, line, truncate=first_line)
                first_line = False
            if preemption.requested:
                progress.save(state, step)
                logging.warning("backbone pretraining stopped at step %d for preemption.", step)
                raise Preempted(f"backbone pretraining stopped at step {step}")
            if step % save_every == 0 and step < total:
                progress.save(state, step)
    return tuple(state)
