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
from absl import logging
from etils import epath
from jax.sharding import Mesh

from slr_jax import checkpoint as checkpoint_lib
from slr_jax.errors import PretrainError
from slr_jax.losses import multilabel_soft_margin
from slr_jax.models.backbone import WideResNet38
from slr_jax.sharding import data_sharded, replicated, shard_batch

CHECKPOINT_DIR = "pretrained_backbone"
METRICS_FILE = "pretrain_metrics.jsonl"


class BackboneClassifier(nn.Module):
    """WideResNet38 -> mean of ``conv6`` over space -> linear: (B, H, W, 3) -> (B, num_labels).

    The backbone is the submodule ``backbone``, named as in ``SLRNet``, so its variables drop
    into the segmentation model unchanged.
    """

    num_labels: int
    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
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


def check_settings(config: Any) -> None:
    """Raises PretrainError for settings that cannot work, before anything is built."""
    cfg = config.pretrain
    if int(cfg.steps) < 0 or float(cfg.lr) <= 0 or float(cfg.weight_decay) < 0:
        raise PretrainError(
            "config.pretrain needs steps >= 0, lr > 0 and weight_decay >= 0; got "
            f"steps={cfg.steps}, lr={cfg.lr}, weight_decay={cfg.weight_decay}."
        )
    if not 0 < float(cfg.momentum) < 1:
        raise PretrainError(f"config.pretrain.momentum must be in (0, 1), got {cfg.momentum}.")
    if int(cfg.steps) > 0 and config.model.variant == "semi_wo_cls":
        raise PretrainError(
            "backbone pretraining needs image labels; the semi_wo_cls setting has none."
        )


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
        },
    }


def pretrain_backbone(
    config: Any,
    workdir: str,
    mesh: Mesh,
    *,
    batches: Iterator[dict[str, np.ndarray]] | None = None,
) -> str:
    """Trains the backbone classifier for ``config.pretrain.steps`` steps; returns the path of
    the backbone checkpoint under ``workdir``. A checkpoint already written there with the same
    settings is returned as it is (a restarted run does not pretrain again).

    ``batches`` yields this process's NumPy batches (``image`` (B, H, W, 3), ``labels``
    (B, C-1)); by default the training pipeline of ``config.dataset``. The batch is sharded over
    the ``data`` axis of ``mesh`` and the variables replicated, as in the SLRNet step.
    """
    from slr_jax import data as data_lib

    check_settings(config)
    cfg = config.pretrain
    out_dir = epath.Path(workdir) / CHECKPOINT_DIR
    metadata = _metadata(config)
    meta_file = out_dir / checkpoint_lib.METADATA_FILE
    if meta_file.exists() and json.loads(meta_file.read_text()) == metadata:
        logging.info("backbone pretraining: reusing %s", out_dir)
        return os.fspath(out_dir)

    model = BackboneClassifier(
        int(config.model.num_classes) - 1, float(config.model.width), jnp.dtype(config.model.dtype)
    )
    crop = int(config.dataset.crop_size)
    init_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(int(config.seed)), 1))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, crop, crop, 3)), train=False))(
        init_key
    )
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    state_sharding, data = replicated(mesh), data_sharded(mesh)
    step_fn = jax.jit(
        make_step(model, tx),
        in_shardings=(*(state_sharding,) * 3, data, data, state_sharding),
        out_shardings=state_sharding,
        donate_argnums=(0, 1, 2),
    )
    params, batch_stats, opt_state = jax.device_put(
        (params, batch_stats, opt_state), state_sharding
    )
    own_batches = batches is None
    if own_batches:
        batches = data_lib.train_dataset(config)
    try:
        params, batch_stats, lines = _train_loop(
            config, step_fn, (params, batch_stats, opt_state), batches, mesh, step_key
        )
    finally:
        if own_batches and hasattr(batches, "close"):
            batches.close()
    variables = {"params": {"backbone": params["backbone"]},
                 "batch_stats": {"backbone": batch_stats["backbone"]}}  # fmt: skip
    if jax.process_index() == 0:
        metrics_path = epath.Path(workdir) / METRICS_FILE
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # The metadata file is written last: a half-written checkpoint is never reused.
    if meta_file.exists():
        meta_file.unlink()
    checkpoint_lib.save_variables(out_dir, jax.device_get(variables), metadata)
    logging.info("backbone pretraining: wrote %s", out_dir)
    return os.fspath(out_dir)


def _train_loop(config, step_fn, state, batches, mesh, step_key):
    """Runs the pretraining steps -> (params, batch_stats, logged lines)."""
    params, batch_stats, opt_state = state
    cfg = config.pretrain

    total, log_every = int(cfg.steps), max(int(config.train.log_every_steps), 1)
    lines, pending, tick = [], [], time.perf_counter()
    for step in range(1, total + 1):
        batch = shard_batch(next(batches), mesh, keys=("image", "labels"))
        key = jax.random.fold_in(step_key, step)
        params, batch_stats, opt_state, loss = step_fn(
            params, batch_stats, opt_state, batch["image"], batch["labels"], key
        )
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
            lines.append({"step": step, "loss": float(losses.mean()), "steps_per_s": rate})
            logging.info(
                "backbone pretraining step %d/%d: loss %.4f | %.2f steps/s",
                step, total, losses.mean(), rate,
            )  # fmt: skip
    return params, batch_stats, lines
