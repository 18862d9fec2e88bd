"""Exact padded evaluation: SLRNet's padded forward (``region``) and the padded multi-scale
prediction (``config.test.bucket_sizes``, the default) give the unpadded computation's numbers,
and an evaluation compiles one program per (bucket, scale).

Weights: random, with BatchNorm statistics and biases away from identity, so that beyond the
valid region every layer produces non-zero values which would leak without the masking (the
plain forward on the padded input differs by > 1e-3 below); kernels are scaled so that the
tiny network's logits stay O(1), where float32 rounding is ~1e-7.
"""

import jax
import numpy as np
import pytest

from configs import voc, voc_semi, voc_semi_wo_cls
from slr_jax import infer
from slr_jax.infer import predict
from slr_jax.models import SLRNet, build_model, variable_shapes
from slr_jax.models.slrnet import grid_cells, padded_region
from slr_jax.ops import resize_bilinear_align_corners

SETTINGS = {"wsss": voc, "semi": voc_semi, "semi_wo_cls": voc_semi_wo_cls}
WIDTH = 0.0625
TOL = 1e-5


def _variables(model, seed=0):
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name.endswith(("['mean']", "['bias']")):
            return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return rng.uniform(0.5, 1.0, leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, variable_shapes(model))


def _photo(height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 4.0, yy * 5.0, (xx + yy) * 2.0], -1) + rng.uniform(
        0, 60, (height, width, 3)
    )
    return np.clip(base, 0, 255).astype(np.uint8)


def _setting_config(setting, **test):
    config = SETTINGS[setting].get_config()
    config.model.update(width=WIDTH, num_classes=6)
    config.test.update(test)
    return config


def test_padded_forward_is_the_unpadded_forward():
    """SLRNet(..., region=padded_region(...)) on an input padded with junk (7.0) equals the
    unpadded test forward: class scores to 1e-5, class maps (valid grid, resized as the model
    resizes) to 1e-5 and the same argmax everywhere; without the region it does not."""
    model = SLRNet(variant="wsss", num_classes=6, width=WIDTH)
    variables = _variables(model)
    forward = jax.jit(lambda v, x: model.apply(v, x, mode="test"))
    padded_forward = jax.jit(lambda v, x, r: model.apply(v, x, mode="test", region=r))
    height, width, size = 37, 29, (52, 48)
    images = np.random.default_rng(1).normal(size=(2, height, width, 3)).astype(np.float32)
    padded = np.pad(images, ((0, 0), (0, size[0] - height), (0, size[1] - width), (0, 0)))
    padded[:, height:] = padded[:, :, width:] = 7.0
    expected = jax.device_get(forward(variables, images))
    out = jax.device_get(padded_forward(variables, padded, padded_region(size, (height, width))))
    assert out["grid_masks"].shape[1:3] == (grid_cells(size[0], 4), grid_cells(size[1], 4))
    grid = out["grid_masks"][:, : grid_cells(height, 4), : grid_cells(width, 4)]
    masks = np.asarray(resize_bilinear_align_corners(grid, (height, width)))
    np.testing.assert_allclose(out["cls"], expected["cls"], atol=TOL, rtol=0)
    np.testing.assert_allclose(masks, expected["masks"], atol=TOL, rtol=0)
    assert (masks.argmax(-1) == expected["masks"].argmax(-1)).all()
    plain = np.asarray(forward(variables, padded)["masks"])[:, :height, :width]
    assert np.abs(plain - expected["masks"]).max() > 1e-3  # the padding matters without masks


@pytest.mark.parametrize(
    "setting, scales", [("wsss", (1.0, 0.5)), ("semi", (0.75,)), ("semi_wo_cls", (0.75,))]
)
def test_padded_evaluation_is_exact_for_every_setting(setting, scales):
    """The padded multi-scale + flip prediction (default ``bucket_sizes``) equals the unpadded
    one (``bucket_sizes=()``) for each setting's config: class logits and averaged maps to
    1e-5, and the final label maps (class presence, ``bg_pow``, argmax) on 100% of pixels."""
    config = _setting_config(setting, scales=scales)
    model = build_model(config.model)
    variables = _variables(model, seed=2)
    image = _photo(45, 39, seed=3)
    exact = _setting_config(setting, scales=scales, bucket_sizes=()).test
    assert predict.eval_program_group(image.shape[:2], config.test, model.apply) == ("padded", 64)
    assert predict.eval_program_group(image.shape[:2], exact, model.apply)[0] == "unpadded"
    cls0, masks0 = infer.multiscale_predict(model.apply, variables, image, exact)
    cls1, masks1 = infer.multiscale_predict(model.apply, variables, image, config.test)
    np.testing.assert_allclose(cls1, cls0, atol=TOL, rtol=0)
    np.testing.assert_allclose(masks1, masks0, atol=TOL, rtol=0)
    filter_classes = setting != "semi_wo_cls"
    labels = [
        infer.masks_to_labels(c, m, config.test, filter_classes=filter_classes)["pred"]
        for c, m in ((cls0, masks0), (cls1, masks1))
    ]
    np.testing.assert_array_equal(labels[1], labels[0])


def test_evaluation_compiles_one_program_per_bucket_and_scale():
    """Seven image sizes in two buckets (64, 128), two scales with flips: the evaluation
    compiles 2 x 2 = 4 programs (counted by JAX's compilation events), and predicting every
    image afterwards compiles nothing more."""
    config = _setting_config("wsss", scales=(1.0, 0.5))
    config.model.num_classes = 7  # shapes no other test compiles
    model = build_model(config.model)
    variables = _variables(model, seed=4)
    sizes = [(37, 45), (50, 29), (64, 20), (33, 64), (41, 41), (70, 33), (90, 128)]
    counted = predict.eval_programs_compiled(model.apply, variables, sizes, config.test)
    assert counted == {"images": 7, "groups": 2, "programs": 4}
    with predict.count_compilations() as compiled:
        for i, (height, width) in enumerate(sizes):
            infer.multiscale_predict(model.apply, variables, _photo(height, width, i), config.test)
    assert compiled == []


def test_bucket_choice_and_settings():
    """The smallest bucket holding the longer side; none beyond the largest; bad lists refused."""
    from slr_jax.infer.preprocess import check_bucket_sizes, square_bucket

    buckets = (64, 128, 256, 512)
    assert [square_bucket(s, buckets) for s in ((64, 3), (65, 3), (3, 500), (513, 2))] == [
        64, 128, 512, None,
    ]  # fmt: skip
    assert square_bucket((10, 10), ()) is None
    assert check_bucket_sizes([512, 64]) == (64, 512)
    for bad in ((0, 64), (64.0,), "64", (True,)):
        with pytest.raises(infer.InferenceError, match="bucket_sizes must be"):
            check_bucket_sizes(bad)
    config = _setting_config("wsss")
    assert predict.eval_program_group((30, 3000), config.test, None)[0] == "unpadded"
    two_view = _setting_config("wsss", mode="test_two_view").test
    assert predict.eval_program_group((30, 40), two_view, None)[0] == "unpadded"
    approximate = _setting_config("wsss", bucket_step=64).test
    assert predict.eval_program_group((30, 40), approximate, None)[0] == "unpadded"


def test_converted_reference_weights_padded_equals_unpadded(reference_repo):
    """The reference network (full width, random weights, BatchNorms randomised by the parity
    tool) converted by ``slr_jax.convert``: padded and unpadded predictions agree (1e-5, all
    pixels) for the two distinct networks (wsss; semi_wo_cls predicts background itself)."""
    from slr_jax import convert, parity

    image = _photo(45, 39, seed=5)
    for setting in ("wsss", "semi_wo_cls"):
        net, _ = parity.build_reference(str(reference_repo), setting, seed=7, num_classes=21)
        config = SETTINGS[setting].get_config()
        config.test.scales = (1.0,)
        model = build_model(config.model)
        state = {"state_dict": {k: v.numpy() for k, v in net.state_dict().items()}}
        variables = convert.convert_checkpoint(state, variable_shapes(model))
        exact = SETTINGS[setting].get_config().test
        exact.update(scales=(1.0,), bucket_sizes=())
        cls0, masks0 = infer.multiscale_predict(model.apply, variables, image, exact)
        cls1, masks1 = infer.multiscale_predict(model.apply, variables, image, config.test)
        np.testing.assert_allclose(cls1, cls0, atol=TOL, rtol=0)
        np.testing.assert_allclose(masks1, masks0, atol=TOL, rtol=0)
        assert (masks1.argmax(-1) == masks0.argmax(-1)).all()
