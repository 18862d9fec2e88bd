"""What the parity tool compares and how closely: the reference settings, the tolerances, the
input normalisation and the classifier sharpening of the random reference network."""

from __future__ import annotations

import numpy as np

from configs.common import VOC_TEST_SCALES
from slr_jax import constants

IMAGENET_MEAN = np.asarray(constants.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(constants.IMAGENET_STD, np.float32)
OUTPUT_TOL = 1e-5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
TIE_EPS = 1e-6
DEFAULT_SCALES = VOC_TEST_SCALES  # the reference's inference scales
LOSS_COEFF = (1.0, 4.0, 4.0, 1.0)
CLASSIFIER_SCALE = 4.0
CLASSIFIER_BIAS = -2.0

# setting -> (reference module, reference constructor kwargs, our loss config overrides)
SETTINGS = {
    "wsss": ("models.slrnet", {}, dict(cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)),
    "semi": ("models.slrnet_semi", {}, dict(cutoff_top=0.6, cutoff_low=0.2, bg_scale=0.7)),
    "semi_wo_cls": (
        "models.slrnet_semi_wo_cls",
        dict(cutoff_top=0.8, cutoff_low=0.6),
        dict(cutoff_top=0.8, cutoff_low=0.6, bg_scale=0.9),
    ),
    "coco": (
        "models.slrnet_coco_pseudo",
        dict(num_classes=81, cutoff_top=0.5, cutoff_low=0.1, pos_weight=10.0),
        dict(cutoff_top=0.5, cutoff_low=0.1, bg_scale=0.7, pos_weight=10.0),
    ),
}


def num_classes_of(setting: str) -> int:
    """Classes (background included) of the reference network of ``setting``."""
    return 81 if setting == "coco" else 21
