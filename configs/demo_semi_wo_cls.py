"""CPU demo, semi-supervised without image labels: 8 of the 256 synthetic training images
pixel-labelled, the rest unlabelled (configs/demo.py's data, network and budget).

The WSSS demo's recipe (configs/demo.py) with the setting of configs/voc_semi_wo_cls.py: variant
``semi_wo_cls`` (the heads predict background themselves), cutoffs 0.8/0.6, background
threshold scale 0.9, background cubed before PAMR, the pixel-labelled list (the first 8 ids,
``dataset.num_labeled``) oversampled 7x, seg loss of the unlabelled images from the 7th of 24
epochs (the reference: 10 of 40), inference without class filtering and with background power
1. The backbone pretraining on image labels (the stand-in for ImageNet weights) sees only the
8 pixel-labelled images, whose labels their masks give (slr_jax/pretrain.py).
``train.total_steps`` keeps the WSSS demo's 768 steps.

    python -m slr_jax.main --config=configs/demo_semi_wo_cls.py --workdir=/tmp/slr_demo_semi_wo_cls
"""

from configs import common, demo


def get_config():
    config = demo.get_config()
    common.semi_setting(config, "semi_wo_cls")
    config.dataset.num_labeled = 8
    config.train.pretrain_epochs = 6
    config.train.total_steps = 768  # the WSSS demo's budget: 24 epochs of 32 steps
    return config
