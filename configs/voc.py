"""VOC 2012 + SBD, weakly supervised with image labels (SLRNet WSSS).

Values from the reference's ``experiments/slrnet_voc_wss_v100x2.yaml`` (2 x V100, batch 16,
crop 321, 30 epochs with 5 of classification-only pretraining, lr 5e-4, loss coefficients
1/4/4/1, PAMR 10 iterations with dilations 1..24, cutoffs 0.6/0.2) and ``tools/infer_voc.py``
(scales 1, 1.5, 2, 0.5, 0.75 with flips, fp_cut 0.3, top-6, background power 3).

Run: ``python -m slr_jax.main --config=configs/voc.py --workdir=DIR
--config.dataset.manual_dir=/data/VOC+SBD --config.train.init_checkpoint=CONVERTED_BACKBONE``.
"""

from configs import common


def get_config():
    config = common.get_config()
    # Everything in common.py is already the VOC WSSS setting, but for the per-GPU head
    # BatchNorm statistics of the reference's two-GPU run (batch 16 = 2 x 8).
    config.model.bn_stat_groups = common.REFERENCE_GPUS
    return common.finalise(config)
