"""VOC 2012 + SBD, second stage: DeepLabV3+ (ResNet-101, output stride 16) trained fully
supervised on SLRNet's pseudo labels of train_aug, the paper's two-stage row.

The network is slr_jax/models/deeplab.py (jfzhang95/pytorch-deeplab-xception's head on a
torchvision ResNet-101) trained with plain cross-entropy (``loss.objective='supervised'``, 255
ignored) by the same loop, optimiser groups (backbone x1, head x10), schedule, evaluation and
inference as SLRNet; inference without class filtering or background power. The training
masks are the PNGs of ``dataset.pseudo_label_dir`` (one ``<id>.png`` per train_aug id, the
size of its image: the ``crf/`` (or ``pred/``) folder that ``--mode=infer --split=train_aug``
writes); a missing or mis-sized file stops the run before it starts, named. Without that key
the pseudo labels come from the first stage configs/voc.py in ``stage1.workdir`` (a finished
WSSS run: it is evaluated again, then predicts train_aug with image labels and the CRF of its
config; slr_jax/stage2.py).

Run: ``python -m slr_jax.main --config=configs/voc_stage2.py --workdir=DIR
--config.dataset.manual_dir=/data/VOC+SBD --config.dataset.pseudo_label_dir=LABELS
--config.train.init_checkpoint=CONVERTED_RESNET101`` (``python -m slr_jax.convert --torch
resnet101-63fe2227.pth --out CONVERTED_RESNET101 --setting resnet101``), or
``--config.stage1.workdir=WSSS_RUN`` instead of ``pseudo_label_dir``.
"""

from configs import common


def get_config():
    config = common.get_config()
    config.model.arch = "deeplab"
    config.model.depth = 101
    config.model.output_stride = 16
    config.loss.objective = "supervised"
    config.dataset.crop_size = 321
    config.train.pretrain_epochs = 0  # no warm-up: cosine lr from the second epoch
    config.train.lr = 7e-4  # x10 on the head: 7e-3, the DeepLabV3+ recipe's lr
    config.train.image_every_steps = 0  # no pseudo labels to show
    config.test.bg_pow = 1.0
    config.stage1.config = "configs/voc.py"
    return common.finalise(config)
