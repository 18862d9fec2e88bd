"""Align-corners bilinear resize against PyTorch's F.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slr_jax.ops.resize import (
    interp_matrix,
    interp_matrix_np,
    resize_bilinear_align_corners,
    scaled_size,
)

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


# Sizes the models meet (crops 33..481, their halves, strides 4 and 8, inference scales) and
# awkward ones (1, primes, up- and downscaling by non-integer factors).
_SIZES = (1, 2, 5, 13, 25, 41, 48, 80, 97, 161, 321, 481)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_program_matrices_equal_the_numpy_ones_bit_for_bit(dtype):
    """The matrices built inside a jitted program are exactly interp_matrix_np's, cast to the
    compute dtype (float64 coordinates in float64 mode), for every pair of _SIZES."""
    pairs = [(i, o) for i in _SIZES for o in _SIZES if i != o]
    with jax.enable_x64(dtype == "float64"):
        # One program for every pair (a compile per pair would take minutes).
        build = jax.jit(lambda: [interp_matrix(i, o, jnp.dtype(dtype)) for i, o in pairs])
        for (in_size, out_size), ours in zip(pairs, build(), strict=True):
            ours = np.asarray(ours)
            expected = interp_matrix_np(in_size, out_size, dtype).astype(dtype)
            assert ours.dtype == expected.dtype
            bits = f"u{ours.itemsize}"
            assert np.array_equal(ours.view(bits), expected.view(bits)), (in_size, out_size)


def test_resize_program_has_no_dense_constant():
    """The (out, in) matrices are not baked into the program as constants: its text stays
    small however large the resize."""
    x = jax.ShapeDtypeStruct((1, 321, 321, 4), jnp.float32)
    text = jax.jit(lambda v: resize_bilinear_align_corners(v, (80, 80))).lower(x).as_text()
    assert len(text) < 20_000, len(text)
