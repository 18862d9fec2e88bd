"""Stage-2 DeepLabV3+ and its torchvision ResNet backbone, pinned against PyTorch.

- ``ResNet`` against torchvision's own ``resnet101`` (random weights; every BatchNorm's
  statistics and affine parameters randomised so none is the identity; ``eval()``), through
  ``slr_jax.convert.convert_torchvision_resnet`` on a NumPy state dict; and the dilated
  variants against torchvision's ``replace_stride_with_dilation``.
- The DeepLabV3+ head against a PyTorch re-expression below (``TorchASPP``/``TorchDecoder``,
  written from the published module, names as in jfzhang95/pytorch-deeplab-xception): the whole
  network at full width on a torchvision ResNet-50 in evaluation, and the head at a tiny width
  in training (batch statistics and the running-statistics update).
- Shapes, a few dozen optax steps that must learn, conversion errors and the CLI.

Tolerances (relative: max |a-b| / max |reference|) are float32 ones: both sides accumulate
convolutions of up to 3*3*512 = 4608 products in float32 in different orders, so each layer
adds a relative rounding difference of order sqrt(4608) * 6e-8 ~ 4e-6 at worst, and the errors
of 100 layers add up like a random walk (measured ~1e-6 for ResNet-101). 2e-5 leaves a margin of
about ten; any wrong padding, dilation, stride, momentum or BatchNorm term is O(1e-2..1).
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from numerics import assert_close

from slr_jax import convert
from slr_jax.checkpoint import CheckpointError, load_variables
from slr_jax.models import variable_shapes
from slr_jax.models.deeplab import (
    ASPP_RATES,
    Decoder,
    DeepLabASPP,
    DeepLabV3Plus,
    build_deeplab,
    deeplab_model_config,
    deeplab_variable_shapes,
    with_backbone,
)
from slr_jax.models.resnet import (
    RESNET_LAYERS,
    ResNet,
    dilation_for_output_stride,
    resnet_variable_shapes,
)

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

FLOAT32_RTOL = 2e-5  # see the module docstring
TINY = 1 / 16


@pytest.fixture(scope="module")
def torchvision():
    """torchvision's pure-Python models (``torchvision==0.28.0`` in requirements-test.txt).

    The wheel installed beside the CPU torch is a CUDA build: importing it registers meta
    kernels for its C++ ops (``torchvision._meta_registrations``), which fails because that
    extension cannot load here. The models below need none of those ops, so an empty module
    stands in for that one before the import. This is the only place torchvision is imported.
    """
    sys.modules.setdefault(
        "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
    )
    try:
        import torchvision
    except Exception as err:  # any import problem means "no usable torchvision here"
        pytest.skip(f"torchvision does not import: {err}")
    return torchvision


# ----------------------------------------------------------------------------------- helpers


def randomise_batchnorms(module, seed: int) -> None:
    """Random running statistics and affine parameters; ``eval()``.

    The last BatchNorm of each residual branch (``bn3``) gets small scales so activations stay
    of order 1..100 through 33 blocks instead of growing by ~2x per block.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                low, span = (0.05, 0.2) if name.endswith("bn3") else (0.5, 1.0)
                m.weight.copy_(low + span * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    module.eval()


def numpy_state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torchvision_features(net, x: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision ResNet's layer1..layer4 outputs (NHWC) for ``x`` (NHWC)."""
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(nchw(x)))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            y = getattr(net, name)(y)
            out[name] = nhwc(y)
    return out


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


# ----------------------------------------------------------------------- PyTorch DeepLabV3+
class TorchASPPModule(nn.Module):
    def __init__(self, cin, cout, kernel, dilation):
        super().__init__()
        pad = 0 if kernel == 1 else dilation
        self.atrous_conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.atrous_conv(x)))


class TorchASPP(nn.Module):
    """DeepLabV3+ ASPP as published (256 channels there; ``c`` here)."""

    def __init__(self, cin, c, rates, dropout=0.5):
        super().__init__()
        self.aspp1 = TorchASPPModule(cin, c, 1, 1)
        self.aspp2, self.aspp3, self.aspp4 = (TorchASPPModule(cin, c, 3, r) for r in rates)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c),
            nn.ReLU(),
        )  # fmt: skip
        self.conv1 = nn.Conv2d(5 * c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
        x5 = self.global_avg_pool(x)
        x5 = F.interpolate(x5, size=x4.shape[2:], mode="bilinear", align_corners=True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.dropout(F.relu(self.bn1(self.conv1(x))))


class TorchDecoder(nn.Module):
    """DeepLabV3+ decoder as published (48 and 256 channels there; ``c_low`` and ``c`` here)."""

    def __init__(self, num_classes, c_in_low, c_low, c, dropout=(0.5, 0.1)):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in_low, c_low, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_low)
        self.last_conv = nn.Sequential(
            nn.Conv2d(c + c_low, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Dropout(dropout[0]),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Dropout(dropout[1]),
            nn.Conv2d(c, num_classes, 1),
        )  # fmt: skip

    def forward(self, x, low_level):
        low_level = F.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((x, low_level), dim=1))


class TorchDeepLab(nn.Module):
    def __init__(self, backbone, aspp, decoder):
        super().__init__()
        self.backbone, self.aspp, self.decoder = backbone, aspp, decoder

    def forward(self, x):
        b = self.backbone
        y = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(y)
        y = b.layer4(b.layer3(b.layer2(low)))
        y = self.decoder(self.aspp(y), low)
        return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=True)


def converted(flax_module, torch_module, *inputs, **kwargs) -> dict:
    """``torch_module``'s state dict through ``torch_to_flax`` into ``flax_module``'s layout."""
    shapes = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *inputs, **kwargs))
    return convert.torch_to_flax(numpy_state_dict(torch_module), shapes)


# ------------------------------------------------------------------------ ResNet parity
@pytest.fixture(scope="module")
def resnet101_torch(torchvision):
    torch.manual_seed(0)
    net = torchvision.models.resnet101()
    randomise_batchnorms(net, 1)
    return net


def test_resnet101_matches_torchvision(resnet101_torch):
    """Full width 1.0, every feature level, weights converted from a NumPy state dict."""
    sd = numpy_state_dict(resnet101_torch)
    assert "fc.weight" in sd and "layer1.0.bn1.num_batches_tracked" in sd
    variables = convert.convert_torchvision_resnet(sd, depth=101)
    x = image((1, 64, 64, 3))
    ours = jax.jit(ResNet(RESNET_LAYERS[101]).apply)(variables, x)
    ref = torchvision_features(resnet101_torch, x)
    assert ours["layer1"].shape == (1, 16, 16, 256) and ours["layer4"].shape == (1, 2, 2, 2048)
    for name in ("layer1", "layer4"):
        assert_close(ours[name], ref[name], FLOAT32_RTOL, f"resnet101 {name}")


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_resnet_matches_torchvision(torchvision, output_stride):
    """torchvision's ``replace_stride_with_dilation`` at full width on 2 blocks per stage (the
    first block of a dilated stage keeps the previous dilation, the second takes the new one;
    ResNet-101 differs only in how often the second kind repeats)."""
    flags = dilation_for_output_stride(output_stride)
    torch.manual_seed(output_stride)
    net = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [2, 2, 2, 2], replace_stride_with_dilation=flags
    )
    randomise_batchnorms(net, output_stride)
    sd = {k: v for k, v in numpy_state_dict(net).items() if not k.startswith("fc.")}
    variables = convert.torch_to_flax(sd, resnet_variable_shapes((2, 2, 2, 2)))
    x = image((1, 64, 64, 3), seed=output_stride)
    ours = jax.jit(ResNet((2, 2, 2, 2), replace_stride_with_dilation=flags).apply)(variables, x)
    ref = torchvision_features(net, x)
    size = 64 // output_stride
    assert ours["layer4"].shape == (1, size, size, 2048)
    for name in ("layer3", "layer4"):
        assert_close(ours[name], ref[name], FLOAT32_RTOL, f"OS{output_stride} {name}")


# ---------------------------------------------------------------------- DeepLabV3+ parity
def test_deeplab_matches_pytorch_at_full_width(torchvision):
    """Evaluation, output stride 16: a torchvision ResNet (one block per stage, 2048 channels)
    and the published head at its 256/48 channels. The module names make the whole PyTorch
    state dict convert mechanically with ``torch_to_flax``."""
    torch.manual_seed(3)
    resnet = torchvision.models.resnet
    backbone = resnet.ResNet(
        resnet.Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[False, False, True]
    )
    net = TorchDeepLab(
        backbone, TorchASPP(2048, 256, ASPP_RATES[16]), TorchDecoder(7, 256, 48, 256)
    )
    randomise_batchnorms(net, 4)
    model = DeepLabV3Plus(7, (1, 1, 1, 1), output_stride=16)
    sd = {k: v for k, v in numpy_state_dict(net).items() if not k.startswith("backbone.fc.")}
    variables = convert.torch_to_flax(sd, deeplab_variable_shapes(model))
    x = image((1, 65, 49, 3), seed=5)  # 65 px: stride-16 maps of 5x4, the rate-6 taps read pixels
    outputs = jax.jit(model.apply)(variables, x)
    with torch.no_grad():
        ref = nhwc(net(nchw(x)))
    assert_close(outputs["logits"], ref, FLOAT32_RTOL, "DeepLabV3+ logits (full width)")
    np.testing.assert_allclose(outputs["masks"], jax.nn.softmax(ref, axis=-1), atol=1e-5)


def test_deeplab_head_training_mode_matches_pytorch():
    """Head at width 1/16 in training: batch statistics, running averages with PyTorch's
    momentum 0.1 (dropout rates 0 so both sides are deterministic)."""
    torch.manual_seed(6)
    c, c_low, c_in_low, num_classes = 16, 3, 24, 5
    aspp = TorchASPP(40, c, ASPP_RATES[8], dropout=0.0)
    decoder = TorchDecoder(num_classes, c_in_low, c_low, c, dropout=(0.0, 0.0))
    for module in (aspp, decoder):
        randomise_batchnorms(module, 7)
        module.train()
    x, low = image((2, 9, 11, 40), 8), image((2, 33, 41, c_in_low), 9)
    ours_aspp, ours_decoder = (
        DeepLabASPP(ASPP_RATES[8], TINY, 0.0),
        Decoder(num_classes, TINY, (0.0, 0.0)),
    )
    aspp_vars = converted(ours_aspp, aspp, x)
    y, aspp_new = ours_aspp.apply(aspp_vars, x, train=True, mutable=["batch_stats"])
    decoder_vars = converted(ours_decoder, decoder, np.asarray(y), low)
    logits, decoder_new = ours_decoder.apply(
        decoder_vars, y, low, train=True, mutable=["batch_stats"]
    )
    old = {"aspp": numpy_state_dict(aspp), "decoder": numpy_state_dict(decoder)}
    ref = decoder(aspp(nchw(x)), nchw(low))
    assert_close(logits, nhwc(ref), FLOAT32_RTOL, "head logits (training)")
    # Running means and (unbiased) variances as PyTorch keeps them, the image-pooling
    # BatchNorm (2 values per channel, where biased and unbiased differ by 2x) included.
    for part, new, module in (("aspp", aspp_new, aspp), ("decoder", decoder_new, decoder)):
        torch_sd = numpy_state_dict(module)
        for path, value in flat(new["batch_stats"]).items():
            key, stat = path.replace("/", ".").rsplit(".", 1)
            torch_stat = torch_sd[f"{key}.running_{stat}"]
            assert_close(value, torch_stat, 1e-5, f"{part} {key} running {stat}")
            moved = np.max(np.abs(torch_stat - old[part][f"{key}.running_{stat}"]))
            assert moved > 1e-5, f"{part} {key} running {stat} not updated"


# ------------------------------------------------------------------------ shapes and modes
@functools.cache
def tiny_deeplab(num_classes: int = 3) -> tuple[DeepLabV3Plus, dict]:
    """A 4-block DeepLab at width 1/16 with fresh-init-like variables drawn in NumPy (He-normal
    kernels, BatchNorm identity; ``init_variables`` would compile the initialisers, ~8 s)."""
    model = DeepLabV3Plus(num_classes, (1, 1, 1, 1), 16, width=TINY)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return model, jax.tree_util.tree_map_with_path(fill, deeplab_variable_shapes(model))


# Dropout keys of the cheap ``rbg`` generator: threefry adds seconds of XLA:CPU compilation.
def dropout_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def test_deeplab_shapes_in_training_and_evaluation():
    model, variables = tiny_deeplab()
    x = image((2, 37, 45, 3), 10)
    # ``mode='test'`` as SLRNet's inference passes it (``infer.multiscale_predict``).
    out = jax.jit(functools.partial(model.apply, mode="test"))(variables, x)
    assert out["logits"].shape == out["masks"].shape == (2, 37, 45, 3)
    assert out["cls"].shape == (2, 2) and np.all(np.asarray(out["cls"]) == 1)
    assert np.all(np.isfinite(out["logits"]))
    np.testing.assert_allclose(np.sum(out["masks"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["masks"], jax.nn.softmax(out["logits"]), rtol=1e-6)
    # Training mode, traced only (the learning test below runs it): same outputs, updated
    # statistics for every BatchNorm, dropout from the 'dropout' stream.
    train = lambda v, x, k: model.apply(
        v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
    )
    shapes, updates = jax.eval_shape(train, variables, x, dropout_key(0))
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in out.items()}
    assert flat(updates["batch_stats"]).keys() == flat(variables["batch_stats"]).keys()
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables, x)  # fmt: skip
    with pytest.raises(ValueError, match="unknown forward mode"):
        jax.eval_shape(lambda v, x: model.apply(v, x, mode="test_two_view"), variables, x)


def test_output_stride_dtype_remat_and_config():
    """Structure only (``jax.eval_shape``): nothing is computed."""
    x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
    for os_, size in ((16, 5), (8, 9)):
        model = ResNet((1, 1, 1, 1), dilation_for_output_stride(os_), width=TINY)
        feats = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.key(0), x)[0], x)
        assert feats["layer1"].shape == (1, 17, 17, 16) and feats["layer4"].shape[1] == size
    cfg = deeplab_model_config(width=TINY, dtype="bfloat16", output_stride=8, num_classes=4)
    model = build_deeplab(cfg)
    assert model.layers == RESNET_LAYERS[101] and model.output_stride == 8
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    assert out["logits"].dtype == jnp.float32 and out["logits"].shape == (1, 65, 65, 4)
    plain = build_deeplab(deeplab_model_config(width=TINY, depth=50))
    plain_shapes = deeplab_variable_shapes(plain)
    remat = build_deeplab(deeplab_model_config(width=TINY, depth=50, remat=True))
    assert (
        flat(deeplab_variable_shapes(remat)["params"]).keys() == flat(plain_shapes["params"]).keys()
    )
    # SLRNet's initialiser (``init_variables``, which passes mode='test') serves DeepLab too.
    assert jax.tree_util.tree_structure(variable_shapes(plain)) == jax.tree_util.tree_structure(
        plain_shapes
    )
    with pytest.raises(ValueError, match=r"lacks DeepLab keys \['output_stride'\]"):
        build_deeplab({k: v for k, v in cfg.items() if k != "output_stride"})
    with pytest.raises(ValueError, match="unknown DeepLab config keys"):
        deeplab_model_config(output_strid=8)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        jax.eval_shape(DeepLabV3Plus(output_stride=32).init, jax.random.key(0), x)


def synthetic_batch(num_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two 33x33 images: a noisy background with a bright square (class 1) and a dark disc
    (class 2) at different places; the labels follow the shapes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:33, :33]
    images, labels = rng.normal(0, 0.3, (2, 33, 33, 3)).astype(np.float32), np.zeros((2, 33, 33))
    for i, (sy, sx, cy, cx) in enumerate([(4, 6, 22, 20), (18, 16, 9, 10)]):
        square = (yy >= sy) & (yy < sy + 10) & (xx >= sx) & (xx < sx + 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        images[i][square] += 1.5
        images[i][disc] -= 1.5
        labels[i][square], labels[i][disc] = 1, 2
    return images, labels.astype(np.int32)


def test_tiny_deeplab_learns_a_synthetic_batch():
    """40 Adam steps of pixel-wise cross entropy on two images, training mode throughout
    (batch statistics, dropout): the loss must fall below half its start."""
    model, variables = tiny_deeplab()
    images, labels = synthetic_batch()
    tx = optax.adam(3e-3)

    def step(params, batch_stats, opt_state, key):
        def loss_fn(p):
            out, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True,
                rngs={"dropout": key}, mutable=["batch_stats"],
            )  # fmt: skip
            ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels)
            return jnp.mean(ce), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    # A tiny model run 40 times: XLA's backend optimisations would cost more compile time
    # (~40% of it) than they save; the arithmetic is the same.
    step = (
        jax.jit(step)
        .lower(*state, dropout_key(0))
        .compile({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    )
    losses = []
    for i in range(40):
        *state, loss = step(*state, dropout_key(i))
        losses.append(float(loss))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert np.all(np.isfinite(losses))
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f} over 40 steps: {losses}"
    stats_before, stats_after = flat(variables["batch_stats"]), flat(state[1])
    assert all(not np.allclose(stats_after[k], v) for k, v in stats_before.items())
    print(f"tiny DeepLab: loss {first:.3f} -> {last:.3f} (mean of the first / last 3 steps)")


# -------------------------------------------------------------------------------- conversion
def zero_state_dict(layers, width: float = 1.0) -> dict[str, np.ndarray]:
    """A torchvision-layout NumPy state dict of ``ResNet(layers, width)`` (zero-stride arrays:
    full size without memory; no torch involved)."""
    shapes = resnet_variable_shapes(layers, width)
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
    return convert.flax_to_torch(zeros)


def test_conversion_errors_name_the_keys():
    sd = zero_state_dict(RESNET_LAYERS[101])
    assert "layer1.0.downsample.0.weight" in sd and "layer3.22.bn3.running_var" in sd
    # torchvision's extras are dropped, not reported.
    sd["fc.weight"], sd["fc.bias"] = np.zeros((1000, 2048)), np.zeros(1000)
    sd["layer1.0.bn1.num_batches_tracked"] = np.zeros(())
    variables = convert.convert_torchvision_resnet(sd, depth=101)
    assert variables["params"]["layer1"]["0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert variables["batch_stats"]["layer4"]["2"]["bn3"]["var"].shape == (2048,)
    del sd["layer2.0.downsample.1.running_var"]
    sd["layer5.0.conv1.weight"] = np.zeros((8, 8, 1, 1))
    sd["conv1.weight"] = np.zeros((64, 3, 3, 3))
    with pytest.raises(CheckpointError) as err:
        convert.convert_torchvision_resnet(sd, depth=101)
    message = str(err.value)
    assert "torchvision resnet101" in message and "variant" not in message
    assert "missing (1): layer2.0.downsample.1.running_var" in message
    assert "unexpected (1): layer5.0.conv1.weight" in message
    assert "wrong shape (1): conv1.weight: file (3, 3, 3, 64) vs model (7, 7, 3, 64)" in message
    assert "fc." not in message and "num_batches_tracked" not in message
    # The stage-2 start: ImageNet weights into a DeepLab's backbone, nothing else touched.
    deeplab = deeplab_variable_shapes(build_deeplab(deeplab_model_config()))
    placed = with_backbone(deeplab, variables)
    assert placed["params"]["backbone"] is variables["params"]
    assert placed["batch_stats"]["backbone"] is variables["batch_stats"]
    assert placed["params"]["aspp"] is deeplab["params"]["aspp"]
    with pytest.raises(CheckpointError, match=r"backbone params does not fit(.|\n)*layer3"):
        with_backbone(deeplab, resnet_variable_shapes(RESNET_LAYERS[50]))
    # A ResNet-50 file read as ResNet-101: the missing blocks are named.
    # (255 = 17 blocks x 15 keys, listed in sorted order.)
    with pytest.raises(CheckpointError, match=r"missing \(255\): layer3\.10\.bn1\.bias"):
        convert.convert_torchvision_resnet(zero_state_dict(RESNET_LAYERS[50]), depth=101)


@pytest.fixture
def tiny_resnets(monkeypatch):
    """The CLI's ResNet settings at a tiny width, so that it runs in a second."""
    for name, setting in list(convert.TORCHVISION_RESNETS.items()):
        monkeypatch.setitem(convert.TORCHVISION_RESNETS, name, dict(setting, width=TINY))


def test_cli_writes_resnet101_variables(tmp_path, tiny_resnets, capsys):
    shapes = resnet_variable_shapes(RESNET_LAYERS[101], TINY)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes
    )
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in convert.flax_to_torch(variables).items()}  # fmt: skip
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    pth = tmp_path / "resnet101-63fe2227.pth"
    torch.save(sd, pth)
    out = tmp_path / "resnet101"
    rc = convert.main(["--torch", str(pth), "--out", str(out), "--setting", "resnet101"])
    assert rc == 0, capsys.readouterr().err
    assert "imagenet_resnet101" in capsys.readouterr().out
    restored, meta = load_variables(out)
    assert meta["source"] == "imagenet_resnet101" and meta["depth"] == 101
    assert meta["width"] == TINY and meta["torch_file"] == str(pth)
    got, want = flat(restored), flat(variables)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The same file read as ResNet-50 has keys too many: one error, nothing written.
    bad = tmp_path / "bad"
    assert convert.main(["--torch", str(pth), "--out", str(bad), "--setting", "resnet50"]) == 1
    assert "unexpected" in capsys.readouterr().err and not bad.exists()
