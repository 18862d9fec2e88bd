"""SLRNet building blocks and the full model, pinned against PyTorch functional re-expressions.

Each torch side below is written from the formulas (NCHW, ``torch.nn.functional``); weights go
through ``slr_jax.convert.flax_to_torch`` so the converter's layouts are exercised too. Random
variables are drawn from ``jax.eval_shape`` structures (no slow ``init``), with random BatchNorm
statistics and affine parameters so no BatchNorm is the identity.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import traverse_util
from numerics import assert_close

from configs import common
from slr_jax.convert import flax_to_torch
from slr_jax.models import MODES, SLRNet, build_model, layers, variable_shapes
from slr_jax.models.backbone import BottleneckBlock, ResBlock, WideResNet38
from slr_jax.models.heads import (
    ASPP,
    GCI,
    AuxHead,
    ConvBNReLU,
    LastConv,
    focal_penalty,
    mask_pooled_scores,
    stochastic_gate,
    with_background,
)
from slr_jax.models.lowrank import FactorizationReconstruction, initial_dictionary


def model_config(**overrides):
    """``config.model`` of configs/common.py with ``overrides``."""
    cfg = common.get_config().model
    cfg.update(overrides)
    return cfg


torch = pytest.importorskip("torch")
F = torch.nn.functional

WIDTH = 0.0625  # 256 -> 16 channels, 4096 -> 256
TORCH_BN_MOMENTUM = 0.05
BN_EPS = 1e-5


# ----------------------------------------------------------------------------------- helpers
def fill_random(shapes, seed: int = 0) -> dict:
    """Random arrays for a ``{'params', 'batch_stats'}`` tree of shape structs.

    Kernels He-scaled, biases/means small normals, BN scales and variances in [0.5, 1.5].
    """
    rng = np.random.default_rng(seed)
    out = {}
    for collection, tree in shapes.items():
        flat = traverse_util.flatten_dict(dict(tree))
        filled = {}
        for path, leaf in flat.items():
            shape, name = tuple(leaf.shape), path[-1]
            if name == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
            elif name in ("scale", "var"):
                value = rng.uniform(0.5, 1.5, size=shape)
            else:  # bias, mean
                value = rng.normal(size=shape) * 0.1
            filled[path] = value.astype(np.float32)
        out[collection] = traverse_util.unflatten_dict(filled)
    return out


def random_variables(module: nn.Module, *inputs, seed: int = 0, **kwargs) -> dict:
    """Random variables of ``module`` for ``inputs`` (structure from ``jax.eval_shape``)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kwargs))
    return fill_random(shapes, seed)


def to_torch(x: np.ndarray):
    """NHWC (or any) NumPy -> torch; 4-D arrays become NCHW."""
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def from_torch(t) -> np.ndarray:
    """torch (NCHW for 4-D) -> NumPy NHWC."""
    x = t.detach().numpy()
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


class TorchWeights:
    """A converted state dict with functional conv / BatchNorm helpers (NCHW)."""

    def __init__(self, variables: dict):
        self.sd = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(variables).items()}

    def conv(self, x, name, *, stride=1, dilation=1):
        weight = self.sd[f"{name}.weight"]
        pad = dilation * (weight.shape[-1] // 2)
        bias = self.sd.get(f"{name}.bias")
        return F.conv2d(x, weight, bias, stride=stride, padding=pad, dilation=dilation)

    def bn(self, x, name, *, training=False):
        """``training=True`` updates ``running_mean/var`` of this object in place (as torch)."""
        return F.batch_norm(
            x,
            self.sd[f"{name}.running_mean"],
            self.sd[f"{name}.running_var"],
            self.sd.get(f"{name}.weight"),
            self.sd.get(f"{name}.bias"),
            training=training,
            momentum=TORCH_BN_MOMENTUM,
            eps=BN_EPS,
        )

    def conv_bn_relu(self, x, name, *, training=False, relu=True, dilation=1):
        x = self.bn(self.conv(x, f"{name}.0", dilation=dilation), f"{name}.1", training=training)
        return F.relu(x) if relu else x


def _nhwc(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------- backbone blocks
def torch_resblock(w: TorchWeights, x, *, stride, first_dilation, dilation, same_shape):
    pre = F.relu(w.bn(x, "bn_branch2a"))
    shortcut = x if same_shape else w.conv(pre, "conv_branch1", stride=stride)
    y = w.conv(pre, "conv_branch2a", stride=stride, dilation=first_dilation)
    y = F.relu(w.bn(y, "bn_branch2b1"))
    y = w.conv(y, "conv_branch2b1", dilation=dilation)
    return shortcut + y, pre


@pytest.mark.parametrize(
    "cin,mid,cout,stride,first_dilation,dilation",
    [
        (8, 8, 8, 1, 1, 1),  # same shape: identity shortcut
        (8, 16, 16, 2, 1, 1),  # b2/b3/b4: stride 2, projection shortcut
        (8, 8, 16, 1, 1, 2),  # b5: first conv undilated, second dilated
        (16, 8, 16, 1, 2, 2),  # b5_1: both dilated, same shape
    ],
)
def test_resblock_matches_torch(cin, mid, cout, stride, first_dilation, dilation):
    block = ResBlock(mid, cout, stride, first_dilation, dilation)
    x = _nhwc((2, 13, 11, cin))
    variables = random_variables(block, x)
    same_shape = cin == cout and stride == 1
    assert ("conv_branch1" in variables["params"]) == (not same_shape)
    out, pre = block.apply(variables, x)
    ref_out, ref_pre = torch_resblock(
        TorchWeights(variables), to_torch(x), stride=stride, first_dilation=first_dilation,
        dilation=dilation, same_shape=same_shape,
    )  # fmt: skip
    assert_close(out, from_torch(ref_out), what="ResBlock output")
    assert_close(pre, from_torch(ref_pre), what="ResBlock bn-relu")


def test_resblock_batch_norm_stats_option_trains_with_batch_statistics():
    """``batch_norm_stats=True`` (training from scratch): torch ``BatchNorm2d`` in training
    mode (batch statistics, running mean with PyTorch's default momentum 0.1); in eval mode
    the same block equals the reference's frozen one."""
    cin = cout = 8
    block = ResBlock(8, cout, batch_norm_stats=True)
    x = _nhwc((3, 9, 7, cin))
    variables = random_variables(block, x)
    (out, _), updates = block.apply(variables, x, True, mutable=["batch_stats"])
    w = TorchWeights(variables)
    pre = F.relu(F.batch_norm(to_torch(x), None, None, w.sd["bn_branch2a.weight"],
                              w.sd["bn_branch2a.bias"], training=True, eps=BN_EPS))  # fmt: skip
    y = w.conv(pre, "conv_branch2a")
    y = F.relu(F.batch_norm(y, None, None, w.sd["bn_branch2b1.weight"],
                            w.sd["bn_branch2b1.bias"], training=True, eps=BN_EPS))  # fmt: skip
    ref = to_torch(x) + w.conv(y, "conv_branch2b1")
    assert_close(out, from_torch(ref), what="ResBlock with batch statistics")
    old = _bn_leaves(variables["batch_stats"])
    new = _bn_leaves(updates["batch_stats"])
    batch_mean = np.asarray(x, np.float64).mean(axis=(0, 1, 2))
    assert_close(new["bn_branch2a/mean"], 0.9 * old["bn_branch2a/mean"] + 0.1 * batch_mean,
                 what="running mean, momentum 0.1")  # fmt: skip
    frozen = ResBlock(8, cout)
    for train in (False, True):
        assert not np.array_equal(
            np.asarray(out), np.asarray(frozen.apply(variables, x, True)[0])
        ), "batch statistics must change the training output"
        np.testing.assert_array_equal(
            np.asarray(block.apply(variables, x, False)[0]),
            np.asarray(frozen.apply(variables, x, train)[0]),
            err_msg="eval mode must use the running statistics, as the frozen block",
        )


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    x = _nhwc((2, 9, 7, 8))
    block = ResBlock(8, 8, zero_init_residual=True)
    variables = block.init(jax.random.key(0), x)
    assert not np.any(np.asarray(variables["params"]["conv_branch2b1"]["kernel"]))
    assert np.any(np.asarray(variables["params"]["conv_branch2a"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(block.apply(variables, x)[0]), x)
    bottleneck = BottleneckBlock(16, dilation=2, zero_init_residual=True)
    variables = bottleneck.init(jax.random.key(0), x)
    out, pre = bottleneck.apply(variables, x)
    shortcut = jax.lax.conv_general_dilated(
        pre, variables["params"]["conv_branch1"]["kernel"], (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), np.asarray(shortcut), rtol=1e-6, atol=1e-6)
    # The whole backbone: exactly the last convolution of every branch starts at zero.
    backbone = WideResNet38(WIDTH, zero_init_residual=True)
    params = backbone.init(jax.random.key(0), _images(), False)["params"]
    for name, leaves in params.items():
        for conv_name, leaf in leaves.items():
            if not isinstance(leaf, dict) or "kernel" not in leaf:
                continue
            last = conv_name == ("conv_branch2b2" if name in ("b6", "b7") else "conv_branch2b1")
            assert np.any(np.asarray(leaf["kernel"])) != last, (name, conv_name)


def test_backbone_with_batch_statistics_updates_its_running_statistics():
    backbone = WideResNet38(WIDTH, batch_norm_stats=True)
    shapes = jax.eval_shape(lambda k: backbone.init(k, _images(), False), jax.random.key(0))
    variables = fill_random(shapes, 0)
    _, updates = backbone.apply(
        variables, _images(), True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
    )
    old = _bn_leaves(variables["batch_stats"])
    new = _bn_leaves(updates["batch_stats"])
    assert set(old) == set(new)
    for name, value in old.items():
        assert not np.array_equal(value, new[name]), f"backbone {name} did not update"


def test_bottleneck_matches_torch_eval():
    cout, dilation = 32, 4
    block = BottleneckBlock(cout, dilation, dropout=0.3)
    x = _nhwc((2, 11, 9, 16))
    variables = random_variables(block, x)
    out, _ = block.apply(variables, x, False)
    w, xt = TorchWeights(variables), to_torch(x)
    pre = F.relu(w.bn(xt, "bn_branch2a"))
    y = F.relu(w.bn(w.conv(pre, "conv_branch2a"), "bn_branch2b1"))
    y = F.dropout2d(y, 0.3, training=False)
    y = F.relu(w.bn(w.conv(y, "conv_branch2b1", dilation=dilation), "bn_branch2b2"))
    y = F.dropout2d(y, 0.3, training=False)
    ref = w.conv(pre, "conv_branch1") + w.conv(y, "conv_branch2b2")
    assert_close(out, from_torch(ref), what="BottleneckBlock eval")


def test_bottleneck_dropout_drops_whole_channels():
    """Dropout2d semantics: one keep/drop draw per (example, channel), kept ones scaled 1/(1-p)."""
    p = 0.5
    block = BottleneckBlock(32, 2, dropout=p)
    x = _nhwc((4, 7, 6, 16))
    variables = random_variables(block, x)
    _, state = block.apply(
        variables, x, True, rngs={"dropout": jax.random.key(3)}, capture_intermediates=True
    )
    inter = state["intermediates"]
    dropped_in = np.maximum(np.asarray(inter["bn_branch2b1"]["__call__"][0]), 0)
    dropped_out = np.asarray(inter["Dropout_0"]["__call__"][0])
    kept = 0
    for b in range(x.shape[0]):
        for c in range(dropped_in.shape[-1]):
            if np.all(dropped_out[b, ..., c] == 0) and np.any(dropped_in[b, ..., c] > 0):
                continue
            np.testing.assert_allclose(
                dropped_out[b, ..., c], dropped_in[b, ..., c] / (1 - p), rtol=1e-6,
                err_msg=f"example {b} channel {c} is neither dropped nor kept whole",
            )  # fmt: skip
            kept += 1
    total = x.shape[0] * dropped_in.shape[-1]
    assert 0 < kept < total, f"expected some channels kept and some dropped, kept {kept}/{total}"


# ----------------------------------------------------------------------------------- heads
def torch_aspp(w: TorchWeights, x):
    branches = [F.relu(w.bn(w.conv(x, "aspp1.atrous_conv"), "aspp1.bn"))]
    for i, dilation in ((2, 12), (3, 24), (4, 36)):
        y = w.conv(x, f"aspp{i}.atrous_conv", dilation=dilation)
        branches.append(F.relu(w.bn(y, f"aspp{i}.bn")))
    pooled = F.adaptive_avg_pool2d(x, 1)
    pooled = F.relu(w.bn(w.conv(pooled, "global_avg_pool.1"), "global_avg_pool.2"))
    pooled = F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=True)
    y = torch.cat(branches + [pooled], dim=1)
    y = F.relu(w.bn(w.conv(y, "conv1"), "bn1"))
    return F.dropout(y, 0.5, training=False)


def test_aspp_matches_torch_eval():
    # 40 px so that the dilation-12 and -24 taps read real pixels, not only padding.
    x = _nhwc((2, 40, 27, 24))
    aspp = ASPP(WIDTH)
    variables = random_variables(aspp, x)
    out = aspp.apply(variables, x)
    assert out.shape == (2, 40, 27, 16)
    assert_close(out, from_torch(torch_aspp(TorchWeights(variables), to_torch(x))), what="ASPP")


def torch_gci(w: TorchWeights, shallow, deep, *, training=False):
    c = shallow.shape[1]
    deep = w.conv_bn_relu(deep, "fc_deep", training=training)
    attrs = deep.flatten(2).max(dim=-1).values[:, :, None, None]  # (B, 2c, 1, 1)
    gamma, beta = attrs[:, :c], attrs[:, c:]
    skip = w.conv_bn_relu(shallow, "fc_skip", training=training, relu=False)
    return w.conv_bn_relu(F.relu(skip * (gamma + 1) + beta), "fc_cls", training=training)


def test_gci_matches_torch_eval():
    shallow, deep = _nhwc((2, 9, 7, 16), 1), _nhwc((2, 9, 7, 16), 2)
    gci = GCI(WIDTH)
    variables = random_variables(gci, shallow, deep)
    # fc_skip's BatchNorm has no affine parameters; its running statistics exist.
    assert "1" not in variables["params"]["fc_skip"]
    assert set(variables["batch_stats"]["fc_skip"]["1"]) == {"mean", "var"}
    out = gci.apply(variables, shallow, deep)
    ref = torch_gci(TorchWeights(variables), to_torch(shallow), to_torch(deep))
    assert_close(out, from_torch(ref), what="GCI eval")


def test_last_conv_and_aux_head_match_torch_eval():
    x = _nhwc((2, 9, 8, 16))
    head = LastConv(20, WIDTH)
    variables = random_variables(head, x)
    w, xt = TorchWeights(variables), to_torch(x)
    y = F.dropout(F.relu(w.bn(w.conv(xt, "0"), "1")), 0.5, training=False)
    y = F.dropout(F.relu(w.bn(w.conv(y, "4"), "5")), 0.1, training=False)
    ref = w.conv(y, "8")
    assert "bias" in variables["params"]["8"], "classifier conv has a bias"
    assert_close(head.apply(variables, x), from_torch(ref), what="LastConv eval")

    aux = AuxHead(20, WIDTH)
    variables = random_variables(aux, x, seed=5)
    w = TorchWeights(variables)
    y = F.dropout(F.relu(w.bn(w.conv(xt, "0"), "1")), 0.5, training=False)
    assert_close(aux.apply(variables, x), from_torch(w.conv(y, "4")), what="AuxHead eval")


def _bn_leaves(batch_stats) -> dict:
    return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(batch_stats).items()}


def test_gci_train_mode_uses_batch_statistics_and_momentum():
    """Batch statistics in training; running mean and variance updated like torch (momentum
    0.05, the unbiased batch variance blended into the running variance)."""
    b, h, w_ = 2, 9, 7
    shallow, deep = _nhwc((b, h, w_, 16), 1), _nhwc((b, h, w_, 16), 2)
    gci = GCI(WIDTH)
    variables = random_variables(gci, shallow, deep)
    out, updates = gci.apply(variables, shallow, deep, True, mutable=["batch_stats"])
    weights = TorchWeights(variables)
    old = {k: v.clone() for k, v in weights.sd.items()}
    ref = torch_gci(weights, to_torch(shallow), to_torch(deep), training=True)
    assert_close(out, from_torch(ref), what="GCI train (batch statistics)")
    # Eval mode (running statistics) gives a clearly different answer: the mode matters.
    eval_out = np.asarray(gci.apply(variables, shallow, deep, False))
    assert np.max(np.abs(eval_out - np.asarray(out))) > 1e-2

    new = _bn_leaves(updates["batch_stats"])
    for layer in ("fc_deep/1", "fc_skip/1", "fc_cls/1"):
        key = layer.replace("/", ".")
        assert_close(new[f"{layer}/mean"], weights.sd[f"{key}.running_mean"].numpy(),
                     what=f"{layer} running mean")  # fmt: skip
        assert_close(new[f"{layer}/var"], weights.sd[f"{key}.running_var"].numpy(),
                     what=f"{layer} running var (unbiased)")  # fmt: skip
        moved = np.max(np.abs(new[f"{layer}/var"] - old[f"{key}.running_var"].numpy()))
        assert moved > 1e-4, f"{layer}: running variance not updated"


def test_gci_train_gradient_under_jit_matches_torch():
    """The spatial max's gradient goes to the arg-max pixel under ``jit`` too (``max_to_argmax``):
    with ``jnp.max`` after a training-mode BatchNorm, XLA:CPU's recomputation broke the equality
    test that credits the max, and ``fc_deep``'s gradients were ~50% off at these shapes."""
    b, h, c = 2, 6, 64
    shallow, deep = _nhwc((b, h, h, c), 1), np.abs(_nhwc((b, h, h, c), 2))
    weights_out = _nhwc((b, h, h, c), 3)
    gci = GCI(0.25)
    variables = random_variables(gci, shallow, deep)

    def loss(params):
        out, _ = gci.apply({**variables, "params": params}, shallow, deep, True,
                           mutable=["batch_stats"])  # fmt: skip
        return jnp.sum(out * weights_out)

    grads = flax_to_torch({"params": jax.jit(jax.grad(loss))(variables["params"])})
    w = TorchWeights(variables)
    for name, tensor in w.sd.items():
        tensor.requires_grad_(not name.endswith(("running_mean", "running_var")))
    out = torch_gci(w, to_torch(shallow), to_torch(deep), training=True)
    (out * to_torch(weights_out)).sum().backward()
    for name in ("fc_deep.0.weight", "fc_deep.1.weight", "fc_deep.1.bias", "fc_cls.0.weight"):
        assert_close(grads[name], w.sd[name].grad.numpy(), rtol=1e-4, what=f"grad {name}")


def test_conv_bn_relu_train_mode_matches_torch():
    x = _nhwc((3, 6, 5, 12))
    layer = ConvBNReLU(16, kernel=3)
    variables = random_variables(layer, x)
    out, updates = layer.apply(variables, x, True, mutable=["batch_stats"])
    w = TorchWeights(variables)
    ref = F.relu(w.bn(w.conv(to_torch(x), "0"), "1", training=True))
    assert_close(out, from_torch(ref), what="ConvBNReLU train")
    new = _bn_leaves(updates["batch_stats"])
    assert_close(new["1/mean"], w.sd["1.running_mean"].numpy(), what="running mean")


@pytest.mark.parametrize("groups", [2, 3])
def test_conv_bn_relu_stat_groups_match_torch_data_parallel(groups):
    """``bn_stat_groups=G``: what the reference's ``nn.DataParallel`` on G GPUs computes, each
    GPU's share of the batch normalised with its own statistics and the running statistics
    updated from the first share (replica 0's buffers are the module's)."""
    x = _nhwc((6, 6, 5, 12))
    layer = ConvBNReLU(16, kernel=3, bn_stat_groups=groups)
    variables = random_variables(layer, x)
    out, updates = layer.apply(variables, x, True, mutable=["batch_stats"])
    shares = [TorchWeights(variables) for _ in range(groups)]
    ref = torch.cat(
        [
            F.relu(w.bn(w.conv(to_torch(part), "0"), "1", training=True))
            for w, part in zip(shares, np.split(np.asarray(x), groups))
        ]
    )
    assert_close(out, from_torch(ref), what=f"ConvBNReLU train, {groups} groups")
    new = _bn_leaves(updates["batch_stats"])
    assert_close(new["1/mean"], shares[0].sd["1.running_mean"].numpy(), what="running mean")
    assert_close(new["1/var"], shares[0].sd["1.running_var"].numpy(), what="running var")
    whole, _ = ConvBNReLU(16, kernel=3).apply(variables, x, True, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(whole) - np.asarray(out))) > 1e-3, "groups had no effect"


def test_bn_stat_groups_must_divide_the_batch():
    layer = ConvBNReLU(4, bn_stat_groups=2)
    x = _nhwc((3, 4, 4, 5))
    with pytest.raises(ValueError, match="stat_groups=2 does not divide the batch of 3"):
        layer.init(jax.random.key(0), x, True)


# --------------------------------------------------------------------------- low-rank module
def torch_initial_dictionary(features, logits):
    """features (B, N, D), logits (B, N, K) -> (B, K, D)."""
    probs = torch.softmax(logits, dim=-1).transpose(1, 2)  # (B, K, N)
    probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.bmm(probs, features)


def torch_factorization(x, dict_init, sd, *, num_iters, temperature):
    """x (B, N, D), dict_init (B, K, D) -> (out (B, N, D), codes (B, K, N), dict (B, K, D))."""

    def l2n(t):
        return t / (t.norm(dim=-1, keepdim=True) + 1e-6)

    feats = F.linear(x, sd["transform1.weight"], sd["transform1.bias"]).transpose(1, 2)
    dictionary = l2n(F.linear(dict_init, sd["transform1.weight"], sd["transform1.bias"]))
    for _ in range(num_iters):
        codes = torch.softmax(torch.bmm(dictionary, feats) / temperature, dim=1)
        attn = codes + 1e-6
        attn = attn / attn.sum(dim=-1, keepdim=True)
        dictionary = l2n(torch.bmm(attn, feats.transpose(1, 2)))
    recon = F.relu(torch.bmm(codes.transpose(1, 2), dictionary))
    out = F.relu(x + F.linear(recon, sd["transform2.weight"], sd["transform2.bias"]))
    return out, codes, dictionary


@pytest.mark.parametrize("num_iters,temperature", [(1, 1.0), (3, 1.0), (1, 0.5), (3, 0.5)])
def test_factorization_matches_torch_with_gradients(num_iters, temperature):
    b, h, w_, d, k = 2, 6, 5, 16, 7
    rng = np.random.default_rng(num_iters)
    feats = rng.normal(size=(b, h, w_, d)).astype(np.float32)
    logits = (2 * rng.normal(size=(b, h, w_, k))).astype(np.float32)
    x = rng.normal(size=(b, 40, d)).astype(np.float32)  # 30 pixels of view 1 + 10 of view 2
    dict_init = np.array(initial_dictionary(jnp.asarray(feats), jnp.asarray(logits)))
    ref_init = torch_initial_dictionary(
        torch.from_numpy(feats.reshape(b, -1, d)), torch.from_numpy(logits.reshape(b, -1, k))
    )
    assert_close(dict_init, ref_init.numpy(), what="initial_dictionary")

    module = FactorizationReconstruction(num_iters, temperature)
    variables = random_variables(module, x, dict_init, seed=num_iters)
    probe = [rng.normal(size=s).astype(np.float32) for s in [(b, 40, d), (b, k, 40), (b, k, d)]]

    def objective(params, x_in):
        outs = module.apply({"params": params}, x_in, dict_init)
        return sum(jnp.sum(o * p) for o, p in zip(outs, probe)), outs

    (value, outs), (grad_params, grad_x) = jax.value_and_grad(objective, (0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x)
    )
    sd = {
        k_: torch.from_numpy(np.array(v)).requires_grad_(True)
        for k_, v in flax_to_torch(variables).items()
    }
    xt = torch.from_numpy(x).requires_grad_(True)
    ref_outs = torch_factorization(
        xt, torch.from_numpy(dict_init), sd, num_iters=num_iters, temperature=temperature
    )
    ref_value = sum((o * torch.from_numpy(p)).sum() for o, p in zip(ref_outs, probe))
    ref_value.backward()
    for name, ours, ref in zip(("output", "codes", "dictionary"), outs, ref_outs):
        assert_close(ours, ref.detach().numpy(), what=f"{name} (iters={num_iters})")
    assert_close(value, ref_value.item(), what="objective")
    assert_close(grad_x, xt.grad.numpy(), what="d/dx")
    for layer in ("transform1", "transform2"):
        g = grad_params[layer]
        assert_close(g["kernel"].T, sd[f"{layer}.weight"].grad.numpy(), what=f"d/d{layer}.W")
        assert_close(g["bias"], sd[f"{layer}.bias"].grad.numpy(), what=f"d/d{layer}.b")


def test_initial_dictionary_is_detached():
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(1, 4, 3, 8)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(1, 4, 3, 5)), jnp.float32)
    loss = lambda f, lg: jnp.sum(initial_dictionary(f, lg) ** 2)
    assert float(loss(feats, logits)) > 0
    grad_f, grad_l = jax.grad(loss, (0, 1))(feats, logits)
    assert not np.any(np.asarray(grad_f)) and not np.any(np.asarray(grad_l))


def test_factorization_rejects_zero_iterations():
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="num_iters must be >= 1"):
        FactorizationReconstruction(0).init(jax.random.key(0), x, jnp.zeros((1, 3, 8)))


def test_factorization_projections_start_like_torch_linear():
    """transform1/transform2 start as the reference's nn.Linear(D, D) does (PyTorch default):
    kernel and bias uniform in +-1/sqrt(D); same spread as torch's own initialisation."""
    d = 128
    variables = FactorizationReconstruction(1).init(
        jax.random.key(0), jnp.zeros((1, 4, d)), jnp.zeros((1, 3, d))
    )
    torch.manual_seed(0)
    reference = torch.nn.Linear(d, d)
    bound = 1.0 / np.sqrt(d)
    for name in ("transform1", "transform2"):
        kernel = np.asarray(variables["params"][name]["kernel"])
        bias = np.asarray(variables["params"][name]["bias"])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.std(kernel) == pytest.approx(reference.weight.detach().numpy().std(), rel=0.05)
        assert np.std(bias) == pytest.approx(bound / np.sqrt(3.0), rel=0.3)


# ------------------------------------------------------------------ gate, scores, background
def test_stochastic_gate_eval_formula():
    deep, shallow = _nhwc((2, 5, 4, 6), 1), _nhwc((2, 5, 4, 6), 2)
    out = stochastic_gate(jnp.asarray(deep), jnp.asarray(shallow), train=False, rng=None)
    np.testing.assert_allclose(out, 0.7 * deep + 0.3 * shallow, rtol=1e-6, atol=1e-6)


def test_stochastic_gate_train_keep_rate_and_determinism():
    deep, shallow = jnp.full((100_000,), 2.0), jnp.zeros((100_000,))
    key = jax.random.key(7)
    out = np.asarray(stochastic_gate(deep, shallow, train=True, rng=key))
    # shallow = 0, so kept elements are the rescaled deep value 2/0.7 and dropped ones 0.
    is_kept = np.isclose(out, 2 / 0.7, rtol=1e-6)
    assert np.all(is_kept | (out == 0)), "gate output is neither the rescaled deep nor shallow"
    keep_rate = float(np.mean(is_kept))
    assert abs(keep_rate - 0.7) < 0.01, f"keep rate {keep_rate:.4f}, expected 0.7 (+-0.01)"
    again = np.asarray(stochastic_gate(deep, shallow, train=True, rng=key))
    other = np.asarray(stochastic_gate(deep, shallow, train=True, rng=jax.random.key(8)))
    np.testing.assert_array_equal(out, again)
    assert np.any(out != other)


def test_stochastic_gate_train_expectation_is_deep_feature():
    """E[train output] = deep, as in the reference (its comment: "at train time: E[x] = x1").

    Note this is NOT the evaluation mix ``0.7 deep + 0.3 shallow``: they differ by
    ``0.3 (shallow - deep)``. The reference has this train/eval mismatch; slr_jax reproduces it
    (the ``stochastic_gate`` docstring claiming the expectation equals the eval mix is wrong).
    """
    rng = np.random.default_rng(0)
    deep_np, shallow_np = rng.normal(size=(2, 256)).astype(np.float32)
    deep, shallow = jnp.asarray(deep_np), jnp.asarray(shallow_np)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: stochastic_gate(deep, shallow, train=True, rng=k))(keys)
    mean = np.asarray(jnp.mean(draws, axis=0), np.float64)
    # Per element the draw is two-point: rescaled deep w.p. 0.7, shallow w.p. 0.3.
    rescaled = (deep_np - 0.3 * shallow_np) / 0.7
    std_err = np.abs(rescaled - shallow_np) * np.sqrt(0.21 / len(keys)) + 1e-12
    z_deep = (mean - deep_np) / std_err
    assert np.max(np.abs(z_deep)) < 5, f"E[train] != deep, max |z| = {np.abs(z_deep).max():.2f}"
    eval_mix = np.asarray(stochastic_gate(deep, shallow, train=False, rng=None))
    z_eval = (mean - eval_mix) / std_err
    assert np.median(np.abs(z_eval)) > 10, "train mean unexpectedly equals the eval mix"


def test_mask_pooled_scores_and_focal_penalty_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 6, 5)).astype(np.float32)
    masks = np.asarray(jax.nn.softmax(jnp.asarray(2 * logits), axis=-1))
    ours = mask_pooled_scores(jnp.asarray(logits), jnp.asarray(masks))
    x, m = to_torch(logits), to_torch(masks)
    m_mean = m.mean(dim=(2, 3))
    ref_penalty = (1 - m_mean) ** 3 * torch.log(0.01 + m_mean)
    ref = (x * m).sum(dim=(2, 3)) / (1 + m.sum(dim=(2, 3))) + ref_penalty
    assert ours.shape == (3, 4)
    assert_close(ours, ref[:, 1:].numpy(), what="mask_pooled_scores")
    assert_close(focal_penalty(jnp.asarray(m_mean.numpy())), ref_penalty.numpy(), what="focal")


def test_with_background_kinds():
    fg = jnp.asarray(_nhwc((2, 3, 4, 5)))
    const = with_background(fg, "constant")
    np.testing.assert_array_equal(const[..., 0], 1.0)
    np.testing.assert_array_equal(const[..., 1:], fg)
    omm = with_background(fg, "one_minus_max")
    np.testing.assert_allclose(omm[..., 0], 1 - np.max(np.asarray(fg), axis=-1), rtol=1e-6)
    assert with_background(fg, "none") is fg
    with pytest.raises(ValueError, match="unknown background kind"):
        with_background(fg, "zeros")


# -------------------------------------------------------------------------------- SLRNet
IMAGE_HW = (49, 41)  # odd, non-square
STRIDE4_HW = (13, 11)  # ceil(49 / 4), ceil(41 / 4)
VARIANT_CLASSES = {"wsss": 21, "semi": 21, "semi_wo_cls": 21, "coco": 81}


@functools.cache
def small_model_and_variables(variant: str = "wsss", seed: int = 0):
    model = SLRNet(variant=variant, num_classes=VARIANT_CLASSES[variant], width=WIDTH)
    return model, fill_random(variable_shapes(model), seed)


def _images(batch: int = 2, hw=IMAGE_HW, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *hw, 3)), jnp.float32)


def expected_output_shapes(mode: str, b: int, c: int, d: int) -> dict:
    if mode in ("test", "test_two_view"):
        return {"cls": (b, c - 1), "masks": (b, *IMAGE_HW, c)}
    maps = (b, *STRIDE4_HW, c)
    shapes = {k: maps for k in ("logits", "masks", "logits2", "masks2", "aux_logits", "aux_masks")}
    shapes.update({k: (b, c - 1) for k in ("cls", "cls2", "cls_aux")})
    shapes.update({"codes": maps, "codes2": maps, "dictionary": (b, c, d)})
    return shapes


@pytest.mark.parametrize("variant", sorted(VARIANT_CLASSES))
@pytest.mark.parametrize("mode", MODES)
def test_slrnet_output_keys_and_shapes(variant, mode):
    model, variables = small_model_and_variables(variant)
    c = VARIANT_CLASSES[variant]
    out = jax.eval_shape(lambda v, x: model.apply(v, x, mode=mode), variables, _images())
    got = {k: tuple(v.shape) for k, v in out.items()}
    assert got == expected_output_shapes(mode, 2, c, 16)
    assert all(v.dtype == jnp.float32 for v in out.values())


@functools.cache
def _apply_fn(variant: str, mode: str, train: bool):
    """``f(variables, images)``, or ``f(variables, images, key) -> (outputs, updates)`` in
    training. One function object per case, so every ``jax.jit`` of it shares one compilation."""
    model, _ = small_model_and_variables(variant)
    if not train:
        return lambda v, x: model.apply(v, x, mode=mode)
    return lambda v, x, key: model.apply(
        v, x, mode=mode, train=True, rngs={"dropout": key, "gate": key}, mutable=["batch_stats"]
    )


@functools.cache
def _jitted_apply(variant: str, mode: str, train: bool):
    return jax.jit(_apply_fn(variant, mode, train))


def test_slrnet_train_mode_outputs_are_consistent_and_deterministic():
    _, variables = small_model_and_variables("wsss")
    apply = _jitted_apply("wsss", "train", False)
    out = jax.tree_util.tree_map(np.asarray, apply(variables, _images()))
    again = jax.tree_util.tree_map(np.asarray, apply(variables, _images()))
    for k in out:
        np.testing.assert_array_equal(
            out[k], again[k], err_msg=f"train=False not deterministic: {k}"
        )
        assert np.all(np.isfinite(out[k])), k
    for name in ("masks", "masks2", "aux_masks"):
        np.testing.assert_allclose(out[name].sum(-1), 1.0, atol=1e-5, err_msg=name)
    # Main head: constant background logit 1; aux head: 1 - max(foreground).
    np.testing.assert_array_equal(out["logits"][..., 0], 1.0)
    np.testing.assert_allclose(
        out["aux_logits"][..., 0], 1 - out["aux_logits"][..., 1:].max(-1), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(out["codes"].sum(-1), 1.0, atol=1e-5)  # softmax over atoms
    np.testing.assert_allclose(np.linalg.norm(out["dictionary"], axis=-1), 1.0, atol=1e-4)
    expected_cls = mask_pooled_scores(jnp.asarray(out["logits"]), jnp.asarray(out["masks"]))
    np.testing.assert_allclose(out["cls"], expected_cls, rtol=1e-5, atol=1e-6)


def test_semi_wo_cls_scores_are_ones_and_heads_predict_background():
    model, variables = small_model_and_variables("semi_wo_cls")
    assert variables["params"]["last_conv"]["8"]["kernel"].shape[-1] == 21
    assert variables["params"]["aux_head"]["4"]["kernel"].shape[-1] == 21
    wsss_vars = small_model_and_variables("wsss")[1]
    assert wsss_vars["params"]["last_conv"]["8"]["kernel"].shape[-1] == 20
    logits = jnp.asarray(_nhwc((2, 5, 4, 21)))
    scores = model.apply({}, logits, jax.nn.softmax(logits), method=SLRNet.class_scores)
    np.testing.assert_array_equal(scores, np.ones((2, 20), np.float32))


def test_slrnet_train_true_updates_only_head_batch_stats_and_uses_dropout():
    _, variables = small_model_and_variables("wsss")
    apply = _jitted_apply("wsss", "train", True)
    images = _images()
    out1, upd1 = apply(variables, images, jax.random.key(1))
    out1_again, _ = apply(variables, images, jax.random.key(1))
    out2, _ = apply(variables, images, jax.random.key(2))
    for k in ("logits", "masks", "aux_logits", "codes"):
        np.testing.assert_array_equal(out1[k], out1_again[k], err_msg=f"same key differs: {k}")
        assert np.max(np.abs(np.asarray(out1[k]) - np.asarray(out2[k]))) > 1e-4, (
            f"{k}: two dropout keys gave the same output"
        )
    old, new = variables["batch_stats"], upd1["batch_stats"]
    assert set(new) == set(old)
    for top in old:
        for path, value in traverse_util.flatten_dict(old[top]).items():
            changed = not np.array_equal(value, traverse_util.flatten_dict(new[top])[path])
            where = "/".join((top, *path))
            if top in ("backbone", "aspp"):
                assert not changed, f"{where}: running statistics must stay frozen"
            else:
                assert changed, f"{where}: head BatchNorm did not update in training"
    assert {"shallow_mask", "fc8_skip", "fc8_x", "last_conv", "aux_head"} <= set(old)


# Every forward mode, deterministic and (for 'train') with dropout, gate and BN updates.
JIT_CASES = [(mode, False) for mode in MODES] + [("train", True)]
JIT_KEY = 11
JIT_RTOL = 1e-5  # logits, scores, BatchNorm statistics: relative to the output's max
# Softmax-derived outputs (bounded by 1): see JitTest.
JIT_PROB_KEYS = ("masks", "masks2", "aux_masks", "codes", "codes2", "dictionary")
JIT_PROB_TOL = 5e-3


def _jit_case_args(train: bool) -> tuple:
    """Arguments after ``variables``: the images shared with the other SLRNet tests (so their
    compilations are reused), plus the dropout/gate key in training."""
    return (_images(),) + ((jax.random.key(JIT_KEY),) if train else ())


@functools.cache
def _eager_outputs(mode: str, train: bool):
    """Un-jitted forward of a case, as NumPy (cached: the first eager pass is slow)."""
    _, variables = small_model_and_variables("wsss")
    out = _apply_fn("wsss", mode, train)(variables, *_jit_case_args(train))
    return jax.tree_util.tree_map(np.asarray, out)


class JitTest(chex.TestCase):
    """jit and eager agree for every forward mode, up to float32 reassociation.

    Each variant is checked against the other transformation: the jitted run against a cached
    eager run, the eager run against the jitted one. Logit-level outputs agree to ~1e-6 of
    their max. Random weights with random running statistics give eval-mode logits in the
    thousands, so that ~1e-6 relative is ~1e-3 absolute at the softmax input, and the masks
    and codes move by up to ~1.5e-3 (measured); in training (batch statistics) they agree to
    ~3e-6. A real jit/eager divergence (Python-side branching on values, RNG plumbing) moves
    them by O(0.1).
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*JIT_CASES)
    def test_forward_jit_and_eager_agree(self, mode, train):
        _, variables = small_model_and_variables("wsss")
        out = self.variant(_apply_fn("wsss", mode, train))(variables, *_jit_case_args(train))
        if self.variant.type == chex.ChexVariantType.WITH_JIT:
            other = _eager_outputs(mode, train)
        else:
            other = _jitted_apply("wsss", mode, train)(variables, *_jit_case_args(train))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(out)
        assert treedef == jax.tree_util.tree_structure(other)
        for (path, ours), theirs in zip(leaves, jax.tree_util.tree_leaves(other)):
            name = f"{mode} train={train} {jax.tree_util.keystr(path)} ({self.variant.type.name})"
            is_prob = getattr(path[-1], "key", None) in JIT_PROB_KEYS
            assert_close(ours, theirs, rtol=JIT_PROB_TOL if is_prob else JIT_RTOL, what=name)


@pytest.mark.parametrize(
    "size, dilation, stride", [(5, 1, 1), (8, 2, 1), (8, 12, 1), (13, 5, 2), (6, 36, 1), (1, 1, 1)]
)
def test_conv_leaves_out_only_taps_that_read_padding(size, dilation, stride):
    """``layers.conv`` (which drops the kernel rows/columns that read only padding) gives
    lax's full-kernel conv's outputs and both gradients, and really drops them when the
    dilation reaches past the input (the ASPP on a small grid: the centre tap alone)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size + 3, 4)), jnp.float32)
    layer = layers.conv(3, 3, stride=stride, dilation=dilation, use_bias=True)
    params = layer.init(jax.random.key(0), x)["params"]
    pad = ((dilation, dilation),) * 2
    dn = ("NHWC", "HWIO", "NHWC")

    def full(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["kernel"], (stride, stride), pad, rhs_dilation=(dilation,) * 2,
            dimension_numbers=dn, precision="highest",
        )  # fmt: skip
        return y + p["bias"]

    def ours(p, x):
        return layer.apply({"params": p}, x)

    g = jnp.asarray(np.random.default_rng(1).normal(size=full(params, x).shape), jnp.float32)
    for f in (full, ours):
        assert f(params, x).shape == g.shape
    want = jax.value_and_grad(lambda p, x: jnp.vdot(full(p, x), g), argnums=(0, 1))(params, x)
    got = jax.value_and_grad(lambda p, x: jnp.vdot(ours(p, x), g), argnums=(0, 1))(params, x)
    for a, b, what in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                          ("loss", "bias grad", "kernel grad", "input grad")):  # fmt: skip
        assert_close(a, b, rtol=1e-5, what=what)
    kernels = [
        e.invars[1].aval.shape[:2]
        for e in jax.make_jaxpr(ours)(params, x).eqns
        if e.primitive.name == "conv_general_dilated"
    ]
    # Along an axis no shorter than the dilation, every tap reads some input.
    assert kernels == [tuple(1 if dilation >= n else 3 for n in (size, size + 3))], kernels


def test_remat_gives_same_outputs_and_gradients():
    """remat only changes what is stored for the backward pass; dropout keys are replayed."""
    x = _images(1, (33, 33), seed=4)
    variables = fill_random(
        jax.eval_shape(lambda: WideResNet38(WIDTH).init(jax.random.key(0), x, False)), seed=2
    )

    def run(remat: bool):
        model = WideResNet38(WIDTH, remat=remat)

        def loss(params):
            feats = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, True,
                rngs={"dropout": jax.random.key(9)},
            )  # fmt: skip
            return jnp.mean(feats["conv6"] ** 2) + jnp.mean(feats["conv3"]), feats

        (_, feats), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return feats, g

    outs, grads = zip(*(run(remat) for remat in (False, True)))
    for k in ("conv3", "conv6"):
        assert_close(outs[1][k], outs[0][k], rtol=1e-6, what=f"remat {k}")
    flat0 = traverse_util.flatten_dict(grads[0])
    flat1 = traverse_util.flatten_dict(grads[1])
    assert flat0.keys() == flat1.keys()
    for path in flat0:
        assert_close(flat1[path], flat0[path], rtol=1e-5, what=f"remat grad {'/'.join(path)}")
    assert float(np.max(np.abs(flat0[("b7", "conv_branch2b2", "kernel")]))) > 0


def test_slrnet_remat_flag_reaches_backbone():
    model = SLRNet(width=WIDTH, remat=True)
    variables = small_model_and_variables("wsss")[1]
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, mode="test"))(variables, _images(1))
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_bfloat16_model_close_to_float32():
    """bfloat16 activations track float32 (loose bounds: 8 mantissa bits through ~40 layers).

    Not max |a-b| of the masks: these random weights give logits in the thousands, where
    bfloat16's spacing is 8-16, so the few near-tied pixels flip their softmax completely (max
    |a-b| ~0.5 here). Class scores (relative L2), mean mask error and argmax agreement are
    stable measures.
    """
    _, variables = small_model_and_variables("wsss")
    images = _images(seed=5)
    model16 = build_model(model_config(width=WIDTH, dtype="bfloat16"))
    out16 = jax.jit(lambda v, x: model16.apply(v, x, mode="test"))(variables, images)
    out32 = _jitted_apply("wsss", "test", False)(variables, images)
    assert out16["masks"].dtype == jnp.float32 and out16["cls"].dtype == jnp.float32
    cls16, cls32 = np.asarray(out16["cls"], np.float64), np.asarray(out32["cls"], np.float64)
    cls_rel = np.linalg.norm(cls16 - cls32) / np.linalg.norm(cls32)
    masks16, masks32 = np.asarray(out16["masks"]), np.asarray(out32["masks"])
    mean_err = float(np.mean(np.abs(masks16 - masks32)))
    agree = float(np.mean(masks16.argmax(-1) == masks32.argmax(-1)))
    assert cls_rel < 0.1, f"bfloat16 class scores: relative L2 error {cls_rel:.3g}"
    assert mean_err < 0.01, f"bfloat16 masks: mean |a-b| = {mean_err:.3g}"
    assert agree > 0.95, f"bfloat16 masks: argmax agrees on {agree:.1%} of pixels"
    assert not np.array_equal(masks16, masks32), "bfloat16 not actually used"


def test_build_model_from_config_dict():
    cfg = model_config(
        variant="coco", num_classes=81, width=WIDTH, num_iters=3, temperature=0.5, remat=True
    )
    model = build_model(cfg)
    assert (model.variant, model.num_classes, model.num_iters) == ("coco", 81, 3)
    assert model.width == WIDTH
    assert (model.temperature, model.dtype, model.remat) == (0.5, jnp.float32, True)


def test_without_low_rank_module_features_pass_through():
    """``use_low_rank=False`` (the ablation): no module parameters, the heads see the decoder
    features themselves, codes are zeros (code-consistency term 0), dictionary = its init."""
    from slr_jax.losses import code_consistency
    from slr_jax.ops import resize_bilinear_align_corners

    full, variables = small_model_and_variables("wsss")
    ablated = SLRNet(variant="wsss", num_classes=21, width=WIDTH, use_low_rank=False)
    shapes = variable_shapes(ablated)
    assert "factorization_reconstruction" not in shapes["params"]
    params = {k: v for k, v in variables["params"].items() if k != "factorization_reconstruction"}
    assert set(params) == set(shapes["params"])
    trimmed = {"params": params, "batch_stats": variables["batch_stats"]}
    images = _images()

    def masks_without_module(m, x):  # the full model's own pieces, skipping the module
        feats, shallow = m.decoder_features(x, False)
        return m.segmentation_forward(feats, shallow, False)[1]

    def dictionary_init(m, x):
        feats, _ = m.decoder_features(x, False)
        return initial_dictionary(feats, m.aux_forward(feats, False)[0])

    out = ablated.apply(trimmed, images, mode="test")
    expected = resize_bilinear_align_corners(
        full.apply(variables, images, method=masks_without_module), IMAGE_HW
    )
    np.testing.assert_allclose(out["masks"], expected, atol=1e-6)
    assert float(jnp.max(jnp.abs(out["masks"] - full.apply(variables, images)["masks"]))) > 1e-4

    train = ablated.apply(trimmed, images, mode="train")
    assert not np.any(np.asarray(train["codes"])) and not np.any(np.asarray(train["codes2"]))
    assert float(code_consistency(train["codes"], train["codes2"])) == 0.0
    np.testing.assert_allclose(
        train["dictionary"], full.apply(variables, images, method=dictionary_init), atol=1e-6
    )
    assert build_model(model_config(width=WIDTH, use_low_rank=False)).use_low_rank is False


def test_clear_errors_for_bad_configuration_and_input():
    with pytest.raises(ValueError, match=r"model.dtype must be one of \('float32', 'bfloat16'"):
        build_model(model_config(dtype="float16"))
    model, variables = small_model_and_variables("wsss")
    images = _images(1, (33, 33))
    bad_variant = SLRNet(variant="wss", width=WIDTH)
    with pytest.raises(ValueError, match="unknown model variant 'wss'"):
        jax.eval_shape(lambda v, x: bad_variant.apply(v, x), variables, images)
    with pytest.raises(ValueError, match="num_classes counts background"):
        jax.eval_shape(lambda v, x: SLRNet(num_classes=1).apply(v, x), variables, images)
    with pytest.raises(ValueError, match="unknown forward mode 'eval'"):
        jax.eval_shape(lambda v, x: model.apply(v, x, mode="eval"), variables, images)
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\) NHWC"):
        model.apply(variables, jnp.zeros((1, 3, 33, 33)))
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\) NHWC"):
        model.apply(variables, jnp.zeros((33, 33, 3)))


# ------------------------------------------------------------------------------ float64
def _float64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _torch64(x: np.ndarray):
    x = np.asarray(x, np.float64)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))


def test_float64_gci_training_matches_torch_float64():
    """With x64 on, a head block in training mode (batch statistics, unbiased running variance)
    agrees with PyTorch's float64 to ~1e-13: float32 rounding is the only gap left in float32."""
    shallow, deep = _nhwc((2, 9, 7, 16), 1), _nhwc((2, 9, 7, 16), 2)
    variables = random_variables(GCI(WIDTH), shallow, deep)
    weights = TorchWeights(variables)
    weights.sd = {k: v.double() for k, v in weights.sd.items()}
    ref = torch_gci(weights, _torch64(shallow), _torch64(deep), training=True)
    with jax.enable_x64(True):
        out, updates = GCI(WIDTH, dtype=jnp.float64).apply(
            _float64(variables), _float64(shallow), _float64(deep), True, mutable=["batch_stats"]
        )
        assert out.dtype == jnp.float64
        assert_close(out, from_torch(ref), 1e-12, "GCI train float64")
        new = _bn_leaves(updates["batch_stats"])
    for layer in ("fc_deep/1", "fc_skip/1", "fc_cls/1"):
        key = layer.replace("/", ".")
        for stat in ("mean", "var"):
            torch_stat = weights.sd[f"{key}.running_{stat}"].numpy()
            assert_close(new[f"{layer}/{stat}"], torch_stat, 1e-12, f"{layer} running {stat}")


def test_float64_factorization_matches_torch_float64_with_gradients():
    b, n, d, k = 2, 40, 16, 7
    rng = np.random.default_rng(3)
    x, dict_init = rng.normal(size=(b, n, d)), rng.normal(size=(b, k, d))
    probe = [rng.normal(size=s) for s in [(b, n, d), (b, k, n), (b, k, d)]]
    module = FactorizationReconstruction(3, 0.5, dtype=jnp.float64)
    variables = random_variables(FactorizationReconstruction(3, 0.5), x, dict_init, seed=3)
    sd = {
        k_: torch.from_numpy(np.array(v, np.float64)).requires_grad_(True)
        for k_, v in flax_to_torch(variables).items()
    }
    xt = torch.from_numpy(x).requires_grad_(True)
    ref_outs = torch_factorization(xt, torch.from_numpy(dict_init), sd, num_iters=3,
                                   temperature=0.5)  # fmt: skip
    sum((o * torch.from_numpy(p)).sum() for o, p in zip(ref_outs, probe)).backward()
    with jax.enable_x64(True):

        def objective(params, x_in):
            outs = module.apply({"params": params}, x_in, jnp.asarray(dict_init))
            return sum(jnp.sum(o * p) for o, p in zip(outs, probe)), outs

        (_, outs), (grad_params, grad_x) = jax.value_and_grad(objective, (0, 1), has_aux=True)(
            _float64(variables["params"]), jnp.asarray(x)
        )
        assert all(o.dtype == jnp.float64 for o in outs)
    for name, ours, ref in zip(("output", "codes", "dictionary"), outs, ref_outs):
        assert_close(ours, ref.detach().numpy(), 1e-12, f"{name} float64")
    assert_close(grad_x, xt.grad.numpy(), 1e-12, "d/dx float64")
    for layer in ("transform1", "transform2"):
        got = grad_params[layer]["kernel"].T
        assert_close(got, sd[f"{layer}.weight"].grad.numpy(), 1e-12, f"d/d{layer}.W float64")


def test_float64_slrnet_gradient_matches_finite_differences():
    """The whole training-mode network in float64: every output float64, and the gradient of
    a probe of its outputs agrees with a central finite difference along a random direction
    (float32 could not resolve this: its step error alone is ~1e-3). Without the low-rank
    module, whose initial dictionary is detached on purpose (so its gradient is not the
    derivative); that module is pinned against PyTorch float64 above."""
    model, variables = small_model_and_variables("semi_wo_cls")
    model = model.clone(dtype=jnp.float64, use_low_rank=False)
    variables = {
        c: {k: v for k, v in tree.items() if k != "factorization_reconstruction"}
        for c, tree in variables.items()
    }
    images = np.random.default_rng(5).normal(size=(1, 33, 29, 3))
    with jax.enable_x64(True):
        params = _float64(variables["params"])
        rest = {"batch_stats": _float64(variables["batch_stats"])}
        key = jax.random.key(0)

        def probe(p):
            out, _ = model.apply(
                {"params": p, **rest}, jnp.asarray(images), mode="train", train=True,
                rngs={"dropout": key}, mutable=["batch_stats"],
            )  # fmt: skip
            assert all(v.dtype == jnp.float64 for v in out.values())
            return jnp.sum(out["masks"] * out["masks2"]) + jnp.sum(out["cls"] ** 2)

        value, grads = jax.jit(jax.value_and_grad(probe))(params)
        leaves, tree = jax.tree_util.tree_flatten(params)
        rng = np.random.default_rng(6)
        direction = tree.unflatten([rng.normal(size=leaf.shape) for leaf in leaves])
        along = lambda t: jax.tree_util.tree_map(lambda a, v: a + t * v, params, direction)
        # A ReLU kink lies within 1e-6 along this direction with these masks (1e-5: 1e-2 off,
        # 1e-6: 6e-5, 1e-7: 2e-10); 1e-7 stays on one side, float64 still resolves it.
        eps = 1e-7
        f = jax.jit(probe)
        numeric = (float(f(along(eps))) - float(f(along(-eps)))) / (2 * eps)
        analytic = sum(
            float(jnp.vdot(g, v))
            for g, v in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
        )
    assert np.isfinite(float(value))
    rel = abs(numeric - analytic) / max(abs(analytic), 1e-12)
    assert rel < 1e-6, f"directional derivative: analytic {analytic:.12g}, numeric {numeric:.12g}"


def test_float64_needs_x64():
    with pytest.raises(ValueError, match="JAX_ENABLE_X64=1"):
        build_model(model_config(dtype="float64"))
