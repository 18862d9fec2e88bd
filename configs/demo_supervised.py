"""CPU demo, fully supervised baseline: the same network trained on the 8 pixel-labelled
synthetic images of configs/demo_semi*.py alone, with plain cross-entropy.

configs/demo.py's network (width 1/8, heads of the ``semi_wo_cls`` variant, which predict
background themselves) and budget (768 steps of batch 8, lr 5e-3, the same schedule), trained
with ``loss.objective='supervised'`` (cross-entropy with ignore on the main head + 0.4 x on the
aux head) on the first 8 training images only (``dataset.labeled_only``); the backbone is
pretrained on their image labels as in configs/demo_semi_wo_cls.py. Inference as semi_wo_cls.

    python -m slr_jax.main --config=configs/demo_supervised.py --workdir=/tmp/slr_demo_supervised
"""

from configs import demo


def get_config():
    config = demo.get_config()
    config.model.variant = "semi_wo_cls"
    config.loss.objective = "supervised"
    config.dataset.labeled_split = "train"
    config.dataset.num_labeled = 8
    config.dataset.labeled_only = True
    config.train.total_steps = 768  # the WSSS demo's budget: 24 epochs of 32 steps
    config.train.image_every_steps = 0  # no pseudo labels to show
    return config
