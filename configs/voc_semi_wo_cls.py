"""VOC 2012 + SBD, semi-supervised without image labels: 1464 pixel-labelled images plus
unlabelled images (the heads predict background themselves, no constant background logit).

Values from the reference's ``experiments/slrnet_voc_semi_wo_cls.yaml`` and
``models/slrnet_semi_wo_cls.py``: batch 10, crop 448, 40 epochs with 10 of pretraining, the
labelled list oversampled 7x, cutoffs 0.8/0.6, background threshold scale 0.9 and background
cubed before PAMR; inference without class-presence filtering, background power 1
(``tools/infer_voc_wo_cls.py``).
"""

from configs import common


def get_config():
    config = common.get_config()
    common.semi_setting(config, "semi_wo_cls")
    config.dataset.crop_size = 448
    config.train.batch_size = 10
    config.model.bn_stat_groups = common.REFERENCE_GPUS  # per-GPU head BN statistics
    config.train.num_epochs = 40
    config.train.pretrain_epochs = 10
    return common.finalise(config)
