"""Trajectory parity (slr_jax.parity.trajectory) and the pieces it rests on.

Without a reference checkout: ``train.train_step`` over several steps against PyTorch's own
``SGD``/``CosineAnnealingLR`` set up by the reference trainers' rules (parameter groups from
the reference's names), on a toy network named like SLRNet; the reported training noise; the
injection of that noise into PyTorch dropouts; the channel scaling of the reference. With
``SLR_REFERENCE_REPO``: a short trajectory against the checkout at small width.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from slr_jax import convert
from slr_jax import train as train_lib
from slr_jax.losses import slrnet_objective
from slr_jax.models.heads import head_batch_norm, mask_pooled_scores, with_background
from slr_jax.models.noise import NOISE, Dropout
from slr_jax.ops import resize_bilinear_align_corners
from slr_jax.parity import trajectory

torch = pytest.importorskip("torch")

C = 4  # classes, background included
CROP, BATCH = 33, 2


# ------------------------------------------------------------------------------ toy net
class _ToyBlock(nn.Module):
    """``b3``: a frozen BatchNorm, a weight (x1, decayed) and a bias (x2)."""

    @nn.compact
    def __call__(self, x):
        bn = nn.BatchNorm(use_running_average=True, name="bn_branch2a")
        y = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv_branch2a")(nn.relu(bn(x))))
        return y + nn.Conv(4, (1, 1), use_bias=True, name="conv_branch1")(x)


class _ToyBackbone(nn.Module):
    """A frozen stem ``conv1a`` and one trainable block ``b3``."""

    @nn.compact
    def __call__(self, x):
        return _ToyBlock(name="b3")(nn.Conv(4, (3, 3), use_bias=False, name="conv1a")(x))


class _Child(nn.Module):
    """A 1x1 conv (or Dense) with bias, named ``child`` (a PyTorch ``Sequential`` index)."""

    child: str
    features: int
    dense: bool = False

    @nn.compact
    def __call__(self, x):
        if self.dense:
            return nn.Dense(self.features, name=self.child)(x)
        return nn.Conv(self.features, (1, 1), name=self.child)(x)


class _ToyHead(nn.Module):
    """``fc8_x``: conv ``0`` (no bias) and a head BatchNorm ``1`` (statistics train)."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(8, (1, 1), use_bias=False, name="0")(x)
        return nn.relu(head_batch_norm(train, jnp.float32, "1")(x))


class ToySLRNet(nn.Module):
    """SLRNet's training outputs from a few layers named like SLRNet's: every optimiser group,
    a head BatchNorm updating its statistics and a reported dropout; cheap to compile.
    ``images`` (B, 33, 33, 3) -> the outputs of ``SLRNet(mode='train')`` at stride 4."""

    @nn.compact
    def __call__(self, images, mode="train", train=False):
        backbone, head = _ToyBackbone(name="backbone"), _ToyHead(name="fc8_x")
        last_conv, aux = _Child("8", C - 1, name="last_conv"), _Child("4", C - 1, name="aux_head")
        low_rank = _Child("transform1", C, dense=True, name="factorization_reconstruction")
        drop = Dropout(0.5, deterministic=not train)

        def features(x):
            x = nn.avg_pool(x, (4, 4), (4, 4), padding="SAME")
            return drop(head(backbone(x), train))

        x1 = features(images)
        x2 = features(resize_bilinear_align_corners(images, (CROP // 2, CROP // 2)))
        size = x1.shape[1:3]
        logits = with_background(last_conv(x1), "constant")
        logits2 = resize_bilinear_align_corners(with_background(last_conv(x2), "constant"), size)
        aux_logits = with_background(aux(x1), "one_minus_max")
        masks, masks2 = jax.nn.softmax(logits), jax.nn.softmax(logits2)
        aux_masks = jax.nn.softmax(aux_logits)
        codes = jax.nn.softmax(low_rank(x1))
        codes2 = resize_bilinear_align_corners(jax.nn.softmax(low_rank(x2)), size)
        return dict(logits=logits, masks=masks, logits2=logits2, masks2=masks2,
                    aux_logits=aux_logits, aux_masks=aux_masks, codes=codes, codes2=codes2,
                    cls=mask_pooled_scores(logits, masks), cls2=mask_pooled_scores(logits2, masks2),
                    cls_aux=mask_pooled_scores(aux_logits, aux_masks),
                    dictionary=jnp.zeros((images.shape[0], C, 8)))  # fmt: skip


# ------------------------------------------------------- the reference trainers' optimiser
REFERENCE_FIXED_BLOCKS = ("conv1a", "b2", "b2_1", "b2_2")  # resnet38d's ``fixed_layers``


def reference_requires_grad(name: str) -> bool:
    """The reference's ``requires_grad`` by PyTorch name: off for the fixed blocks and every
    backbone BatchNorm (``SingleStageNet._fix_running_stats(backbone, fix_params=True)``)."""
    parts = name.split(".")
    return parts[0] != "backbone" or not (
        parts[1] in REFERENCE_FIXED_BLOCKS or parts[-2].startswith("bn")
    )


def reference_group(name: str) -> int:
    """``SingleStageNet.parameter_groups()`` by PyTorch name."""
    backbone = name.startswith("backbone.")
    if name.endswith(".bias"):
        return 1 if backbone else 3
    return 0 if backbone else 2


def reference_sgd(params: dict, cfg_train, steps_per_epoch: int):
    """PyTorch's ``SGD`` and ``CosineAnnealingLR`` as ``tools/train_voc_wss.py`` builds them
    over ``params`` (PyTorch name -> array): (tensors by name, optimizer, scheduler)."""
    tensors = {
        n: torch.tensor(np.array(v), requires_grad=reference_requires_grad(n))
        for n, v in params.items()
    }
    groups = ([], [], [], [])
    for name, tensor in tensors.items():
        groups[reference_group(name)].append(tensor)
    lr, wd = cfg_train.lr, cfg_train.weight_decay
    optimizer = torch.optim.SGD(
        [{"params": g, "lr": m * lr, "weight_decay": d}
         for g, m, d in zip(groups, (1.0, 2.0, 10.0, 20.0), (wd, 0.0, wd, 0.0))],
        lr=lr, momentum=0.9, weight_decay=wd, nesterov=True,
    )  # fmt: skip
    decay_steps = (cfg_train.num_epochs - cfg_train.pretrain_epochs) * steps_per_epoch
    return tensors, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, decay_steps)


def _toy_batches(steps: int):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        raw = rng.uniform(size=(BATCH, CROP, CROP, 3)).astype(np.float32)
        labels = np.zeros((BATCH, C - 1), np.float32)
        labels[0, 0] = labels[1, 1:] = 1
        yield dict(image=(raw - 0.45) / 0.225, raw_image=raw, labels=labels,
                   mask=np.full((BATCH, CROP, CROP), 255, np.int32),
                   is_labeled=np.zeros(BATCH, bool))  # fmt: skip


def _step_grads(state, batch, *, loss_cfg, pretrain_steps):
    """The gradient ``train_step`` takes (same loss, key and statistics), by ``jax.grad``."""
    seg_weight = (state.step >= pretrain_steps).astype(jnp.float32)

    def loss(params):
        outputs, _ = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], mode="train",
            train=True, rngs={"dropout": train_lib.dropout_key(state)}, mutable=["batch_stats"],
        )  # fmt: skip
        return slrnet_objective(
            outputs, batch, loss_cfg=loss_cfg, variant="wsss", seg_weight=seg_weight
        )[0]

    return jax.grad(loss)(state.params)


def _change_error(ours, theirs, start) -> float:
    change = theirs - start
    return float(np.linalg.norm((ours - start) - change) / max(np.linalg.norm(change), 1e-30))


def test_train_step_follows_the_reference_optimizer_and_schedule():
    """Five ``train_step``s (one step per epoch, seg loss and cosine lr from step 2) against
    PyTorch's SGD fed the same gradients: lr and seg switch per step, every leaf's change
    (groups x1/x2/x10/x20, decay on weights only, Nesterov), frozen leaves untouched."""
    config = common.get_config()
    config.train.update(batch_size=BATCH, num_epochs=6, pretrain_epochs=1, lr=0.02,
                        weight_decay=0.01)  # fmt: skip
    config.loss.update(pamr_iters=1, pamr_dilations=(1, 2))  # cheaper to compile
    plan = train_lib.plan_steps(config.train, BATCH)
    assert (plan.steps_per_epoch, plan.pretrain_steps, plan.decay_steps) == (1, 2, 5)
    lr_fn = plan.learning_rate_fn(config.train.lr)
    state = train_lib.create_train_state(
        config, ToySLRNet(), lr_fn, jax.random.key(0), init_checkpoint=""
    )
    kwargs = dict(loss_cfg=config.loss, pretrain_steps=plan.pretrain_steps)
    objective = functools.partial(slrnet_objective, loss_cfg=config.loss, variant="wsss")
    step = jax.jit(functools.partial(
        train_lib.train_step, objective=objective, learning_rate_fn=lr_fn,
        pretrain_steps=plan.pretrain_steps,
    ))  # fmt: skip
    grad_fn = jax.jit(functools.partial(_step_grads, **kwargs))
    start = convert.flax_to_torch({"params": state.params})
    tensors, optimizer, schedule = reference_sgd(start, config.train, plan.steps_per_epoch)
    seg_terms = []
    for k, batch in enumerate(_toy_batches(5)):
        grads = convert.flax_to_torch({"params": grad_fn(state, batch)})
        lr = optimizer.param_groups[0]["lr"]
        state, metrics = step(state, batch)
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(np.array(grads[name])) if tensor.requires_grad else None
        optimizer.step()
        seg_on = k // plan.steps_per_epoch > config.train.pretrain_epochs
        if seg_on:
            schedule.step()
        assert float(metrics["seg_weight"]) == float(seg_on), f"step {k}"
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6, err_msg=f"step {k}")
        ours = convert.flax_to_torch({"params": state.params})
        for name, tensor in tensors.items():
            error = _change_error(ours[name], tensor.detach().numpy(), start[name])
            assert error < 1e-5, f"step {k}: {name} changed differently ({error:.2e})"
        seg_terms.append(float(metrics["seg"]))
    assert max(seg_terms) > 0, "the seg loss must be non-zero for the switch to be tested"
    assert optimizer.param_groups[0]["lr"] < config.train.lr  # the cosine decay ran
    for name, tensor in tensors.items():
        moved = not np.array_equal(tensor.detach().numpy(), start[name])
        assert moved == tensor.requires_grad, f"{name}: moved={moved}"
    assert {reference_group(n) for n, t in tensors.items() if t.requires_grad} == {0, 1, 2, 3}


# ---------------------------------------------------------------------------- the noise
def test_dropout_draws_as_flax_and_reports_its_mask():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 4, 6)), jnp.float32)
    rngs = {"dropout": jax.random.key(4)}
    expected = nn.Dropout(0.3, broadcast_dims=(1, 2)).apply({}, x, False, rngs=rngs)
    layer = Dropout(0.3, broadcast_dims=(1, 2))
    np.testing.assert_array_equal(layer.apply({}, x, False, rngs=rngs), expected)  # no report
    out, state = layer.apply({}, x, False, rngs=rngs, mutable=[NOISE])
    (keep,) = state[NOISE]["keep"]
    assert keep.shape == (2, 1, 1, 6) and keep.dtype == jnp.bool_
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, np.where(keep, x / np.float32(0.7), 0.0), rtol=1e-7)
    with jax.enable_x64(True):  # the same draws with 64-bit mode on
        again = layer.apply({}, x, False, rngs=rngs, mutable=[NOISE])[1][NOISE]["keep"][0]
    np.testing.assert_array_equal(again, keep)


def test_slrnet_reports_every_mask_and_each_has_a_reference_module():
    """The noise of SLRNet's training forward (shapes only, ``jax.eval_shape``) maps onto the
    reference's dropout modules and gate, with one mask per call."""
    from slr_jax.models import SLRNet, variable_shapes

    model = SLRNet(width=1 / 16)
    variables = variable_shapes(model)
    images = jax.ShapeDtypeStruct((2, CROP, CROP, 3), jnp.float32)
    apply = lambda v, x, key: model.apply(
        v, x, mode="train", train=True, rngs={"dropout": key}, mutable=["batch_stats", NOISE]
    )[1][NOISE]
    noise = jax.eval_shape(apply, variables, images, jax.random.key(0))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, bool), noise)
    masks = trajectory.reference_noise(zeros)
    counts = {name: len(m) for name, m in masks.items()}
    assert counts == {"sg": 2, "aspp.dropout": 2, "last_conv.3": 2, "last_conv.7": 2,
                      "aux_head.3": 1, "backbone.b6.dropout_2b1": 2, "backbone.b6.dropout_2b2": 2,
                      "backbone.b7.dropout_2b1": 2, "backbone.b7.dropout_2b2": 2}  # fmt: skip
    h = (CROP + 3) // 4
    assert masks["sg"][0].shape == (2, 16, h, h)  # NCHW, width 256/16
    assert masks["backbone.b7.dropout_2b1"][0].shape == (2, 64, 1, 1)  # channel dropout


def test_injected_noise_replaces_pytorch_draws_with_pytorch_arithmetic():
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Dropout2d(0.3)).train()
    x = torch.randn(2, 3, 4, 5)
    rng = np.random.default_rng(2)
    keep0, keep1 = rng.uniform(size=(2, 3, 4, 5)) > 0.5, rng.uniform(size=(2, 3, 1, 1)) > 0.3
    with trajectory.injected_noise(net, {"0": [keep0], "1": [keep1]}):
        out = net(x)
    expected = x * torch.from_numpy(keep0).float() * 2.0
    expected = expected * (torch.from_numpy(keep1).float() / 0.7)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="left unused"):
        with trajectory.injected_noise(net, {"0": [keep0, keep0], "1": [keep1]}):
            net(x)
    with pytest.raises(RuntimeError, match="without an injected mask"):
        with trajectory.injected_noise(net, {"0": [keep0]}):
            net(x)
    assert torch.nn.functional.dropout(x, 0.5, training=False) is x  # restored


def test_scaled_reference_channels():
    with trajectory.scaled_reference_channels(0.25, {3, 20, 21}):
        conv = torch.nn.Conv2d(3, 256, 3, padding=1, bias=False)
        head = torch.nn.Conv2d(304, 20, 1)
        norm, linear = torch.nn.BatchNorm2d(48), torch.nn.Linear(256, 256)
    assert conv.weight.shape == (64, 3, 3, 3) and head.weight.shape == (20, 76, 1, 1)
    assert norm.num_features == 12 and linear.weight.shape == (64, 64)
    assert torch.nn.Conv2d(3, 256, 1).weight.shape == (256, 3, 1, 1)  # restored


# ------------------------------------------------------------------------ the reference
def test_short_trajectory_matches_the_reference(reference_file):
    """Three steps of wsss at width 1/8 against the checkout (all rows pass)."""
    repo = reference_file("experiments", "slrnet_voc_wss_v100x2.yaml").parents[1]
    pytest.importorskip("yaml")
    rows = trajectory.trajectory_rows(str(repo), "wsss", crop=41, batch=2, steps=3, width=0.125)
    assert all(r.name.startswith("traj/") for r in rows)
    failed = [f"{r.name}: {r.rel:.2e} > {r.tol:.0e}" for r in rows if not r.passed]
    assert not failed, failed
