"""slr_jax.infer.crf: equals the reference utils/dcrf.py, sharpens noisy maps toward regions."""

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from slr_jax import metrics
from slr_jax.infer import crf

pytest.importorskip("pydensecrf.densecrf")

HEIGHT, WIDTH, NUM_CLASSES = 36, 48, 3


def _reference_crf_inference(dcrf_path):
    """The reference's crf_inference, loaded from its file (skips when it does not import)."""
    spec = importlib.util.spec_from_file_location("slrnet_ref_dcrf", dcrf_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        pytest.skip(f"reference dcrf.py does not import: {err}")
    return module.crf_inference


def _scene(seed=0):
    """(image (H,W,3) uint8, true labels (H,W), noisy probs (C,H,W) float32).

    Background is grey-green, a red rectangle is class 1, a blue disc is class 2. The probs put
    0.5 on the true class plus heavy per-pixel noise, so ~30% of argmax pixels are wrong.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    labels = np.zeros((HEIGHT, WIDTH), np.int64)
    labels[6:22, 4:20] = 1
    labels[(yy - 22) ** 2 + (xx - 33) ** 2 < 10**2] = 2
    colours = np.array([[110, 140, 100], [200, 40, 40], [40, 60, 210]], np.float64)
    image = colours[labels] + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    onehot = np.moveaxis(np.eye(NUM_CLASSES)[labels], -1, 0)
    scores = 0.5 * onehot + rng.random((NUM_CLASSES, HEIGHT, WIDTH))
    probs = (scores / scores.sum(0, keepdims=True)).astype(np.float32)
    return image, labels, probs


def _miou(pred, labels):
    conf = metrics.confusion_matrix(pred, labels, NUM_CLASSES)
    return metrics.segmentation_scores(conf)["miou"]


def test_matches_reference_crf_inference(reference_file):
    crf_inference = _reference_crf_inference(reference_file("utils", "dcrf.py"))
    image, _, probs = _scene()
    expected = crf_inference(image, probs, t=10, scale_factor=1, labels=NUM_CLASSES)
    ours = crf.dense_crf(image, probs)
    assert ours.shape == (NUM_CLASSES, HEIGHT, WIDTH) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    # The reference's scale_factor divides both spatial widths.
    expected_half = crf_inference(image, probs, t=5, scale_factor=2, labels=NUM_CLASSES)
    ours_half = crf.dense_crf(image, probs, n_iters=5, gaussian_sxy=1.5, bilateral_sxy=40)
    np.testing.assert_allclose(ours_half, expected_half, rtol=0, atol=1e-6)
    assert np.abs(ours_half - ours).max() > 1e-3  # the settings matter


def test_channels_last_gives_the_same_marginals():
    image, _, probs = _scene(1)
    chw = crf.dense_crf(image, probs)
    hwc = crf.dense_crf(image, np.moveaxis(probs, 0, -1))
    assert hwc.shape == (HEIGHT, WIDTH, NUM_CLASSES)
    np.testing.assert_allclose(np.moveaxis(hwc, -1, 0), chw, atol=1e-7)


def test_read_only_and_strided_images_are_accepted():
    """pydensecrf needs a writable C-contiguous buffer; PIL-backed arrays are read-only."""
    image, _, probs = _scene(4)
    expected = crf.dense_crf(image, probs)
    from_pil = np.asarray(Image.fromarray(image))
    assert not from_pil.flags.writeable
    read_only = image.copy()
    read_only.setflags(write=False)
    # A transposed view of a (W, H, 3) copy: the right values, not C-contiguous.
    strided = np.ascontiguousarray(image.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not strided.flags.c_contiguous
    for name, view in (("PIL", from_pil), ("read-only", read_only), ("strided", strided)):
        out = crf.dense_crf(view, probs)
        np.testing.assert_array_equal(out, expected, err_msg=name)
    assert not read_only.flags.writeable  # the caller's array is left as it was


def test_zero_iterations_return_normalised_clipped_probs():
    image, _, probs = _scene(2)
    probs[0, :4, :4] = 0.0  # clipped to 1e-5 in the unary
    q0 = crf.dense_crf(image, probs, n_iters=0)
    clipped = np.clip(probs.astype(np.float64), crf.UNARY_CLIP, 1.0)
    np.testing.assert_allclose(q0, clipped / clipped.sum(0), rtol=1e-4, atol=1e-6)


def test_crf_sharpens_noisy_map_toward_regions():
    image, labels, probs = _scene(3)
    before = _miou(probs.argmax(0), labels)
    refined = crf.dense_crf(image, probs)
    after = _miou(refined.argmax(0), labels)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    assert before < 0.75, before  # the input really is noisy
    assert after > 0.95 and after > before + 0.2, (before, after)
    # Marginals are more confident than the input.
    assert refined.max(0).mean() > probs.max(0).mean() + 0.2


def test_bad_inputs_raise_clear_errors():
    image, _, probs = _scene()
    with pytest.raises(ValueError, match=r"uint8 of shape \(H, W, 3\), got float32"):
        crf.dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"got uint8 \(36, 48, 4\)"):
        crf.dense_crf(np.concatenate([image, image[..., :1]], -1), probs)
    with pytest.raises(ValueError, match="does not match the image size 36x48"):
        crf.dense_crf(image, probs[:, :-1])
    with pytest.raises(ValueError, match="must be 3-D"):
        crf.dense_crf(image, probs[None])
    with pytest.raises(ValueError, match="not logits"):
        crf.dense_crf(image, probs - 0.5)
    with pytest.raises(ValueError, match=r"is not \(H, W, C\)"):
        crf.dense_crf(image, probs, channels_last=True)
    square = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="pass channels_last=True or False"):
        crf.dense_crf(square, np.full((4, 4, 4), 0.25, np.float32))
    assert crf.dense_crf(square, np.full((4, 4, 4), 0.25, np.float32), channels_last=True).shape
    with pytest.raises(ValueError, match="floating point"):
        crf.dense_crf(image, probs.argmax(0)[None].repeat(3, 0))


def test_missing_pydensecrf_is_reported(monkeypatch):
    image, _, probs = _scene()
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert not crf.crf_available()
    with pytest.raises(crf.CRFUnavailableError, match="pip install pydensecrf2"):
        crf.dense_crf(image, probs)
