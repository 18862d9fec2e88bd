"""Dense CRF post-processing of class probabilities (fully connected CRF, pydensecrf2).

Same model as the reference ``utils/dcrf.py`` (``crf_inference``): unary energy
``-log(clip(p, 1e-5, 1))`` in float32, one Gaussian (smoothness) kernel and one bilateral
(appearance) kernel with Potts compatibilities, mean-field for ``n_iters`` steps; the result is
the mean-field marginal Q (probabilities, summing to 1 over classes), not a label map.
The reference's ``scale_factor`` divides both spatial widths; pass ``gaussian_sxy / s`` and
``bilateral_sxy / s`` to get the same effect.
"""

from __future__ import annotations

import numpy as np

UNARY_CLIP = 1e-5


class CRFUnavailableError(ImportError):
    """pydensecrf (from the ``pydensecrf2`` wheel) is not installed."""


def _densecrf_module():
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as err:
        raise CRFUnavailableError(
            "dense CRF needs the pydensecrf2 package (import name pydensecrf): "
            "`pip install pydensecrf2`, or set config.test.use_crf = False."
        ) from err
    return densecrf


def crf_available() -> bool:
    """True when pydensecrf can be imported."""
    try:
        _densecrf_module()
    except CRFUnavailableError:
        return False
    return True


def _probs_to_chw(probs: np.ndarray, height: int, width: int, channels_last: bool | None):
    """Returns (probs as (C, H, W), whether the input was channels-last)."""
    if probs.ndim != 3:
        raise ValueError(
            f"probs must be 3-D, (C, H, W) or (H, W, C), got shape {probs.shape}; "
            "pass one image at a time."
        )
    chw_fits = probs.shape[1:] == (height, width)
    hwc_fits = probs.shape[:2] == (height, width)
    if channels_last is None:
        if chw_fits and hwc_fits:
            raise ValueError(
                f"probs shape {probs.shape} fits both (C, H, W) and (H, W, C) for an image of "
                f"{height}x{width}; pass channels_last=True or False."
            )
        if not (chw_fits or hwc_fits):
            raise ValueError(
                f"probs shape {probs.shape} does not match the image size {height}x{width} as "
                "(C, H, W) or (H, W, C); resize probabilities to the image size first."
            )
        channels_last = hwc_fits
    elif (channels_last and not hwc_fits) or (not channels_last and not chw_fits):
        layout = "(H, W, C)" if channels_last else "(C, H, W)"
        raise ValueError(
            f"probs shape {probs.shape} is not {layout} for an image of {height}x{width}."
        )
    chw = np.moveaxis(probs, -1, 0) if channels_last else probs
    return chw, channels_last


def unary_from_probs(probs_chw: np.ndarray) -> np.ndarray:
    """Unary energy (C, H*W) float32, C-contiguous: ``-log`` of probabilities clipped to 1e-5."""
    num_classes = probs_chw.shape[0]
    clipped = np.clip(probs_chw, UNARY_CLIP, 1.0)
    return np.ascontiguousarray(-np.log(clipped).reshape(num_classes, -1).astype(np.float32))


def dense_crf(
    image_uint8_hwc: np.ndarray,
    probs: np.ndarray,
    *,
    n_iters: int = 10,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 80,
    bilateral_srgb: float = 13,
    bilateral_compat: float = 10,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Refines class probabilities with a dense CRF; returns float32 probs in the input layout.

    ``image_uint8_hwc``: (H, W, 3) uint8 RGB; read-only or strided arrays are fine (e.g.
    ``np.asarray(PIL.Image)``). ``probs``: (C, H, W) or (H, W, C) non-negative class
    probabilities (the layout is inferred from the image size unless ``channels_last`` is
    given). Output: same shape as ``probs``, the CRF marginals after ``n_iters`` steps.
    """
    densecrf = _densecrf_module()
    image = np.asarray(image_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}; convert "
            "with np.clip(x * 255, 0, 255).astype(np.uint8) (and drop any alpha channel)."
        )
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}.")
    height, width = image.shape[:2]
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating point probabilities, got dtype {probs.dtype}.")
    probs_chw, was_channels_last = _probs_to_chw(probs, height, width, channels_last)
    if not np.isfinite(probs_chw).all() or (probs_chw < 0).any():
        raise ValueError(
            "probs must be finite and non-negative (softmax probabilities, not logits)."
        )
    num_classes = probs_chw.shape[0]
    if num_classes < 2:
        raise ValueError(f"dense CRF needs at least 2 classes, got {num_classes}.")

    crf = densecrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary_from_probs(probs_chw))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    # pydensecrf's typed memoryview needs a writable C-contiguous buffer; arrays from
    # ``np.asarray(PIL.Image)`` are read-only, so always hand it a private copy.
    rgbim = np.array(image, dtype=np.uint8, copy=True, order="C")
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy,
        srgb=bilateral_srgb,
        rgbim=rgbim,
        compat=bilateral_compat,
    )
    marginals = np.asarray(crf.inference(n_iters), dtype=np.float32)
    marginals = marginals.reshape(num_classes, height, width)
    return np.moveaxis(marginals, 0, -1).copy() if was_channels_last else marginals
