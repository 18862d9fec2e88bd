"""COCO 2014, weakly supervised with image labels (81 classes).

Values from the reference's ``experiments/coco/coco_slr_wsss_pseudo.yaml``
(``models/slrnet_coco_pseudo.py``): batch 6, crop 321, 20 epochs of 40000 sampled images with
5 of pretraining, cutoffs 0.5/0.1 on max-normalised masks, a BCE classification loss with
positive weight 10 times the per-class weights below, inference scales 1, 0.5, 0.75, 1.5, 2.
The 40000-image epochs are expressed as ``train.total_steps`` (20 * 40000 / 6).
"""

from configs import common

# Per-class BCE weights of the 80 COCO categories (reference experiment file, in category order).
COCO_CLASS_WEIGHTS = (
    0.0580,
    0.9439,
    0.3090,
    1.1062,
    1.1484,
    1.0208,
    0.9967,
    0.6532,
    1.0895,
    0.9073,
    1.3032,
    1.3549,
    1.7261,
    0.6848,
    0.9237,
    0.7763,
    0.7619,
    1.1403,
    1.1233,
    1.1372,
    1.1843,
    1.1465,
    1.0259,
    1.0586,
    0.6450,
    0.9943,
    0.5161,
    1.0647,
    1.2419,
    1.4560,
    1.3231,
    1.4945,
    0.8353,
    1.4468,
    1.2007,
    1.1670,
    1.3137,
    1.3341,
    1.2179,
    0.3373,
    1.1479,
    0.3139,
    0.7700,
    0.6261,
    0.7421,
    0.3778,
    0.9794,
    1.0642,
    1.0816,
    1.0154,
    1.0580,
    1.1336,
    1.5824,
    1.0513,
    1.4388,
    0.9719,
    0.2687,
    0.7155,
    0.6840,
    0.8768,
    0.2607,
    0.8369,
    0.6103,
    0.7912,
    1.1343,
    1.0577,
    0.9783,
    0.7671,
    1.1942,
    0.7544,
    2.6064,
    0.4852,
    0.9054,
    0.5438,
    0.7720,
    0.8335,
    1.4894,
    1.1677,
    2.2971,
    1.4464,
)


def get_config():
    config = common.get_config()
    config.model.variant = "coco"
    config.model.num_classes = 81
    config.loss.cutoff_top = 0.5
    config.loss.cutoff_low = 0.1
    config.loss.pos_weight = 10.0
    config.loss.class_weights = COCO_CLASS_WEIGHTS
    config.dataset.name = "coco"
    config.dataset.source = "tfds"  # the coco_seg builder (slr_jax/data/builders.py)
    config.dataset.train_split = "train"
    config.dataset.val_split = "val"
    config.train.batch_size = 6
    config.model.bn_stat_groups = common.REFERENCE_GPUS  # per-GPU head BN statistics
    config.train.num_epochs = 20
    config.train.pretrain_epochs = 5
    config.train.total_steps = 20 * 40000 // 6
    config.test.scales = (1.0, 0.5, 0.75, 1.5, 2.0)
    return common.finalise(config)
