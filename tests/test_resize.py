"""Align-corners bilinear resize against PyTorch's F.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slr_jax.ops.resize import resize_bilinear_align_corners, scaled_size

torch = pytest.importorskip("torch")


def _torch_resize(x_nhwc: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=True)
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [
        ((161, 161), (80, 80)),
        ((41, 41), (81, 81)),
        ((20, 23), (81, 97)),
        ((7, 9), (1, 1)),
        ((1, 5), (3, 8)),
        ((81, 81), (321, 321)),
        ((33, 17), (33, 40)),
    ],
)
def test_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 5)).astype(np.float32)
    ours = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), out_hw))
    ref = _torch_resize(x, out_hw)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)


def test_gradient_matches_torch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 13, 11, 3)).astype(np.float32)
    g = rng.normal(size=(1, 6, 20, 3)).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(resize_bilinear_align_corners(v, (6, 20)) * g))(x)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    out = torch.nn.functional.interpolate(t, size=(6, 20), mode="bilinear", align_corners=True)
    (out * torch.from_numpy(g.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(np.asarray(ours), t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_identity_and_bad_input():
    x = jnp.ones((1, 4, 4, 2))
    assert resize_bilinear_align_corners(x, (4, 4)) is x
    with pytest.raises(ValueError, match="NHWC"):
        resize_bilinear_align_corners(jnp.ones((4, 4, 2)), (2, 2))


def test_scaled_size_truncates_like_python_int():
    assert scaled_size((321, 321), 0.5) == (160, 160)
    assert scaled_size((161, 97), 0.5) == (80, 48)
