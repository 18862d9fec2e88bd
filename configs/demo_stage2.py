"""CPU demo, second stage: DeepLabV3+ (ResNet-50 at 1/4 of the channels, random init) trained
fully supervised on the WSSS demo's pseudo labels of the 256 synthetic training images.

One command from a fresh workdir:

    python -m slr_jax.main --config=configs/demo_stage2.py --workdir=/tmp/slr_demo_stage2

Where it looks for the pseudo labels: ``dataset.pseudo_label_dir`` when given (one
``<id>.png`` per training image); otherwise ``WORKDIR_1/pseudo_labels/crf/``, where
``WORKDIR_1`` is ``stage1.workdir`` ('' = ``WORKDIR/stage1``). When they are not complete there,
the WSSS demo (configs/demo.py) is trained in ``WORKDIR_1`` first (a finished run there, e.g.
``--config.stage1.workdir=/tmp/slr_demo``, is only evaluated again), then predicts the training
split with flip, the image labels and the dense CRF (slr_jax/stage2.py). Its train-split
scores are in ``WORKDIR_1/pseudo_labels/scores_{pred,crf}/``.

The second stage (``model.arch='deeplab'``, ``loss.objective='supervised'``) runs the same loop,
data pipeline (crop 64, flip, colour jitter), optimiser groups (backbone x1, head x10) and
budget as the demo (768 steps of batch 8, lr 5e-3) at output stride 8 (a 64 px image leaves an
8x8 grid), and is evaluated like it (scale 1 with flip, without and with the dense CRF; no
class filtering, no background power). As the demo's WideResNet38, its ResNet starts from the
stand-in for ImageNet weights: 800 steps of classification on the training images' image
labels (slr_jax/pretrain.py, zero-initialised residual branches); a ResNet trained from random
weights on these 256 images barely moves off the class prior in 768 steps.
"""

from configs import demo


def get_config():
    config = demo.get_config()
    config.model.arch = "deeplab"
    config.model.depth = 50
    config.model.width = 0.25
    config.model.output_stride = 8
    config.loss.objective = "supervised"
    config.train.pretrain_epochs = 2
    config.train.image_every_steps = 0  # no pseudo labels to show
    config.stage1.config = "configs/demo.py"
    return config
