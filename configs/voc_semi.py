"""VOC 2012 + SBD, semi-supervised: 1464 pixel-labelled images plus image labels for the rest.

Values from the reference's ``experiments/slrnet_voc_semi_w_cls_v100x2.yaml``: batch 8, crop
448, the pixel-labelled ``train`` list oversampled 3x, loss coefficients 0.5/2/2/0.5, the rest
as WSSS. Inference uses background power 1 (semi models are trained with pixel labels).
"""

from configs import common


def get_config():
    config = common.get_config()
    common.semi_setting(config, "semi")
    config.dataset.crop_size = 448
    config.train.batch_size = 8
    config.model.bn_stat_groups = common.REFERENCE_GPUS  # per-GPU head BN statistics
    return common.finalise(config)
