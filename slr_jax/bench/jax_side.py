"""slr_jax's side of the benchmark: its compiled train step on the current devices, its
multi-scale inference and the jitted parts of the step (``--pieces``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slr_jax import infer as infer_lib
from slr_jax import sharding, train
from slr_jax.bench.flops import count_train_step_flops
from slr_jax.losses import slrnet_objective
from slr_jax.models import build_model
from slr_jax.ops import resize_bilinear_align_corners, scaled_size
from slr_jax.ops.pamr import pamr


class JaxSide:
    """slr_jax's compiled train step and multi-scale inference on the current devices."""

    def __init__(
        self,
        config: Any,
        inputs: dict[str, np.ndarray],
        seed: int,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.config = config
        self.compiler_options = compiler_options or None
        self.mesh = sharding.make_mesh()
        sharding.check_batch_size(int(config.train.batch_size), self.mesh)
        # The post-pretraining step: seg loss on, cosine lr (the work is the same either way).
        self.plan = train.StepPlan(
            steps_per_epoch=1000, total_steps=30000, pretrain_steps=0, decay_steps=30000
        )
        self.model = build_model(config.model)
        t0 = time.perf_counter()
        self.schedule = self.plan.learning_rate_fn(config.train.lr)
        state = train.create_train_state(
            config, self.model, self.schedule, jax.random.key(seed), init_checkpoint=""
        )
        self.state = jax.device_put(state, sharding.replicated(self.mesh))
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - t0
        self.batch = sharding.shard_batch(inputs, self.mesh)
        self.compiled = None
        self.timings: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    def compile(self) -> None:
        """Lowers and compiles the train step (timed apart: ``lower_s``, ``xla_compile_s``)."""
        step = train.compile_train_step(
            self.config, self.plan, self.schedule, self.mesh, self.state
        )
        t0 = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile(self.compiler_options)
        t2 = time.perf_counter()
        train.release_freed_host_memory()  # as the training loop does after compiling
        self.timings.update(lower_s=t1 - t0, xla_compile_s=t2 - t1)

    def count_flops(self) -> float | None:
        """FLOPs of the global step (``count_train_step_flops``; timed as ``flop_count_s``)."""
        t0 = time.perf_counter()
        flops = count_train_step_flops(self.config, self.plan, self.state, self.batch)
        self.timings["flop_count_s"] = time.perf_counter() - t0
        return flops

    def step(self) -> None:
        if self.compiled is None:
            self.compile()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state.step, metrics))
        self._last_metrics = metrics

    def finish_training(self) -> dict[str, float]:
        metrics = jax.device_get(self._last_metrics)
        self.metrics = {k: float(v) for k, v in metrics.items()}
        return self.metrics

    def variables(self) -> dict:
        """Copies of the trained variables (the state's buffers are donated to the step)."""
        tree = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return jax.tree_util.tree_map(jnp.copy, tree)

    def inference_fn(self, photo: np.ndarray) -> Callable[[], Any]:
        variables = self.variables()
        test = self.config.test

        def run():
            return infer_lib.multiscale_predict(self.model.apply, variables, photo, test)

        return run

    def piece_fns(self, inputs: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
        """Jitted parts of the step, forward only: the backbone on both views, the network with
        PAMR, pseudo labels and every loss term, PAMR alone."""
        model, cfg = self.model, self.config
        variables = self.variables()
        batch = {k: jnp.asarray(v) for k, v in inputs.items()}
        key = jax.random.key(1)
        rngs = {"dropout": key}

        def backbone(v, images):
            size = scaled_size(images.shape[1:3], cfg.model.scale_factor)
            small = resize_bilinear_align_corners(images, size)
            run = lambda m, x: m.backbone(x, True)
            out1, _ = model.apply(v, images, method=run, rngs=rngs, mutable=["batch_stats"])
            out2, _ = model.apply(v, small, method=run, rngs=rngs, mutable=["batch_stats"])
            return out1["conv6"], out2["conv6"]

        def network(v, images):
            out, _ = model.apply(
                v, images, mode="train", train=True, rngs=rngs, mutable=["batch_stats"]
            )
            return out

        def objective(outputs, b):
            return slrnet_objective(
                outputs, b, loss_cfg=cfg.loss, variant=cfg.model.variant, seg_weight=1.0
            )[0]

        def forward_with_loss(v, b):
            return objective(network(v, b["image"]), b)

        outputs = jax.jit(network)(variables, batch["image"])
        masks = jax.lax.stop_gradient((outputs["masks"] + outputs["masks2"]) / 2.0)
        raw = resize_bilinear_align_corners(batch["raw_image"], masks.shape[1:3])
        pamr_fn = jax.jit(
            lambda r, m: pamr(
                r, m, num_iters=cfg.loss.pamr_iters, dilations=tuple(cfg.loss.pamr_dilations)
            )
        )
        jitted = {
            "backbone_forward": (jax.jit(backbone), (variables, batch["image"])),
            "forward_with_loss": (jax.jit(forward_with_loss), (variables, batch)),
            "pamr": (pamr_fn, (raw, masks)),
        }
        return {
            name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in jitted.items()
        }
