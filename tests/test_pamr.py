"""PAMR refinement (``slr_jax.ops.pamr``) against a PyTorch re-expression of its formulas.

The torch side (``torch_pamr``) reads each dilation's 3x3 window with ``F.pad(mode='replicate')``
and ``F.unfold`` on NCHW tensors, independently of the JAX shifted-slice implementation. With
``SLR_REFERENCE_REPO`` pointing at a checkout of the official code (github.com/DesertsP/SLRNet),
its own ``models/mods/pamr.py`` module is compared as well.
"""

from __future__ import annotations

import importlib
import sys

import jax
import numpy as np
import pytest
from numerics import assert_close

from slr_jax.ops.pamr import pamr, pamr_affinity

torch = pytest.importorskip("torch")
F = torch.nn.functional

PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


# ----------------------------------------------------------------------------- torch side
def _windows(x, dilations, drop_centre: bool):
    """(B, C, H, W) -> (B, C, P, H, W): each dilation's 3x3 window, replicate-padded."""
    b, c, h, w = x.shape
    groups = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        win = F.unfold(padded, kernel_size=3, dilation=d).view(b, c, 9, h, w)
        if drop_centre:
            win = win[:, :, [0, 1, 2, 3, 5, 6, 7, 8]]
        groups.append(win)
    return torch.cat(groups, dim=2)


def torch_pamr_affinity(image, dilations):
    """Softmax-normalised affinities (B, 8*D, H, W) of an NCHW image."""
    spread = _windows(image, dilations, drop_centre=False).std(dim=2, unbiased=True)
    diff = (image.unsqueeze(2) - _windows(image, dilations, drop_centre=True)).abs()
    logits = -(diff / (1e-8 + 0.1 * spread.unsqueeze(2))).mean(dim=1)
    return torch.softmax(logits, dim=1)


def torch_pamr(image, masks, num_iters, dilations):
    """PAMR on NCHW tensors: ``num_iters`` affinity-weighted averages over the neighbours."""
    affinity = torch_pamr_affinity(image, dilations).unsqueeze(1)
    for _ in range(num_iters):
        masks = (_windows(masks, dilations, drop_centre=True) * affinity).sum(dim=2)
    return masks


# ----------------------------------------------------------------------------------- helpers
def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def random_inputs(batch, height, width, classes, seed, flat_patches=False):
    """An image in [0, 1] (B, H, W, 3) and softmax masks (B, H, W, C)."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(batch, height, width, 3)).astype(np.float32)
    if flat_patches:  # constant blocks: zero local spread and zero differences
        image[:, : height // 2, : width // 2] = 0.25
        image[:, height // 2 :, width // 3 :] = rng.uniform(size=3).astype(np.float32)
    logits = 3.0 * rng.normal(size=(batch, height, width, classes))
    masks = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return image, masks.astype(np.float32)


# Compiling PAMR costs seconds on CPU, so the tests share two static configurations.
_pamr_jit = jax.jit(pamr, static_argnames=("num_iters", "dilations"))
_affinity_jit = jax.jit(pamr_affinity, static_argnames=("dilations",))
BIG = dict(shape=(2, 40, 37, 5), dilations=PAMR_DILATIONS, num_iters=10)  # SLRNet's setting
SMALL = dict(shape=(2, 9, 7, 3), dilations=(1, 2), num_iters=3)


def run_pamr(image, masks, cfg):
    return _pamr_jit(image, masks, num_iters=cfg["num_iters"], dilations=cfg["dilations"])


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("cfg", [BIG, SMALL], ids=["40x37-d1..24-10it", "9x7-d1,2-3it"])
def test_pamr_matches_torch(cfg):
    """Random images; the second one has constant blocks (zero spread, zero differences).
    At 40x37 the dilations 12 and 24 reach far into the replicate padding."""
    b, h, w, c = cfg["shape"]
    image, masks = random_inputs(b, h, w, c, seed=h * w)
    image[1:] = random_inputs(b - 1, h, w, c, seed=h * w + 1, flat_patches=True)[0]
    ours = run_pamr(image, masks, cfg)
    ref = torch_pamr(nchw(image), nchw(masks), cfg["num_iters"], cfg["dilations"])
    assert_close(ours, nhwc(ref), 1e-5, f"pamr {cfg}")
    if cfg is SMALL:
        aff = _affinity_jit(image, dilations=cfg["dilations"])
        ref_aff = torch_pamr_affinity(nchw(image), cfg["dilations"]).permute(0, 2, 3, 1).numpy()
        assert aff.shape == (b, h, w, 8 * len(cfg["dilations"]))
        assert_close(aff, ref_aff, 1e-5, "pamr affinity")


def test_pamr_propagation_invariants():
    """Affinities are a distribution over neighbours, so spatially constant masks are fixed
    points and per-pixel class distributions stay distributions."""
    image, masks = random_inputs(*SMALL["shape"], seed=3)
    aff = np.asarray(_affinity_jit(image, dilations=SMALL["dilations"]))
    np.testing.assert_allclose(aff.sum(-1), 1.0, atol=1e-6)
    assert np.all(aff > 0)
    constant = np.broadcast_to(np.array([0.2, 0.3, 0.5], np.float32), masks.shape)
    np.testing.assert_allclose(run_pamr(image, constant, SMALL), constant, atol=1e-6)
    refined = np.asarray(run_pamr(image, masks, SMALL))
    np.testing.assert_allclose(refined.sum(-1), 1.0, atol=1e-5)
    assert np.max(np.abs(refined - masks)) > 0.1  # it does move the masks


def test_pamr_iteration_never_materialises_the_neighbour_stack():
    """Each iteration is a running weighted sum: no array of the iteration carries the 8*D
    neighbours as an axis (the (B, H, W, C, 8*D) stack made PAMR 3x slower than the
    reference on the CPU; docs/benchmarks.md)."""
    image, masks = random_inputs(*SMALL["shape"], seed=3)
    p = 8 * len(SMALL["dilations"])
    jaxpr = jax.make_jaxpr(lambda i, m: pamr(i, m, num_iters=2, dilations=SMALL["dilations"]))(
        image, masks
    )
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    body = scan.params["jaxpr"].jaxpr
    shapes = [v.aval.shape for e in body.eqns for v in e.outvars]
    # The test's sizes (B 2, H 9, W 7, C 3, padded 13x11) never equal P = 16.
    assert shapes and not any(p in s for s in shapes), shapes


def test_pamr_flat_image_averages_neighbours_uniformly():
    """A constant image has zero spread: every affinity logit is 0/(1e-8) = 0, so each step is
    the plain mean of the 8*D replicate-padded neighbours."""
    b, h, w, c = SMALL["shape"]
    dilations, pad = SMALL["dilations"], max(SMALL["dilations"])
    image = np.full((b, h, w, 3), 0.5, np.float32)
    masks = np.random.default_rng(0).uniform(size=(b, h, w, c)).astype(np.float32)
    aff = np.asarray(_affinity_jit(image, dilations=dilations))
    np.testing.assert_allclose(aff, 1.0 / aff.shape[-1], rtol=1e-6)
    expected = masks
    for _ in range(SMALL["num_iters"]):
        padded = np.pad(expected, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        step = np.zeros_like(masks)
        for d in dilations:
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy, dx) != (0, 0):
                        y0, x0 = pad + dy * d, pad + dx * d
                        step += padded[:, y0 : y0 + h, x0 : x0 + w] / (8 * len(dilations))
        expected = step
    np.testing.assert_allclose(run_pamr(image, masks, SMALL), expected, rtol=1e-5)


def test_pamr_rejects_bad_input():
    image, masks = random_inputs(1, 8, 8, 2, seed=0)
    with pytest.raises(ValueError, match="differ in size"):
        pamr(image, masks[:, :7], num_iters=1, dilations=(1,))
    with pytest.raises(ValueError, match="dilations must be positive"):
        pamr(image, masks, num_iters=1, dilations=())
    with pytest.raises(ValueError, match="dilations must be positive"):
        pamr(image, masks, num_iters=1, dilations=(0, 1))


# ------------------------------------------------------------- the official implementation
def _reference_pamr_class(reference_repo):
    """``PAMR`` of the checkout's ``models/mods/pamr.py`` (``reference_repo``: conftest.py)."""
    root = str(reference_repo)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("models.mods.pamr").PAMR
    except Exception as err:  # noqa: BLE001 - any import failure means: cannot compare
        pytest.skip(f"could not import models.mods.pamr from {root}: {err!r}")


@pytest.mark.parametrize("cfg", [BIG, SMALL], ids=["40x37-d1..24-10it", "9x7-d1,2-3it"])
def test_pamr_matches_reference_module(reference_repo, cfg):
    ref_cls = _reference_pamr_class(reference_repo)
    b, h, w, c = cfg["shape"]
    image, masks = random_inputs(b, h, w, c, seed=11 + h, flat_patches=True)
    pamr_module = ref_cls(num_iter=cfg["num_iters"], dilations=list(cfg["dilations"]))
    with torch.no_grad():
        ref = pamr_module(nchw(image), nchw(masks))
    assert_close(run_pamr(image, masks, cfg), nhwc(ref), 1e-5, f"pamr vs reference PAMR {cfg}")
