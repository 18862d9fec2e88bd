"""A CPU demo: WSSS SLRNet on the embedded synthetic_shapes set, no download, about ten minutes.

The network is the reference architecture at 1/8 of the channels (``model.width``); images are
64 px with five shape classes (slr_jax/data/synthetic.py); losses, pseudo labels, optimiser
groups and schedule are the WSSS ones of configs/voc.py with fewer epochs and the PAMR
dilations scaled to the small masks. There is no ImageNet backbone for this set, so the demo
trains from random weights and lifts the reference's freezes, which only make sense for an
ImageNet start: the stem trains, the backbone BatchNorms use batch statistics, and every
residual branch starts at zero (without that the full backbone does not learn the image labels
from scratch, docs/results.md). Training ends with an evaluation of the synthetic validation
split (mIoU printed and written under WORKDIR/eval/).

    python -m slr_jax.main --config=configs/demo.py --workdir=/tmp/slr_demo
"""

from configs import common


def get_config():
    config = common.get_config()
    config.model.num_classes = 6
    config.model.width = 0.125
    config.model.train_backbone_norm = True  # from scratch (see above)
    config.model.zero_init_residual = True
    config.train.freeze_stem = False
    config.loss.pamr_dilations = (1, 2, 4)
    config.dataset.name = "synthetic"
    config.dataset.num_train = 256
    config.dataset.num_val = 32
    config.dataset.image_size = 64
    config.dataset.crop_size = 64
    config.train.batch_size = 8
    config.train.num_epochs = 8
    config.train.pretrain_epochs = 2
    config.train.lr = 1e-2
    config.train.log_every_steps = 16
    config.train.image_every_steps = 64
    config.checkpoint.every_steps = 64
    config.test.scales = (1.0, 0.75)
    config.test.top_k = 3
    return common.finalise(config)
