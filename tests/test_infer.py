"""slr_jax.infer: multi-scale + flip composition, label maps, CRF path, export, CLI and errors.

The composition tests re-express the reference loop of ``tools/infer_voc.py`` in PyTorch
(PIL bicubic views, mirrored pair, flip back, align-corners resize, sum / (2 * scales)) around
a small analytic model written twice (JAX and PyTorch), so every step is pinned.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import common
from slr_jax import constants, infer, metrics
from slr_jax.checkpoint import save_variables
from slr_jax.infer import export, predict, preprocess, runner
from slr_jax.models import build_model, variable_shapes
from slr_jax.ops import resize_bilinear_align_corners

NUM_CLASSES = 5
HEIGHT, WIDTH = 40, 50
MEAN, STD = constants.IMAGENET_MEAN, constants.IMAGENET_STD
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings_with(**overrides):
    """``config.test`` of configs/common.py (the reference's settings) with ``overrides``."""
    cfg = common.get_config().test
    cfg.update(overrides)
    return cfg


def config_for(model: dict, **test_overrides):
    """The full config of configs/common.py with ``model`` keys and ``test`` overrides."""
    cfg = common.get_config()
    cfg.model.update(model)
    cfg.test.update(test_overrides)
    return cfg


# ----------------------------------------------------------------------------- fake model


def _fake_variables(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "mix": rng.normal(size=(3, NUM_CLASSES)).astype(np.float32),
        "ramp": rng.normal(size=(NUM_CLASSES,)).astype(np.float32) * 3.0,
    }


def fake_apply(variables, images, mode="test"):
    """Not mirror-symmetric: a left-to-right ramp per class. (B,h,w,3) -> cls, masks."""
    width = images.shape[2]
    ramp = jnp.linspace(0.0, 1.0, width)[None, None, :, None] * variables["ramp"]
    logits = jnp.einsum("bhwc,ck->bhwk", images, variables["mix"]) + ramp
    masks = jax.nn.softmax(logits, axis=-1)
    cls = jnp.mean(masks[..., 1:] * logits[..., 1:], axis=(1, 2))
    return {"cls": cls, "masks": masks}


def torch_fake_model(variables, images_nchw):
    """The same model in PyTorch on NCHW tensors -> (cls (B,C-1), masks (B,C,h,w))."""
    mix = torch.from_numpy(variables["mix"])
    width = images_nchw.shape[-1]
    ramp = (
        torch.linspace(0.0, 1.0, width)[None, None, None, :]
        * torch.from_numpy(variables["ramp"])[None, :, None, None]
    )
    logits = torch.einsum("bchw,ck->bkhw", images_nchw, mix) + ramp
    masks = torch.softmax(logits, dim=1)
    cls = (masks[:, 1:] * logits[:, 1:]).mean(dim=(2, 3))
    return cls, masks


def _photo(height=HEIGHT, width=WIDTH, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 5.0, yy * 6.0, (xx + yy) * 3.0], -1)
    return np.clip(base + rng.uniform(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def _reference_view(image_uint8, scale):
    """Dataset side of the reference: PIL bicubic rescale (round), normalise, (2,3,h,w)."""
    h, w = image_uint8.shape[:2]
    size = (int(np.round(h * scale)), int(np.round(w * scale)))
    if size != (h, w):
        image_uint8 = np.asarray(
            Image.fromarray(image_uint8).resize(size[::-1], Image.Resampling.BICUBIC)
        )
    arr = np.empty(image_uint8.shape, np.float32)
    for c in range(3):
        arr[..., c] = (image_uint8[..., c] / 255.0 - MEAN[c]) / STD[c]
    chw = np.transpose(arr, (2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack([chw, np.flip(chw, -1)])))


def _reference_multiscale(variables, image_uint8, scales):
    """The worker loop of tools/infer_voc.py around torch_fake_model -> (cls, masks CHW)."""
    size = image_uint8.shape[:2]
    cams, clss = [], []
    for scale in scales:
        cls, cam = torch_fake_model(variables, _reference_view(image_uint8, scale))
        cam = cam[0] + cam[1].flip(-1)
        clss.append((cls[0] + cls[1]) / 2.0)
        cam = F.interpolate(cam[None], size, mode="bilinear", align_corners=True)
        cams.append(cam[0])
    masks = torch.sum(torch.stack(cams, 0), 0) / (2 * len(cams))
    cls = torch.sum(torch.stack(clss, 0), 0) / len(clss)
    return cls.numpy(), masks.numpy()


def test_multiscale_matches_reference_loop():
    variables = _fake_variables()
    image = _photo()
    scales = (1.0, 0.5, 1.5, 0.75)
    cls, masks = infer.multiscale_predict(
        fake_apply, variables, image, settings_with(scales=scales)
    )
    ref_cls, ref_masks = _reference_multiscale(variables, image, scales)
    assert cls.shape == (NUM_CLASSES - 1,) and masks.shape == (HEIGHT, WIDTH, NUM_CLASSES)
    np.testing.assert_allclose(cls, ref_cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masks, np.transpose(ref_masks, (1, 2, 0)), atol=2e-6)
    # Mean of softmaxes: still a distribution per pixel.
    np.testing.assert_allclose(masks.sum(-1), 1.0, atol=1e-5)


def test_multiscale_reuses_the_compiled_forward():
    variables = _fake_variables()
    infer.multiscale_predict(fake_apply, variables, _photo(), settings_with(scales=(1.0,)))
    forward = predict._network_fn(fake_apply, "test")
    before = forward._cache_size()
    infer.multiscale_predict(fake_apply, variables, _photo(seed=3), settings_with(scales=(1.0,)))
    assert forward._cache_size() == before


def test_flip_views_are_flipped_back():
    variables = _fake_variables(1)
    image = _photo(seed=1)
    normalised = infer.normalise_image(image)[None]
    direct = np.asarray(fake_apply(variables, normalised)["masks"][0])
    mirrored = np.asarray(fake_apply(variables, normalised[:, :, ::-1])["masks"][0])
    # The model is not mirror-symmetric, so forgetting to flip back would show.
    assert np.abs(mirrored - direct[:, ::-1]).max() > 0.05

    one_view = settings_with(scales=(1.0,), flip=False)
    _, no_flip = infer.multiscale_predict(fake_apply, variables, image, one_view)
    np.testing.assert_allclose(no_flip, direct, atol=1e-6)
    _, with_flip = infer.multiscale_predict(
        fake_apply, variables, image, settings_with(scales=(1.0,))
    )
    np.testing.assert_allclose(with_flip, (direct + mirrored[:, ::-1]) / 2, atol=1e-6)
    assert np.abs(with_flip - (direct + mirrored) / 2).max() > 0.02


def test_scaled_input_sizes_and_paths():
    image = _photo()
    assert preprocess.reference_scaled_size((HEIGHT, WIDTH), 0.75) == (30, 38)  # round(37.5)
    assert preprocess.reference_scaled_size((5, 5), 0.5) == (2, 2)  # NumPy rounds half to even
    exact = infer.scaled_input(image, 1.0, "pil_bicubic")
    np.testing.assert_array_equal(exact, infer.normalise_image(image))
    # Float (already normalised) input: the same bicubic kernel without 8-bit rounding.
    from_uint8 = infer.scaled_input(image, 0.5, "pil_bicubic")
    from_float = infer.scaled_input(infer.normalise_image(image), 0.5, "pil_bicubic")
    assert from_float.shape == from_uint8.shape == (20, 25, 3)
    assert np.abs(from_float - from_uint8).max() < 0.05
    aligned = infer.scaled_input(image, 0.5, "align_corners")
    assert aligned.shape == (20, 25, 3)


# ----------------------------------------------------------------------------- real model


def _random_variables(model, seed=0):
    """Variables of the right shapes without the (slow) model.init: He-normal kernels."""
    shapes = variable_shapes(model)
    rng = np.random.RandomState(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("['mean']") or name.endswith("['bias']"):
            return np.zeros(leaf.shape, np.float32)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


TINY_MODEL = {"variant": "wsss", "num_classes": 21, "width": 0.0625}
FAKE_MODEL = {"variant": "wsss", "num_classes": NUM_CLASSES}


@pytest.fixture(scope="module")
def tiny_model():
    model = build_model(config_for(TINY_MODEL).model)
    return model, _random_variables(model)


# ----------------------------------------------------------------------------- label maps


def _reference_labels(cls, masks_hwc, *, fp_cut, top_k, bg_pow, image_labels=None):
    """tools/infer_voc.py after the averaging, in PyTorch on (C, H, W)."""
    masks_pred = torch.from_numpy(np.ascontiguousarray(np.transpose(masks_hwc, (2, 0, 1))))
    if image_labels is None:
        cls_sigmoid = torch.sigmoid(torch.from_numpy(cls))
        kth = torch.topk(cls_sigmoid, k=top_k)[0][-1]
        cls_label = (cls_sigmoid > fp_cut) * (cls_sigmoid >= kth)
    else:
        cls_label = torch.from_numpy(image_labels)
    cls_label = cls_label.type_as(masks_pred)
    masks_pred[1:, :, :] *= cls_label.view(cls_label.size(0), 1, 1)
    masks_pred[0, :, :] = torch.pow(masks_pred[0], bg_pow)
    masks_pred = masks_pred.numpy()
    return np.argmax(masks_pred, 0), masks_pred


def _label_inputs(seed=0, num_classes=8, height=24, width=30):
    rng = np.random.RandomState(seed)
    logits = rng.normal(size=(height, width, num_classes)).astype(np.float32) * 2.0
    logits[..., 0] += 1.0
    masks = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # Five classes above fp_cut = 0.3 (sigmoid(-0.2) = 0.45), so top_k = 3 has to cut two.
    cls = np.array([2.0, -3.0, 1.0, -0.2, 0.5, 3.0, -1.5], np.float32)
    return cls, masks.astype(np.float32)


def test_masks_to_labels_matches_reference_steps():
    cls, masks = _label_inputs()
    settings = {"fp_cut": 0.3, "top_k": 3, "bg_pow": 3.0}
    presence = infer.class_presence(cls, fp_cut=0.3, top_k=3)
    np.testing.assert_array_equal(np.flatnonzero(presence), [0, 2, 5])
    labels = infer.masks_to_labels(cls, masks, settings_with(**settings))["pred"]
    ref_labels, ref_probs = _reference_labels(cls, masks, **settings)
    assert labels.dtype == np.uint8 and labels.shape == masks.shape[:2]
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(
        infer.adjust_probabilities(cls, masks, settings_with(**settings)),
        np.transpose(ref_probs, (1, 2, 0)),
        rtol=1e-6,
    )
    assert set(np.unique(labels)) <= {0, 1, 3, 6}
    # bg_pow and top_k both change the answer on this input.
    for other in (dict(settings, bg_pow=1.0), dict(settings, top_k=6)):
        assert (infer.masks_to_labels(cls, masks, settings_with(**other))["pred"] != labels).any()


def test_masks_to_labels_with_image_labels_and_without_filtering():
    cls, masks = _label_inputs(seed=2)
    image_labels = np.zeros(7, np.float32)
    image_labels[[1, 4]] = 1.0
    settings = settings_with(bg_pow=2.0)
    labels = infer.masks_to_labels(cls, masks, settings, image_labels=image_labels)["pred"]
    ref_labels, _ = _reference_labels(
        cls, masks, fp_cut=0.3, top_k=6, bg_pow=2.0, image_labels=image_labels
    )
    np.testing.assert_array_equal(labels, ref_labels)
    assert set(np.unique(labels)) <= {0, 2, 5}
    # semi_wo_cls: no class filter and no background power, a plain argmax.
    plain = infer.masks_to_labels(cls, masks, settings, filter_classes=False)["pred"]
    np.testing.assert_array_equal(plain, np.argmax(masks, -1))
    # COCO's extra power on one class is applied after the background power.
    coco = infer.adjust_probabilities(cls, masks, settings_with(bg_pow=2.0, class_pows={1: 4.0}))
    base = infer.adjust_probabilities(cls, masks, settings)
    np.testing.assert_allclose(coco[..., 1], base[..., 1] ** 4, rtol=1e-6)


def test_crf_path_matches_pydensecrf():
    densecrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    cls, masks = _label_inputs(seed=4, height=20, width=24)
    image = _photo(20, 24, seed=4)
    settings = settings_with(fp_cut=0.3, top_k=3, bg_pow=3.0, use_crf=True)
    both = infer.masks_to_labels(cls, masks, settings, image_uint8=image)
    labels = both["crf"]
    _, probs = _reference_labels(cls, masks, fp_cut=0.3, top_k=3, bg_pow=3.0)
    crf = densecrf.DenseCRF2D(24, 20, probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(image), compat=10)
    expected = np.argmax(np.array(crf.inference(10)).reshape(probs.shape), 0)
    np.testing.assert_array_equal(labels, expected)
    assert (labels != both["pred"]).any()


# ----------------------------------------------------------------------------- export


def test_export_pngs_round_trip(tmp_path):
    labels = np.arange(20 * 30).reshape(20, 30) % 21
    crf_labels = (labels + 1) % 21
    probs = np.random.RandomState(0).rand(20, 30, 21).astype(np.float32)
    written = infer.export_pseudo_labels(
        tmp_path, "2007_000033", labels, crf_labels=crf_labels, probs=probs
    )
    assert written["pred"] == tmp_path / "pred" / "2007_000033.png"
    with Image.open(written["pred"]) as png:
        assert png.mode == "P"
        assert png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        np.testing.assert_array_equal(np.array(png), labels)
    with Image.open(written["crf"]) as png:
        np.testing.assert_array_equal(np.array(png), crf_labels)
    np.testing.assert_array_equal(np.load(written["probs"]), probs)
    grey = infer.save_label_png(tmp_path / "grey.png", labels, palette=False)
    with Image.open(grey) as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.array(png), labels)


def test_score_predictions_known_answer(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 2]])
    scores = metrics.score_predictions({"a": pred}, {"a": gt}, num_classes=3)
    # background 2/3, class 1 3/4, class 2 1/1.
    np.testing.assert_allclose(scores["iou"], [2 / 3, 3 / 4, 1.0])
    np.testing.assert_allclose(scores["miou"], (2 / 3 + 3 / 4 + 1) / 3)
    infer.save_label_png(tmp_path / "pred" / "a.png", pred)
    infer.save_label_png(tmp_path / "gt" / "a.png", gt)
    from_files = metrics.score_predictions(tmp_path / "pred", tmp_path / "gt", num_classes=3)
    np.testing.assert_allclose(from_files["iou"], scores["iou"])


def test_run_inference_on_eval_batches(tmp_path):
    variables = _fake_variables(2)
    image = _photo(seed=5)
    normalised = infer.normalise_image(image)
    gt = np.full((HEIGHT, WIDTH), 255, np.int32)
    gt[:, :25] = 0
    batch = {
        "image": normalised[None],
        "raw_image": (image.astype(np.float32) / 255.0)[None],
        "mask": gt[None],
        "labels": np.ones((1, NUM_CLASSES - 1), np.float32),
        "name": np.asarray(["img_a"]),
        "is_valid": np.asarray([True]),
    }
    padding = dict(batch, name=np.asarray(["pad"]), is_valid=np.asarray([False]))
    # fake_apply's ramp spans the whole input, so padding would change it: no buckets.
    cfg = config_for(FAKE_MODEL, scales=(1.0, 0.5), fp_cut=0.0, top_k=4, bg_pow=1.0)
    summary = infer.run_inference(
        cfg, variables, [batch, padding], tmp_path, apply_fn=fake_apply, save_probs=True
    )
    assert summary["num_images"] == 1 and summary["num_scored"] == 1
    assert summary["num_predicted"] == 1 and summary["images_per_second"] > 0
    assert not (tmp_path / "pred" / "pad.png").exists()
    cls, masks = infer.multiscale_predict(fake_apply, variables, image, cfg.test)
    expected = infer.masks_to_labels(cls, masks, cfg.test)["pred"]
    with Image.open(tmp_path / "pred" / "img_a.png") as png:
        np.testing.assert_array_equal(np.array(png), expected)
    bg_iou = np.mean(expected[:, :25] == 0) / (1 + np.mean(expected[:, 25:] == 0))
    np.testing.assert_allclose(summary["scores"]["pred"]["iou"][0], bg_iou, rtol=1e-6)
    assert np.load(tmp_path / "probs" / "img_a.npy").shape == (HEIGHT, WIDTH, NUM_CLASSES)


# ----------------------------------------------------------------------------- command line


def run_cli(*args: str, module: str = "slr_jax.infer", **env_vars) -> subprocess.CompletedProcess:
    """``python -m slr_jax.infer ARGS`` (the flags of ``python -m slr_jax.main``)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **env_vars)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def test_cli_on_a_folder_of_photographs(tmp_path, tiny_model):
    """Checkpoint -> CLI -> PNGs; the saved probabilities equal a direct forward + flip. The
    settings come from the converted checkpoint's setting (configs/voc.py), overrides apply."""
    model, variables = tiny_model
    checkpoint = tmp_path / "ckpt"
    save_variables(checkpoint, variables, {**TINY_MODEL, "source": "test"})
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(_photo(seed=i)).save(photos / f"photo{i}.png")
    (photos / "notes.txt").write_text("not an image")
    # Unreadable files between the good ones: listed at the end, the others all processed.
    jpeg = photos / "cut.jpg"
    Image.fromarray(_photo(seed=5)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not a png")
    out = tmp_path / "out"
    proc = run_cli(
        f"--checkpoint={checkpoint}", f"--images={photos}", f"--output={out}", "--save_scores",
        "--config.test.scales=(1.0,)", "--config.test.use_crf=True",
        "--config.test.fp_cut=0.1", "--config.test.top_k=4",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "wrote 2 predictions" in proc.stdout
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("error: skipped")]
    assert len(skipped) == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in ("cut", "empty", "text"):
        assert any(f"skipped {name}: cannot read image" in line for line in skipped), skipped
    for i in range(2):
        for kind in ("pred", "crf"):
            with Image.open(out / kind / f"photo{i}.png") as png:
                labels = np.array(png)
            assert labels.shape == (HEIGHT, WIDTH) and labels.max() < 21
    assert not (out / "pred" / "notes.png").exists()

    # The same numbers straight from the model: mean of the view and the flipped-back mirror.
    view = infer.normalise_image(_photo(seed=1))
    outputs = jax.jit(lambda v, x: model.apply(v, x, mode="test"))(
        variables, jnp.asarray(np.stack([view, view[:, ::-1]]))
    )
    masks = (np.asarray(outputs["masks"][0]) + np.asarray(outputs["masks"][1])[:, ::-1]) / 2
    cls = np.asarray(outputs["cls"]).mean(0)
    expected = infer.adjust_probabilities(cls, masks, settings_with(fp_cut=0.1, top_k=4))
    np.testing.assert_allclose(np.load(out / "probs" / "photo1.npy"), expected, atol=1e-5)
    with Image.open(out / "pred" / "photo1.png") as png:
        assert (np.array(png) == np.argmax(expected, -1)).mean() > 0.999

    # The persistent compilation cache (in the output folder by default): a second run with it
    # loads the network's program instead of compiling it, and writes the same labels.
    cache = out / "compile_cache"
    assert any(p.name.startswith("jit_network") for p in cache.iterdir())
    again = run_cli(
        f"--checkpoint={checkpoint}", f"--images={photos}", f"--output={tmp_path / 'again'}",
        "--config.test.scales=(1.0,)", "--config.test.use_crf=True", "--config.test.fp_cut=0.1",
        "--config.test.top_k=4", f"--config.compile_cache_dir={cache}", JAX_LOG_COMPILES="1",
    )  # fmt: skip
    assert "Persistent compilation cache hit for 'jit_network'" in again.stderr, again.stderr[
        -3000:
    ]
    for i in range(2):
        pngs = [d / "pred" / f"photo{i}.png" for d in (out, tmp_path / "again")]
        assert pngs[0].read_bytes() == pngs[1].read_bytes()


def test_cli_errors_are_one_line(tmp_path):
    photo = tmp_path / "one.png"
    Image.fromarray(_photo()).save(photo)
    not_a_checkpoint = tmp_path / "empty_ckpt"
    not_a_checkpoint.mkdir()
    checkpoint = tmp_path / "ckpt"
    save_variables(checkpoint, {"params": {}}, {**TINY_MODEL, "source": "test"})
    output_file = tmp_path / "out.txt"
    output_file.write_text("a file")
    cases = [
        ((f"--checkpoint={tmp_path / 'nope'}", f"--images={photo}", "--output=o"),
         f"--checkpoint {tmp_path / 'nope'} does not exist"),
        ((f"--checkpoint={checkpoint}", f"--images={photo}", f"--output={tmp_path / 'o'}",
          "--config.model.width=0.125"), "has model width 0.0625; the config has model width"),
        ((f"--checkpoint={checkpoint}", f"--images={photo}", f"--output={output_file}"),
         "is a file; pass a folder"),
        ((f"--checkpoint={not_a_checkpoint}", f"--images={photo}", "--output=o"), "neither"),
        (("--config=configs/voc.py", f"--checkpoint={tmp_path / 'nope'}", f"--images={photo}",
          "--output=o"), "is not a folder"),
        (("--config.test.scalez=(1.0,)",), "names no config key"),
    ]  # fmt: skip
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_image_path_errors(tmp_path):
    photo = tmp_path / "one.png"
    Image.fromarray(_photo()).save(photo)
    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(infer.InferenceError, match="holds no images"):
        infer.collect_image_paths([empty])
    with pytest.raises(infer.InferenceError, match="neither an image file nor a folder"):
        infer.collect_image_paths([tmp_path / "missing.jpg"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    with pytest.raises(infer.InferenceError, match="cannot read image .*broken.jpg"):
        infer.read_photograph(broken)
    other = tmp_path / "sub"
    other.mkdir()
    Image.fromarray(_photo()).save(other / "one.jpg")
    with pytest.raises(infer.InferenceError, match="would both write one.png"):
        infer.collect_image_paths([photo, other])
    huge = tmp_path / "huge.png"
    Image.new("L", (2049, 2049)).save(huge)
    with pytest.raises(infer.InferenceError, match="2049x2049 .* more than the 4.2 MP"):
        infer.read_photograph(huge)
    read = list(preprocess.photographs([photo, broken, huge, photo]))
    good, bad = ["image", "name"], ["error", "name"]
    assert [sorted(r) for r in read] == [good, bad, bad, good]
    with pytest.raises(infer.InferenceError, match="is a file; pass a folder"):
        runner.prepare_output_dir(photo)


def test_bad_inputs_have_clear_errors():
    variables = _fake_variables()
    cls, masks = _label_inputs()
    with pytest.raises(infer.InferenceError, match="needs image_uint8"):
        infer.masks_to_labels(cls, masks, settings_with(use_crf=True))
    with pytest.raises(infer.InferenceError, match="one \\(H, W, 3\\) RGB array"):
        infer.multiscale_predict(
            fake_apply, variables, np.zeros((1, 8, 8, 3), np.uint8), settings_with()
        )
    with pytest.raises(infer.InferenceError, match="positive numbers"):
        infer.multiscale_predict(fake_apply, variables, _photo(), settings_with(scales=(1.0, 0.0)))
    with pytest.raises(infer.InferenceError, match="image_labels has 3 entries"):
        infer.masks_to_labels(cls, masks, settings_with(), image_labels=np.ones(3))
    with pytest.raises(infer.InferenceError, match="unknown CRF settings"):
        infer.inference_settings(settings_with(crf={"sxy": 3}))
    with pytest.raises(infer.InferenceError, match="cannot name an output file"):
        infer.export_pseudo_labels("/tmp", "../escape", np.zeros((2, 2), np.uint8))
    with pytest.raises(infer.InferenceError, match="shrinks a 3x3 image"):
        preprocess.reference_scaled_size((3, 3), 0.1)
    with pytest.raises(infer.InferenceError, match="not a multiple of the network's mask stride"):
        infer.inference_settings(settings_with(bucket_step=30))
    with pytest.raises(infer.InferenceError, match="integer >= 0"):
        infer.multiscale_predict(fake_apply, variables, _photo(), settings_with(bucket_step=-4))
    with pytest.raises(infer.InferenceError, match="bucket_pad='wrap'"):
        infer.inference_settings(settings_with(bucket_pad="wrap"))
    for flag in ("resume", "save_overlays", "flip", "use_crf"):
        with pytest.raises(infer.InferenceError, match=f"{flag} must be True or False"):
            infer.inference_settings({**settings_with().to_dict(), flag: "yes"})
    with pytest.raises(infer.InferenceError, match="devices is empty"):
        runner.inference_devices([], variables)
    with pytest.raises(infer.InferenceError, match="same \\(H, W\\)"):
        infer.overlay_image(_photo(), np.zeros((HEIGHT, WIDTH + 1), np.uint8))
    stride4_only = lambda v, x, mode: {"cls": x[:, 0, 0], "masks": x[:, ::4, ::4]}
    with pytest.raises(infer.InferenceError, match="needs class maps at the input size"):
        infer.multiscale_predict(stride4_only, variables, _photo(), settings_with(scales=(1.0,)))


# ----------------------------------------------------------------------------- size buckets


def make_strided_fake(trace_counter=None):
    """A new (uncompiled) model that follows SLRNet's output convention without any global
    operation: a per-pixel classifier on the stride-4 grid (cell i = input pixel 4i) with a
    term in the absolute column, upsampled to the input size (align corners). Padding at the
    bottom/right therefore cannot change its valid cells. ``trace_counter`` (a list) gets one
    entry per trace, i.e. per compilation."""

    def apply(variables, images, mode="test"):
        if trace_counter is not None:
            trace_counter.append(images.shape)
        grid = images[:, ::4, ::4]
        column = 4.0 * jnp.arange(grid.shape[2], dtype=jnp.float32)[None, None, :, None]
        logits = jnp.einsum("bhwc,ck->bhwk", grid, variables["mix"])
        logits = logits + 0.005 * column * variables["ramp"]
        masks = jax.nn.softmax(logits, axis=-1)
        return {
            "cls": logits[:, 0, 0, 1:],
            "masks": resize_bilinear_align_corners(masks, images.shape[1:3]),
        }

    return apply


STRIDED_FAKE = make_strided_fake()  # shared, so its compilations are reused across tests


def test_bucket_sizes_and_padding():
    assert [preprocess.bucket_size(n, 64) for n in (1, 40, 64, 65, 66, 129, 130)] == [
        65, 65, 65, 65, 129, 129, 193,
    ]  # fmt: skip
    assert preprocess.bucket_size(41, 0) == 41
    assert all(preprocess.bucket_size(n, 32) % 4 == 1 for n in range(1, 200))
    view = infer.normalise_image(_photo(seed=2))
    for mode in preprocess.BUCKET_PAD_MODES:
        padded = preprocess.pad_view(view, (65, 129), mode)
        assert padded.shape == (65, 129, 3)
        np.testing.assert_array_equal(padded[:HEIGHT, :WIDTH], view)
    assert (preprocess.pad_view(view, (65, 65), "constant")[HEIGHT:] == 0).all()
    edge = preprocess.pad_view(view, (65, 65), "edge")
    np.testing.assert_array_equal(edge[-1, :WIDTH], view[-1])
    assert preprocess.pad_view(view, (HEIGHT, WIDTH), "constant") is view


@pytest.mark.parametrize("pad", ["constant", "edge"])
def test_buckets_never_crop_the_prediction(pad):
    """Bucketed = unpadded for a model without global operations, for every image size: the
    output covers the full (H, W) and no value comes from the padding or a shifted grid."""
    variables = _fake_variables(3)
    apply = STRIDED_FAKE
    scales = (1.0, 0.5, 1.5)
    for i, (height, width) in enumerate([(40, 50), (66, 63), (23, 97)]):
        # Noise, so padding (even edge replication) differs from the pixels 4 px inside.
        image = np.random.RandomState(i).randint(0, 256, (height, width, 3)).astype(np.uint8)
        exact_cls, exact = infer.multiscale_predict(
            apply, variables, image, settings_with(scales=scales)
        )
        bucketed = settings_with(scales=scales, bucket_step=64, bucket_pad=pad)
        cls, masks = infer.multiscale_predict(apply, variables, image, bucketed)
        assert masks.shape == exact.shape == (height, width, NUM_CLASSES)
        np.testing.assert_allclose(masks, exact, atol=2e-6)
        np.testing.assert_allclose(cls, exact_cls, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(masks.sum(-1), 1.0, atol=1e-5)
    # Control: cropping the padded forward at full resolution (after its upsampling) instead
    # of on the stride-4 grid would be wrong here (shifted grid, padded neighbours).
    view = infer.normalise_image(image)
    naive = apply(variables, jnp.asarray(preprocess.pad_view(view, (65, 129), pad)[None]))
    plain = apply(variables, jnp.asarray(view[None]))
    assert np.abs(naive["masks"][0, :23, :97] - plain["masks"][0]).max() > 0.01


def test_images_in_one_bucket_share_one_compilation():
    variables = _fake_variables(4)
    traces = []
    apply = make_strided_fake(traces)
    images = [_photo(40, 50, seed=1), _photo(47, 61, seed=2), _photo(33, 64, seed=3)]
    for image in images:  # views 40x50, 47x61, 33x64 and the image buckets: all 65 x 65
        infer.multiscale_predict(
            apply, variables, image, settings_with(scales=(1.0,), bucket_step=64)
        )
    assert len(traces) == 1 and traces[0] == (2, 65, 65, 3)
    assert predict._network_fn(apply, "test", constants.MASK_STRIDE)._cache_size() == 1
    # Without buckets every size compiles anew (what the buckets avoid).
    unbucketed = []
    apply_exact = make_strided_fake(unbucketed)
    for image in images:
        infer.multiscale_predict(apply_exact, variables, image, settings_with(scales=(1.0,)))
    assert len(unbucketed) == 3


def _tamed(variables, factor=0.3):
    """The random tiny model with a smaller last layer: logits of a few units, so its masks are
    neither saturated nor uniform (the plain random model's logits reach ~1e3)."""
    tamed = jax.tree_util.tree_map(lambda x: x, variables)
    tamed["params"]["last_conv"] = jax.tree_util.tree_map(
        lambda x: x * factor, tamed["params"]["last_conv"]
    )
    return tamed


def test_tiny_model_buckets(tiny_model):
    """SLRNet itself: one executable for two sizes in a bucket; at a size that needs no
    padding the stride-4 crop path reproduces the plain forward to float rounding (so its grid
    assumption holds for the real network) and the class scores recomputed on the valid grid
    equal the network's own."""
    model, variables = tiny_model
    variables = _tamed(variables)
    settings = settings_with(scales=(1.0,), bucket_step=64)
    forward = predict._network_fn(model.apply, "test", constants.MASK_STRIDE, True)
    predict_bucketed = lambda image: infer.multiscale_predict(
        model.apply, variables, image, settings, rescore=True
    )
    predict_bucketed(_photo(40, 50))
    compiled = forward._cache_size()
    _, masks = predict_bucketed(_photo(57, 44, seed=1))
    assert forward._cache_size() == compiled and masks.shape == (57, 44, 21)

    image = _photo(65, 65, seed=2)
    unpadded = settings_with(scales=(1.0,))
    exact_cls, exact = infer.multiscale_predict(model.apply, variables, image, unpadded)
    assert exact.min() < 1e-3 and exact.max() > 0.5  # informative masks, not saturated
    cls, masks = predict_bucketed(image)
    np.testing.assert_allclose(masks, exact, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cls, exact_cls, rtol=1e-5, atol=1e-6)
    with pytest.raises(infer.InferenceError, match="rescore needs buckets"):
        infer.multiscale_predict(model.apply, variables, image, unpadded, rescore=True)


# ----------------------------------------------------------------------------- restart


def _synthetic_examples(count=3):
    from slr_jax.data.synthetic import make_synthetic_example

    sizes = [(40, 50), (44, 57), (52, 48), (36, 60)][:count]
    return [
        {key: ex[key] for key in ("name", "image", "mask")}
        for ex in (make_synthetic_example(i, size, 21, 5) for i, size in enumerate(sizes))
    ]


def test_restart_skips_finished_images(tmp_path, tiny_model, monkeypatch):
    model, variables = tiny_model
    variables = _tamed(variables)
    calls = []
    original = runner.multiscale_predict_async
    monkeypatch.setattr(
        runner, "multiscale_predict_async", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    cfg = config_for(TINY_MODEL, scales=(1.0, 0.5), fp_cut=0.05, top_k=3)
    examples = _synthetic_examples()
    lines = []
    first = infer.run_inference(
        cfg, variables, examples, tmp_path, apply_fn=model.apply, save_probs=True, log=lines.append
    )
    assert len(calls) == 3 and first["num_predicted"] == 3 and first["num_skipped"] == 0
    assert first["images_per_second"] > 0 and "images/s" in lines[-1]
    pngs = {p.name: p.read_bytes() for p in (tmp_path / "pred").iterdir()}

    second = infer.run_inference(
        cfg, variables, examples, tmp_path, apply_fn=model.apply, save_probs=True
    )
    assert len(calls) == 3, "the second run must not forward anything"
    assert second["num_skipped"] == 3 and second["num_predicted"] == 0
    assert second["images_per_second"] is None and second["num_scored"] == 3
    np.testing.assert_array_equal(second["confusions"]["pred"], first["confusions"]["pred"])
    assert second["scores"]["pred"]["miou"] == first["scores"]["pred"]["miou"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "pred").iterdir()} == pngs

    # Only what is missing or broken is redone: a truncated PNG, a deleted score map.
    broken = tmp_path / "pred" / f"{examples[0]['name']}.png"
    broken.write_bytes(broken.read_bytes()[:40])
    (tmp_path / "probs" / f"{examples[1]['name']}.npy").unlink()
    third = infer.run_inference(
        cfg, variables, examples, tmp_path, apply_fn=model.apply, save_probs=True
    )
    assert len(calls) == 5 and third["num_predicted"] == 2
    np.testing.assert_array_equal(third["confusions"]["pred"], first["confusions"]["pred"])

    # Other settings, other variables or resume=False: everything is predicted again.
    other = config_for(TINY_MODEL, scales=(1.0, 0.5), fp_cut=0.5, top_k=3)
    infer.run_inference(other, variables, examples, tmp_path, apply_fn=model.apply)
    assert len(calls) == 8
    nudged = jax.tree_util.tree_map(lambda x: x, variables)
    nudged["params"]["last_conv"] = jax.tree_util.tree_map(
        lambda x: x * 1.01, nudged["params"]["last_conv"]
    )
    infer.run_inference(other, nudged, examples, tmp_path, apply_fn=model.apply)
    assert len(calls) == 11
    fresh = config_for(TINY_MODEL, scales=(1.0, 0.5), fp_cut=0.5, top_k=3, resume=False)
    infer.run_inference(fresh, nudged, examples, tmp_path, apply_fn=model.apply)
    assert len(calls) == 14


def test_finished_outputs_checks_key_size_and_scores(tmp_path):
    labels = np.arange(12 * 9).reshape(12, 9) % 5
    probs = np.random.RandomState(0).rand(12, 9, 5).astype(np.float32)
    infer.export_pseudo_labels(tmp_path, "a", labels, probs=probs, key="k1")
    check = dict(use_crf=False, save_probs=True)
    found = export.finished_outputs(tmp_path, "a", "k1", (12, 9), 5, **check)
    np.testing.assert_array_equal(found["pred"], labels)
    assert export.finished_outputs(tmp_path, "a", "k2", (12, 9), 5, **check) is None
    assert export.finished_outputs(tmp_path, "a", "k1", (12, 10), 5, **check) is None
    assert (
        export.finished_outputs(tmp_path, "a", "k1", (12, 9), 5, use_crf=True, save_probs=True)
        is None
    )
    # Rewritten without scores: the old .npy goes, so it cannot pass for this run's scores.
    infer.export_pseudo_labels(tmp_path, "a", labels, key="k3")
    assert not (tmp_path / "probs" / "a.npy").exists()
    assert export.finished_outputs(tmp_path, "a", "k3", (12, 9), 5, **check) is None
    assert export.finished_outputs(tmp_path, "a", "k3", (12, 9), 5, use_crf=False, save_probs=False)
    assert not list(tmp_path.rglob("*.tmp"))


def test_restart_keys_follow_settings_variables_and_image():
    settings = infer.inference_settings(settings_with())
    variables = _fake_variables()
    key = export.run_key(settings, TINY_MODEL, variables, fake_apply)
    as_jax = jax.tree_util.tree_map(jnp.asarray, variables)
    assert export.run_key(settings, TINY_MODEL, as_jax, fake_apply) == key
    assert export.run_key({**settings, "resume": False}, TINY_MODEL, variables, fake_apply) == key
    others = [
        export.run_key({**settings, "bg_pow": 1.0}, TINY_MODEL, variables, fake_apply),
        export.run_key({**settings, "bucket_step": 64}, TINY_MODEL, variables, fake_apply),
        export.run_key(settings, {**TINY_MODEL, "width": 0.125}, variables, fake_apply),
        export.run_key(settings, TINY_MODEL, _fake_variables(1), fake_apply),
    ]
    assert len({key, *others}) == 5
    image = _photo()
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    keys = {
        export.image_key(key, image, None),
        export.image_key(key, changed, None),
        export.image_key(key, image, np.ones(4, np.float32)),
    }
    same = export.image_key(key, image, None) == export.image_key(key, image, None)
    assert len(keys) == 3 and same


def test_converted_reference_checkpoint_on_photographs(reference_repo, tmp_path, capsys):
    """The user's path end to end: a reference checkpoint (random weights) -> slr_jax.convert ->
    slr_jax.infer on photographs shipped with scikit-image -> the scores equal the reference
    network's own multi-scale inference of the same files (full width, a few minutes)."""
    skimage_data = pytest.importorskip("skimage.data")
    from slr_jax import convert, parity

    net, _ = parity.build_reference(str(reference_repo), "wsss", seed=3, num_classes=21)
    pth = tmp_path / "slrnet_wsss.pth"
    torch.save({"epoch": 1, "state_dict": net.state_dict()}, pth)
    checkpoint = tmp_path / "converted"
    assert convert.main(["--torch", str(pth), "--out", str(checkpoint)]) == 0, (
        capsys.readouterr().err
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):  # real photographs, shrunk to keep the test quick
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        image.resize((image.width // 6, image.height // 6), Image.Resampling.BICUBIC).save(
            photos / f"{name}.png"
        )
    out = tmp_path / "out"
    proc = run_cli(
        f"--checkpoint={checkpoint}", f"--images={photos}", f"--output={out}", "--save_scores",
        "--config.test.scales=(1.0, 0.5)",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("astronaut", "coffee"):
        photo = np.asarray(Image.open(photos / f"{name}.png"))
        cls, masks = parity.reference_multiscale_predict(net, photo, (1.0, 0.5))
        expected = infer.adjust_probabilities(cls, masks, settings_with())
        probs = np.load(out / "probs" / f"{name}.npy")
        assert probs.shape == photo.shape[:2] + (21,)
        np.testing.assert_allclose(probs, expected, atol=2e-5)
        with Image.open(out / "pred" / f"{name}.png") as png:
            assert np.array(png).shape == photo.shape[:2]


# ----------------------------------------------------------------------------- overlays


def test_overlay_blend_formula():
    image = np.array([[[10, 20, 30], [200, 100, 0]], [[255, 255, 255], [0, 0, 0]]], np.uint8)
    labels = np.array([[1, 0], [15, 255]], np.uint8)
    blended = export.blend_labels(image, labels)
    # VOC colours: 1 (128, 0, 0), 0 black, 15 (192, 128, 128), 255 (224, 224, 192).
    expected = [[[69, 10, 15], [100, 50, 0]], [[224, 192, 192], [112, 112, 96]]]
    np.testing.assert_array_equal(blended, expected)
    palette = np.asarray(constants.voc_palette()).reshape(256, 3)
    np.testing.assert_array_equal(
        export.blend_labels(image, labels, alpha=0.25),
        np.round(0.75 * image + 0.25 * palette[labels]).astype(np.uint8),
    )
    side_by_side = infer.overlay_image(image, labels, ground_truth=np.zeros((2, 2), np.int32))
    assert side_by_side.shape == (2, 4, 3)
    np.testing.assert_array_equal(side_by_side[:, :2], blended)
    np.testing.assert_array_equal(side_by_side[:, 2:], np.round(image * 0.5).astype(np.uint8))


def test_run_inference_saves_overlays(tmp_path):
    variables = _fake_variables(2)
    with_gt, without_gt = _photo(seed=5), _photo(30, 20, seed=6)
    gt = np.full((HEIGHT, WIDTH), 255, np.int32)
    gt[:, :25] = 0
    gt[5:15, 30:45] = 3
    examples = [{"name": "a", "image": with_gt, "mask": gt}, {"name": "b", "image": without_gt}]
    test = dict(scales=(1.0,), fp_cut=0.0, top_k=4, bg_pow=1.0)
    cfg = config_for(FAKE_MODEL, **test)
    overlays = config_for(FAKE_MODEL, **test, save_overlays=True)
    infer.run_inference(overlays, variables, examples, tmp_path, apply_fn=fake_apply)
    with Image.open(tmp_path / "pred" / "a.png") as png:
        pred_a = np.array(png)
    with Image.open(tmp_path / "overlay" / "a.png") as png:
        assert png.mode == "RGB" and png.size == (2 * WIDTH, HEIGHT)
        overlay_a = np.array(png)
    np.testing.assert_array_equal(overlay_a[:, :WIDTH], export.blend_labels(with_gt, pred_a))
    np.testing.assert_array_equal(overlay_a[:, WIDTH:], export.blend_labels(with_gt, gt))
    with Image.open(tmp_path / "overlay" / "b.png") as png:
        assert png.size == (20, 30)  # no ground truth: the prediction blend alone

    # Restart: settings unchanged, so nothing is predicted; a missing overlay is rebuilt from
    # the saved labels (same bytes), and overlays do not change the restart key.
    (tmp_path / "overlay" / "a.png").unlink()
    again = infer.run_inference(overlays, variables, examples, tmp_path, apply_fn=fake_apply)
    assert again["num_skipped"] == 2 and again["num_predicted"] == 0
    with Image.open(tmp_path / "overlay" / "a.png") as png:
        np.testing.assert_array_equal(np.array(png), overlay_a)
    assert (
        infer.run_inference(cfg, variables, examples, tmp_path, apply_fn=fake_apply)["num_skipped"]
        == 2
        and (tmp_path / "overlay" / "b.png").exists()
    )
    # Predicted again without overlays: the now stale overlays are removed.
    fresh = config_for(FAKE_MODEL, **test, resume=False)
    infer.run_inference(fresh, variables, examples, tmp_path, apply_fn=fake_apply)
    assert not list((tmp_path / "overlay").iterdir())


# ----------------------------------------------------------------------------- devices


def test_inference_is_data_parallel_over_local_devices(tmp_path, tiny_model, cpu_env):
    """Two (fake CPU) local devices: images alternate between them, in flight together, and
    every saved output equals the one-device run's bit for bit; restart still skips them."""
    model, variables = tiny_model
    checkpoint = tmp_path / "ckpt"
    save_variables(checkpoint, _tamed(variables), {**TINY_MODEL, "source": "test"})
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax
        from configs import common
        from slr_jax import infer
        from slr_jax.checkpoint import load_variables
        from slr_jax.data.synthetic import make_synthetic_example
        from slr_jax.models import build_model

        devices = jax.local_devices()
        assert len(devices) == 2, devices
        variables, _ = load_variables({str(checkpoint)!r})
        cfg = common.get_config()
        cfg.model.update({TINY_MODEL!r})
        cfg.test.update(scales=(1.0, 0.5), fp_cut=0.05, top_k=3)
        apply = build_model(cfg.model).apply
        sizes = [(40, 50), (44, 57), (52, 48), (36, 60)]
        examples = [
            {{k: ex[k] for k in ("name", "image", "mask")}}
            for ex in (make_synthetic_example(i, s, 21, 5) for i, s in enumerate(sizes))
        ]
        out = {{}}
        for name, use in (("one", devices[:1]), ("two", None), ("again", None)):
            folder = {str(tmp_path)!r} + "/" + ("two" if name == "again" else name)
            summary = infer.run_inference(
                cfg, variables, examples, folder, apply_fn=apply, save_probs=True, devices=use
            )
            out[name] = {{k: summary[k] for k in
                         ("num_predicted", "num_skipped", "images_per_device")}}
            out[name]["confusion"] = summary["confusions"]["pred"].tolist()
        print("RESULT" + json.dumps(out))
        """
    )
    env = cpu_env(2)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result["one"]["images_per_device"] == {"cpu:0": 4}
    assert result["two"]["images_per_device"] == {"cpu:0": 2, "cpu:1": 2}
    assert result["two"]["confusion"] == result["one"]["confusion"]
    assert result["again"]["num_skipped"] == 4 and result["again"]["num_predicted"] == 0
    assert result["again"]["confusion"] == result["one"]["confusion"]
    names = sorted(p.stem for p in (tmp_path / "one" / "pred").iterdir())
    assert len(names) == 4
    for name in names:
        np.testing.assert_array_equal(
            np.load(tmp_path / "two" / "probs" / f"{name}.npy"),
            np.load(tmp_path / "one" / "probs" / f"{name}.npy"),
        )
        # Same labels and the same restart key: the PNGs are byte-identical.
        one, two = (tmp_path / kind / "pred" / f"{name}.png" for kind in ("one", "two"))
        assert one.read_bytes() == two.read_bytes()


def test_run_inference_skips_unreadable_examples_and_lists_them(tmp_path):
    """One bad example (an unreadable file, a mask of another size) among good ones: every
    good one is predicted and scored, the bad one listed in 'failed' with its reason."""
    variables = _fake_variables(2)
    gt = np.zeros((HEIGHT, WIDTH), np.int32)
    why = "Mask b.png is 7x5 but its image is 50x40."
    examples = [
        {"name": "a", "image": _photo(seed=1), "mask": gt},
        {"name": np.asarray(["b"]), "error": np.asarray([why])},
        {"name": "c", "image": _photo(seed=2), "mask": gt, "error": ""},
    ]
    cfg = config_for(FAKE_MODEL, scales=(1.0,), bg_pow=1.0)
    lines = []
    summary = infer.run_inference(
        cfg, variables, examples, tmp_path, apply_fn=fake_apply, log=lines.append
    )
    assert summary["num_predicted"] == 2 and summary["num_scored"] == 2
    assert summary["failed"] == [("b", why)]
    assert sorted(p.stem for p in (tmp_path / "pred").iterdir()) == ["a", "c"]
    assert lines[-1].endswith("1 unreadable, skipped: b")
