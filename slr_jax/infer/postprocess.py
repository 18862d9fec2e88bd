"""From averaged class maps to a label map: class presence, background power, dense CRF, argmax.

The reference's post-processing (``tools/infer_voc.py``, ``infer_voc_wo_cls.py``,
``infer_coco.py``): class presence from the image labels when given, else
``sigmoid(cls) > fp_cut`` among the ``top_k`` highest scores; absent foreground channels are
zeroed and the background channel raised to ``bg_pow`` (the ``semi_wo_cls`` variant skips both
steps). Probabilities are NOT renormalised before the argmax or the CRF, exactly as in the
reference. With the CRF, the same adjusted probabilities are refined before the argmax.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from slr_jax.errors import InferenceError
from slr_jax.infer.crf import dense_crf

CRF_KEYS = (
    "n_iters",
    "gaussian_sxy",
    "gaussian_compat",
    "bilateral_sxy",
    "bilateral_srgb",
    "bilateral_compat",
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic function."""
    x = np.asarray(x, np.float32)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def class_presence(cls: np.ndarray, *, fp_cut: float, top_k: int) -> np.ndarray:
    """(C-1,) bool: ``sigmoid(cls) > fp_cut`` and at least the ``top_k``-th highest score."""
    cls = np.asarray(cls, np.float32).reshape(-1)
    if top_k < 1:
        raise InferenceError(f"top_k must be >= 1, got {top_k}.")
    scores = sigmoid(cls)
    kth_best = np.sort(scores)[::-1][min(int(top_k), scores.size) - 1]
    return (scores > fp_cut) & (scores >= kth_best)


def _present_classes(
    cls: np.ndarray, num_fg: int, test_cfg: Any, image_labels: np.ndarray | None
) -> np.ndarray:
    """(C-1,) float32 multi-hot: the image labels when given, else :func:`class_presence`."""
    if image_labels is not None:
        present = np.asarray(image_labels, np.float32).reshape(-1)
    else:
        cls = np.asarray(cls, np.float32).reshape(-1)
        if cls.size != num_fg:
            raise InferenceError(
                f"cls has {cls.size} scores but masks have {num_fg} foreground channels."
            )
        presence = class_presence(cls, fp_cut=float(test_cfg["fp_cut"]), top_k=test_cfg["top_k"])
        present = presence.astype(np.float32)
    if present.size != num_fg:
        raise InferenceError(
            f"image_labels has {present.size} entries but masks have {num_fg} foreground "
            "channels; pass a (C-1,) multi-hot vector without background."
        )
    return present


def adjust_probabilities(
    cls: np.ndarray,
    masks: np.ndarray,
    test_cfg: Any,
    *,
    image_labels: np.ndarray | None = None,
    filter_classes: bool = True,
) -> np.ndarray:
    """The reference's post-processing of averaged masks (H, W, C) -> (H, W, C) float32.

    ``test_cfg``: ``config.test`` (read: ``fp_cut``, ``top_k``, ``bg_pow``, ``class_pows``).
    With ``filter_classes`` (all variants but ``semi_wo_cls``): foreground channels of absent
    classes are zeroed (presence from ``image_labels`` (C-1,) multi-hot when given, else
    :func:`class_presence` of ``cls`` (C-1,)), then background ** ``bg_pow``. ``class_pows``
    {class: power} raises further channels afterwards (COCO: ``{1: 2 * bg_pow}`` for person).
    """
    probs = np.array(masks, dtype=np.float32, copy=True)
    if probs.ndim != 3:
        raise InferenceError(f"masks must be (H, W, C), got shape {probs.shape}.")
    num_fg = probs.shape[-1] - 1
    if filter_classes:
        probs[..., 1:] *= _present_classes(cls, num_fg, test_cfg, image_labels)
        probs[..., 0] = probs[..., 0] ** np.float32(test_cfg["bg_pow"])
    for class_id, power in dict(test_cfg["class_pows"]).items():
        if not 0 <= int(class_id) <= num_fg:
            raise InferenceError(f"class_pows names class {class_id} outside 0..{num_fg}.")
        probs[..., int(class_id)] = probs[..., int(class_id)] ** np.float32(power)
    return probs


def crf_settings(crf: Mapping[str, Any]) -> dict[str, float]:
    """Validated keyword arguments for :func:`slr_jax.infer.crf.dense_crf`."""
    crf = dict(crf)
    unknown = sorted(set(crf) - set(CRF_KEYS))
    if unknown:
        raise InferenceError(f"unknown CRF settings {unknown}; expected some of {CRF_KEYS}.")
    return crf


def labels_from_probabilities(
    probs: np.ndarray,
    *,
    crf: Mapping[str, Any] | None = None,
    image_uint8: np.ndarray | None = None,
) -> np.ndarray:
    """Argmax (H, W) uint8 of (H, W, C) probabilities; with ``crf`` (``config.test.crf``)
    after the dense CRF, whose bilateral term compares colours of ``image_uint8`` (H, W, 3)."""
    if probs.shape[-1] > 256:
        raise InferenceError(f"{probs.shape[-1]} classes do not fit a uint8 label map.")
    if crf is not None:
        if image_uint8 is None:
            raise InferenceError(
                "the dense CRF needs image_uint8, the (H, W, 3) uint8 photograph the CRF's "
                "bilateral term compares colours in."
            )
        # A writable copy: pydensecrf rejects read-only buffers (arrays viewing a PIL image).
        image_uint8 = np.array(image_uint8, dtype=np.uint8, copy=True)
        probs = dense_crf(image_uint8, probs, channels_last=True, **crf_settings(crf))
    return np.argmax(probs, axis=-1).astype(np.uint8)


def label_maps(probs: np.ndarray, test_cfg: Any, image_uint8: np.ndarray | None) -> dict:
    """``{'pred': (H, W) uint8}`` argmax of adjusted probabilities (H, W, C) and, with
    ``test_cfg['use_crf']``, ``'crf'``: the argmax after the dense CRF (needs ``image_uint8``)."""
    labels = {"pred": labels_from_probabilities(probs)}
    if test_cfg["use_crf"]:
        labels["crf"] = labels_from_probabilities(
            probs, crf=test_cfg["crf"], image_uint8=image_uint8
        )
    return labels


def masks_to_labels(
    cls: np.ndarray,
    masks: np.ndarray,
    test_cfg: Any,
    *,
    image_labels: np.ndarray | None = None,
    image_uint8: np.ndarray | None = None,
    filter_classes: bool = True,
) -> dict[str, np.ndarray]:
    """Label maps (:func:`label_maps`) from cls (C-1,) logits and masks (H, W, C)
    probabilities, through :func:`adjust_probabilities`."""
    probs = adjust_probabilities(
        cls, masks, test_cfg, image_labels=image_labels, filter_classes=filter_classes
    )
    return label_maps(probs, test_cfg, image_uint8)
