"""slr_jax.convert: layouts, exact round trips, one clear mismatch error, both PyTorch file forms
(ImageNet backbone, full reference checkpoint), the ``python -m slr_jax.convert`` CLI, and, with
``SLR_REFERENCE_REPO`` set, the reference's own modules and state-dict names.

Values are checked on tiny-width models (the converter is shape-generic); full-width structure
comes from ``jax.eval_shape`` and zero-stride arrays, so the 100M-parameter net is never built.
The full network's outputs against PyTorch are ``python -m slr_jax.parity``'s job (~30 s).
"""

from __future__ import annotations

import functools
import importlib
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from numerics import assert_close

from slr_jax import convert
from slr_jax.checkpoint import CheckpointError, check_tree_shapes, load_variables
from slr_jax.models import SLRNet, variable_shapes
from slr_jax.models.backbone import BottleneckBlock, ResBlock
from slr_jax.models.heads import ASPP, GCI
from slr_jax.models.lowrank import FactorizationReconstruction

torch = pytest.importorskip("torch")

WIDTH = 0.0625
VARIANT_CLASSES = {"wsss": 21, "semi": 21, "semi_wo_cls": 21, "coco": 81}
# Reference module of each variant and its constructor arguments (pretrained=None: no file).
REFERENCE_NETS = {
    "wsss": ("models.slrnet", {}),
    "semi": ("models.slrnet_semi", {}),
    "semi_wo_cls": ("models.slrnet_semi_wo_cls", {}),
    "coco": ("models.slrnet_coco_pseudo", {"num_classes": 81}),
}


# ----------------------------------------------------------------------------------- helpers
@functools.cache
def shapes_of(variant: str, width: float = WIDTH) -> dict:
    """``{'params', 'batch_stats'}`` of ShapeDtypeStructs (traced, nothing computed)."""
    return variable_shapes(
        SLRNet(variant=variant, num_classes=VARIANT_CLASSES[variant], width=width)
    )


def random_like(shapes, seed: int) -> dict:
    """A distinct random float32 value for every element of every leaf."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def zeros_like_shapes(shapes) -> dict:
    """Zero-stride arrays: full-width structure without allocating it."""
    return jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def assert_trees_equal(got, want) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), (sorted(got.keys() ^ want.keys()))[:10]
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def tiny_state_dict(variant: str = "wsss", seed: int = 0) -> tuple[dict, dict]:
    """(random tiny Flax variables, their PyTorch state dict as torch tensors)."""
    variables = random_like(shapes_of(variant), seed)
    sd = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in convert.flax_to_torch(variables).items()
    }
    return variables, sd


# ------------------------------------------------------------------- layouts and round trips
def test_layouts_follow_pytorch_conventions():
    variables = random_like(shapes_of("wsss"), 0)
    params, stats = variables["params"], variables["batch_stats"]
    sd = convert.flax_to_torch(variables)
    conv = params["backbone"]["b2"]["conv_branch2a"]["kernel"]  # (kh, kw, I, O)
    assert sd["backbone.b2.conv_branch2a.weight"].shape == conv.shape[::-1][:2] + conv.shape[:2]
    np.testing.assert_array_equal(
        sd["backbone.b2.conv_branch2a.weight"], conv.transpose(3, 2, 0, 1)
    )
    # One element by hand: torch weight[o, i, y, x] is Flax kernel[y, x, i, o].
    assert sd["backbone.b2.conv_branch2a.weight"][3, 1, 0, 2] == conv[0, 2, 1, 3]
    linear = params["factorization_reconstruction"]["transform1"]["kernel"]  # (in, out)
    np.testing.assert_array_equal(sd["factorization_reconstruction.transform1.weight"], linear.T)
    bn = params["backbone"]["b2"]["bn_branch2a"]
    np.testing.assert_array_equal(sd["backbone.b2.bn_branch2a.weight"], bn["scale"])
    np.testing.assert_array_equal(sd["backbone.b2.bn_branch2a.bias"], bn["bias"])
    bn_stats = stats["backbone"]["b2"]["bn_branch2a"]
    np.testing.assert_array_equal(sd["backbone.b2.bn_branch2a.running_mean"], bn_stats["mean"])
    np.testing.assert_array_equal(sd["backbone.b2.bn_branch2a.running_var"], bn_stats["var"])
    # Sequential children by index; GCI's fc_skip BatchNorm has statistics but no affine.
    assert "last_conv.8.bias" in sd and "aspp.global_avg_pool.2.running_var" in sd
    assert "shallow_mask.fc_skip.1.running_mean" in sd
    assert "shallow_mask.fc_skip.1.weight" not in sd
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    n_leaves = len(flat(params)) + len(flat(stats))
    assert len(sd) == n_leaves and all(v.dtype == np.float32 for v in sd.values())


@pytest.mark.parametrize("variant", sorted(VARIANT_CLASSES))
def test_round_trip_flax_torch_flax_is_exact(variant):
    shapes = shapes_of(variant)
    variables, sd = tiny_state_dict(variant, seed=len(variant))
    heads_out = VARIANT_CLASSES[variant] - (variant != "semi_wo_cls")
    assert sd["last_conv.8.weight"].shape[0] == heads_out
    assert sd["aux_head.4.weight"].shape[0] == heads_out
    assert_trees_equal(convert.torch_to_flax(sd, shapes), variables)
    # With the reference's alias keys (fixed_layers / newly_added): ignored on the way back.
    with_aliases = convert.flax_to_torch(variables, with_aliases=True)
    assert "backbone.fixed_layers.1.bn_branch2a.running_var" in with_aliases
    assert "newly_added.5.8.weight" in with_aliases
    assert_trees_equal(convert.torch_to_flax(with_aliases, shapes), variables)


def test_full_checkpoint_form():
    """``{'state_dict': ...}`` as the reference trainer saves it, keys 'module.backbone...'."""
    variables, sd = tiny_state_dict("coco", seed=3)
    checkpoint = {
        "epoch": 7,
        "state_dict": {"module." + k: v for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": []},
    }
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])
    assert not convert.looks_like_backbone_file(convert.strip_state_dict(checkpoint))
    assert_trees_equal(convert.convert_checkpoint(checkpoint, shapes_of("coco")), variables)
    # A bare state dict (no wrapper, no prefix) reads the same.
    assert_trees_equal(convert.convert_checkpoint(sd, shapes_of("coco")), variables)
    with pytest.raises(CheckpointError, match=r"expected a state dict or \{'state_dict'"):
        convert.convert_checkpoint([sd], shapes_of("coco"))


def test_imagenet_backbone_form_replaces_only_backbone_and_ignores_classifier():
    source, sd = tiny_state_dict("wsss", seed=4)
    backbone_file = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone_file["linear1000.weight"] = torch.zeros(1000, 16)  # the ImageNet classifier
    backbone_file["linear1000.bias"] = torch.zeros(1000)
    backbone_file["fc.weight"] = torch.zeros(3)
    assert convert.looks_like_backbone_file(backbone_file)
    template = random_like(shapes_of("wsss"), 5)
    out = convert.convert_backbone(backbone_file, template)
    got, want_backbone, want_heads = (
        flat(out["params"]),
        flat(source["params"]),
        flat(template["params"]),
    )
    assert got.keys() == want_heads.keys()
    n_backbone = 0
    for k, v in got.items():
        expected = want_backbone[k] if k.startswith("backbone/") else want_heads[k]
        np.testing.assert_array_equal(v, expected, err_msg=k)
        n_backbone += k.startswith("backbone/")
    assert n_backbone > 100
    for k, v in flat(out["batch_stats"]).items():
        src = source if k.startswith("backbone/") else template
        np.testing.assert_array_equal(v, flat(src["batch_stats"])[k], err_msg=k)
    # A backbone key missing from the file is an error, not silently kept from the template.
    del backbone_file["b4_3.conv_branch2a.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): b4_3\.conv_branch2a\.weight"):
        convert.convert_backbone(backbone_file, template)


def test_mismatches_fail_with_one_error_listing_every_key():
    _, sd = tiny_state_dict("wsss", seed=6)
    sd = dict(sd)
    del sd["aspp.conv1.weight"]
    sd["aspp.extra.weight"] = torch.zeros(3)
    sd["fc8_x.0.weight"] = torch.zeros(7, 5, 3, 3)
    # Constants and aliases of the reference are not "unexpected".
    sd["_aff.aff_x.kernel"] = torch.zeros(8, 1, 3, 3)
    sd["backbone.b2.bn_branch2a.num_batches_tracked"] = torch.tensor(3)
    sd["backbone.fixed_layers.0.weight"] = sd["backbone.conv1a.weight"]
    with pytest.raises(CheckpointError) as err:
        convert.torch_to_flax(sd, shapes_of("wsss"))
    message = str(err.value)
    assert "missing (1): aspp.conv1.weight" in message
    assert "unexpected (1): aspp.extra.weight" in message
    model_shape = shapes_of("wsss")["params"]["fc8_x"]["0"]["kernel"].shape
    assert f"wrong shape (1): fc8_x.0.weight: file (3, 3, 5, 7) vs model {model_shape}" in message
    for ignored in ("_aff", "num_batches_tracked", "fixed_layers"):
        assert ignored not in message


def test_checkpoint_of_another_variant_names_the_classifier_leaves():
    _, coco_sd = tiny_state_dict("coco", seed=7)
    with pytest.raises(CheckpointError, match=r"wrong shape \(4\)") as err:
        convert.convert_checkpoint(coco_sd, shapes_of("wsss"))
    for key in ("last_conv.8.weight", "last_conv.8.bias", "aux_head.4.weight", "aux_head.4.bias"):
        assert key in str(err.value)
    assert "missing" not in str(err.value) and "unexpected" not in str(err.value)


# ---------------------------------------------------------------------------------- the CLI
@pytest.fixture
def tiny_settings(monkeypatch):
    """The CLI's settings at tiny width, so that it runs in a second (the code path is shared)."""
    for name, setting in list(convert.SETTINGS.items()):
        monkeypatch.setitem(convert.SETTINGS, name, dict(setting, width=WIDTH))


def test_cli_writes_orbax_checkpoint_readable_by_slr_jax(tmp_path, tiny_settings, capsys):
    variables, sd = tiny_state_dict("semi_wo_cls", seed=8)
    pth = tmp_path / "slrnet_semi_wo_cls.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, pth)
    out = tmp_path / "converted"
    rc = convert.main(["--torch", str(pth), "--out", str(out), "--setting", "semi_wo_cls"])
    assert rc == 0, capsys.readouterr().err
    assert "reference_checkpoint" in capsys.readouterr().out
    restored, meta = load_variables(out)
    check_tree_shapes(shapes_of("semi_wo_cls"), restored)
    assert_trees_equal(restored, variables)
    assert meta["variant"] == "semi_wo_cls" and meta["num_classes"] == 21
    assert meta["width"] == WIDTH and meta["source"] == "reference_checkpoint"
    assert meta["torch_file"] == str(pth)
    # Converting again to the same folder says that it replaced the checkpoint there.
    rc = convert.main(["--torch", str(pth), "--out", str(out), "--setting", "semi_wo_cls"])
    assert rc == 0 and f"replaced the checkpoint in {out}" in capsys.readouterr().out


def test_cli_backbone_file_keeps_initialised_heads(tmp_path, tiny_settings, monkeypatch, capsys):
    import slr_jax.models

    source, sd = tiny_state_dict("wsss", seed=9)
    heads = random_like(shapes_of("wsss"), 10)
    calls = []

    def fake_init(model, rng):  # stands in for the (slow, eager) random init of the heads
        calls.append((model.variant, model.width, np.asarray(jax.random.key_data(rng))))
        return heads

    monkeypatch.setattr(slr_jax.models, "init_variables", fake_init)
    backbone_file = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone_file["linear1000.weight"] = torch.zeros(1000, 16)
    pth = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.pth"
    torch.save(backbone_file, pth)
    rc = convert.main(["--torch", str(pth), "--out", str(tmp_path / "out"), "--seed", "5"])
    assert rc == 0, capsys.readouterr().err
    assert len(calls) == 1 and calls[0][:2] == ("wsss", WIDTH)
    np.testing.assert_array_equal(calls[0][2], jax.random.key_data(jax.random.key(5)))
    restored, meta = load_variables(tmp_path / "out")
    assert meta["source"] == "imagenet_backbone" and meta["variant"] == "wsss"
    assert_trees_equal(restored["params"]["backbone"], source["params"]["backbone"])
    assert_trees_equal(restored["params"]["aspp"], heads["params"]["aspp"])
    assert_trees_equal(restored["batch_stats"]["last_conv"], heads["batch_stats"]["last_conv"])


def test_cli_reports_bad_files(tmp_path, tiny_settings, capsys):
    """One error naming the file (python -m slr_jax.convert prints it as one line, exit 1:
    tests/test_cli_errors.py); a text file is not sent through torch.load at all."""
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        convert.main(["--torch", str(tmp_path / "nope.pth"), "--out", str(out)])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as error:
        convert.main(["--torch", str(garbage), "--out", str(out)])
    assert "weights_only" not in str(error.value)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 a zip archive cut short")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        convert.main(["--torch", str(damaged), "--out", str(out)])
    _, coco_sd = tiny_state_dict("coco", seed=11)
    coco = tmp_path / "coco.pth"
    torch.save({"state_dict": coco_sd}, coco)
    assert convert.main(["--torch", str(coco), "--out", str(out), "--setting", "wsss"]) == 1
    err = capsys.readouterr().err
    assert "wrong shape (4)" in err and "last_conv.8.weight" in err
    assert not out.exists(), "nothing is written when the weights do not fit"


# ---------------------------------------------------------------- against the reference code
@pytest.fixture(scope="module")
def reference(reference_file):
    """The reference's ``models`` package, imported from $SLR_REFERENCE_REPO."""
    root = str(reference_file("models", "slrnet.py").parents[1])
    sys.path.insert(0, root)
    try:
        return {
            name: importlib.import_module(name)
            for name in ["models.backbones.resnet38d", "models.mods"]
            + [module for module, _ in REFERENCE_NETS.values()]
        }
    except Exception as err:  # any import problem means "no usable reference here"
        pytest.skip(f"reference models do not import: {err}")
    finally:
        sys.path.remove(root)


@pytest.mark.parametrize("variant", sorted(VARIANT_CLASSES))
def test_full_width_names_and_shapes_match_reference_state_dict(reference, variant):
    """Every key and shape of the reference ``Net`` (built on the meta device: no memory)."""
    module, kwargs = REFERENCE_NETS[variant]
    with torch.device("meta"):
        net = reference[module].Net(pretrained=None, scale_factor=0.5, **kwargs)
    ref = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    full = shapes_of(variant, 1.0)
    ours = convert.flax_to_torch(zeros_like_shapes(full), with_aliases=True)
    expected = {
        k: s
        for k, s in ref.items()
        if not k.startswith("_aff.") and not k.endswith("num_batches_tracked")
    }
    assert {k: v.shape for k, v in ours.items()} == expected
    result = net.load_state_dict(
        {k: torch.empty(v.shape, device="meta") for k, v in ours.items()}, strict=False, assign=True
    )
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("_aff.") for k in result.missing_keys)
    # The other way: a file with every reference key (aliases, PAMR constants, counters).
    file = {k: np.broadcast_to(np.float32(0), s) for k, s in ref.items()}
    check_tree_shapes(full, convert.convert_checkpoint({"state_dict": file}, full))


def _randomise_batchnorms(module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    module.eval()


def _converted(flax_module, torch_module, *inputs) -> dict:
    """``torch_module``'s state dict through ``torch_to_flax`` into ``flax_module``'s layout."""
    shapes = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *inputs))
    return convert.torch_to_flax(torch_module.state_dict(), shapes)


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _image(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    "cin,mid,cout,stride,first_dilation,dilation",
    [(8, 16, 16, 2, 1, 1), (16, 8, 16, 1, 2, 2), (8, 8, 16, 1, 1, 2)],
)
def test_reference_resblock_converts_to_equal_outputs(
    reference, cin, mid, cout, stride, first_dilation, dilation
):
    torch.manual_seed(0)
    ref = reference["models.backbones.resnet38d"].ResBlock(
        cin, mid, cout, stride=stride, first_dilation=first_dilation, dilation=dilation
    )
    _randomise_batchnorms(ref, 1)
    x = _image((2, 13, 11, cin), 2)
    ours = ResBlock(mid, cout, stride, first_dilation, dilation)
    out, pre = ours.apply(_converted(ours, ref, x), x)
    with torch.no_grad():
        ref_out, ref_pre = ref(_nchw(x), get_x_bn_relu=True)
    assert_close(out, _nhwc(ref_out), 1e-5, "ResBlock")
    assert_close(pre, _nhwc(ref_pre), 1e-5, "ResBlock bn-relu")


def test_reference_bottleneck_aspp_gci_lowrank_convert_to_equal_outputs(reference):
    torch.manual_seed(0)
    resnet38d, mods = reference["models.backbones.resnet38d"], reference["models.mods"]

    bot = resnet38d.ResBlock_bot(16, 32, dilation=4, dropout=0.3)
    _randomise_batchnorms(bot, 1)
    x = _image((2, 11, 9, 16), 2)
    ours = BottleneckBlock(32, 4, dropout=0.3)
    out, pre = ours.apply(_converted(ours, bot, x), x)
    with torch.no_grad():
        ref_out, ref_pre = bot(_nchw(x), get_x_bn_relu=True)
    assert_close(out, _nhwc(ref_out), 1e-5, "ResBlock_bot")
    assert_close(pre, _nhwc(ref_pre), 1e-5, "ResBlock_bot bn-relu")

    # 256 output channels are fixed in the reference; a small input keeps it cheap. 40 px so
    # that the dilation-36 taps read pixels, not only padding.
    aspp = mods.ASPP(8, 8, torch.nn.BatchNorm2d)
    _randomise_batchnorms(aspp, 3)
    x = _image((1, 40, 38, 8), 4)
    ours = ASPP()
    with torch.no_grad():
        ref_out = aspp(_nchw(x))
    assert_close(ours.apply(_converted(ours, aspp, x), x), _nhwc(ref_out), 1e-5, "ASPP")

    gci = mods.GCI(torch.nn.BatchNorm2d)
    _randomise_batchnorms(gci, 5)
    shallow, deep = _image((2, 9, 7, 256), 6), _image((2, 9, 7, 256), 7)
    ours = GCI()
    with torch.no_grad():
        ref_out = gci(_nchw(shallow), _nchw(deep))
    out = ours.apply(_converted(ours, gci, shallow, deep), shallow, deep)
    assert_close(out, _nhwc(ref_out), 1e-5, "GCI")

    fr = reference["models.slrnet"].FactorizationReconstruction(16, num_iters=3)
    x, inits = _image((2, 40, 16), 8), _image((2, 7, 16), 9)
    ours = FactorizationReconstruction(num_iters=3)
    outs = ours.apply(_converted(ours, fr, x, inits), x, inits)
    with torch.no_grad():
        ref_outs = fr(torch.from_numpy(x), torch.from_numpy(inits))
    for name, a, b in zip(("output", "codes", "dictionary"), outs, ref_outs):
        assert_close(a, b.numpy(), 1e-5, f"FactorizationReconstruction {name}")
