"""A CPU demo: WSSS SLRNet on the embedded synthetic_shapes set, no download, under ten minutes.

The network is the reference architecture at 1/8 of the channels (``model.width``); images are
64 px with five shape classes (slr_jax/data/synthetic.py) on clutter of plain colours: with
the default clutter (half of it in the classes' textures) this recipe stays far below the
target in ten minutes (docs/results.md). There is no ImageNet backbone for
this set, so the run starts with its stand-in (``config.pretrain``, slr_jax/pretrain.py): the
backbone is first trained as a multi-label classifier on the same image labels (800 steps, about
1.5 min), then SLRNet trains from it with the reference's WSSS recipe of configs/voc.py: the
stem and every backbone BatchNorm frozen, the same losses, pseudo labels, optimiser groups and
schedule; fewer epochs, a larger base learning rate (5e-3; the reference's 5e-4 is for 30 epochs
of 10582 images), the PAMR dilations scaled to the small masks and a second view at 3/4 instead
of 1/2 of the crop (``model.scale_factor``: half of 64 px leaves that view a 4x4 grid of deep
features, whose blurred masks the consistency term then imposes on the first view; the
reference's half of a 321 px crop keeps 20x20). Training ends with an
evaluation of the synthetic validation split: the network's predictions at the training scale
(it only ever sees 64 px images) with flip and without background re-weighting, without and
with the dense CRF (``crf_miou``), and the training pseudo labels. docs/results.md has the
figures, including every other test setting measured.

    python -m slr_jax.main --config=configs/demo.py --workdir=/tmp/slr_demo
"""

from configs import common


def get_config():
    config = common.get_config()
    config.model.num_classes = 6
    config.model.width = 0.125
    config.model.scale_factor = 0.75  # second view 48 px (the reference: 0.5 of 321 px)
    config.pretrain.steps = 800
    config.pretrain.lr = 0.025
    config.loss.pamr_dilations = (1, 2, 4)
    config.dataset.name = "synthetic"
    config.dataset.num_train = 256
    config.dataset.num_val = 32
    config.dataset.image_size = 64
    config.dataset.synthetic_clutter_texture_prob = 0.0  # plain clutter (see above)
    config.dataset.crop_size = 64
    config.train.batch_size = 8
    config.train.num_epochs = 24
    config.train.pretrain_epochs = 2
    config.train.lr = 5e-3
    config.train.log_every_steps = 16
    config.train.image_every_steps = 128
    config.checkpoint.every_steps = 128
    config.test.scales = (1.0,)
    config.test.top_k = 3
    config.test.bg_pow = 1.0  # no background re-weighting (the reference's VOC value is 3)
    config.test.use_crf = True
    return common.finalise(config)
