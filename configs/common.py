"""Defaults shared by every slr_jax config (the reference's VOC WSSS values).

Each setting's file (``voc.py``, ``voc_semi.py``, ``voc_semi_wo_cls.py``, ``coco.py``,
``demo.py``) starts from :func:`get_config` here and changes only what differs; the comments
name the reference file a value comes from (``experiments/*.yaml`` and ``tools/*.py`` of
github.com/DesertsP/SLRNet). The returned ConfigDict is locked: a command-line override of a
key that does not exist (``--config.train.lrr=1``) or of the wrong type fails at start-up.
"""

from __future__ import annotations

import ml_collections

# Reference inference command-line defaults (tools/infer_voc.py).
# The reference's documented training runs: nn.DataParallel on two GPUs ("v100x2").
REFERENCE_GPUS = 2
VOC_TEST_SCALES = (1.0, 1.5, 2.0, 0.5, 0.75)


def _model() -> ml_collections.ConfigDict:
    """Network architecture and numerics."""
    model = ml_collections.ConfigDict()
    model.arch = "slrnet"  # slrnet | deeplab (the stage-2 DeepLabV3+, slr_jax/models/deeplab.py)
    model.variant = "wsss"  # wsss | semi | semi_wo_cls | coco
    model.num_classes = 21  # background included
    model.width = 1.0  # channel multiplier; 1.0 is the reference WideResNet38
    model.num_iters = 1  # low-rank factorisation iterations while training
    model.use_low_rank = True  # False: the ablation without the low-rank module
    model.temperature = 1.0
    model.scale_factor = 0.5  # size of the second view
    model.dtype = "float32"  # or bfloat16 (parameters stay float32)
    model.remat = False  # rematerialise backbone blocks to save memory
    # Head BatchNorm training statistics over this many groups of consecutive examples of the
    # global batch, whatever the device count: 1 = the whole batch (SyncBatchNorm); N = the
    # reference's nn.DataParallel on N GPUs (the VOC/COCO configs: REFERENCE_GPUS).
    model.bn_stat_groups = 1
    # deeplab only: ResNet depth, output stride, backbone BatchNorm mode and head dropouts.
    model.depth = 101  # 50 | 101
    model.output_stride = 16  # 16 | 8
    model.train_backbone_norm = True  # False: backbone BatchNorms keep running statistics
    model.aspp_dropout = 0.5
    model.decoder_dropout = (0.5, 0.1)
    return model


def _loss() -> ml_collections.ConfigDict:
    """Loss coefficients, PAMR and pseudo-label thresholds."""
    loss = ml_collections.ConfigDict()
    # slrnet: SLRNet's objective (slr_jax/losses.py); supervised: cross-entropy on the pixel
    # labels (255 ignored) + aux_weight x that of an aux head, if the model has one.
    loss.objective = "slrnet"
    loss.loss_coeff = (1.0, 4.0, 4.0, 1.0)  # cls, mask consistency, code consistency, seg
    loss.aux_weight = 0.4
    loss.pamr_iters = 10
    loss.pamr_dilations = (1, 2, 4, 8, 12, 24)
    loss.cutoff_top = 0.6
    loss.cutoff_low = 0.2
    loss.bg_scale = 0.7  # background threshold scale (0.9 for semi_wo_cls)
    loss.pamr_bg_pow = 3.0  # semi_wo_cls: background^pow before PAMR
    loss.pos_weight = 1.0  # COCO BCE positive weight
    loss.class_weights = ()  # COCO per-class BCE weights (empty: all 1)
    return loss


def _dataset() -> ml_collections.ConfigDict:
    """Which data, where it lives and how it is augmented."""
    dataset = ml_collections.ConfigDict()
    dataset.name = "voc"  # voc | synthetic | coco
    dataset.source = ""  # folder | tfds ('' = folder, tfds for coco); see data/pipeline.py
    dataset.tfds_name = ""  # tfds builder ('' = voc_sbd / synthetic_shapes / coco_seg)
    dataset.manual_dir = ""  # folder holding VOCdevkit/VOC2012 (+ SBD lists)
    dataset.data_dir = ""  # where derived data (e.g. the synthetic set) is written
    dataset.train_split = "train_aug"
    dataset.val_split = "val"
    dataset.labeled_split = ""  # semi settings: the pixel-labelled list ('train')
    dataset.oversample_rate = 1
    # > 0: only the first num_labeled ids of labeled_split (of train_split when labeled_split
    # is '') are pixel-labelled.
    dataset.num_labeled = 0
    dataset.labeled_only = False  # train on the pixel-labelled examples only (a supervised run)
    # A folder of <id>.png label maps (e.g. exported pseudo labels) that replace the training
    # split's masks ('' = the dataset's own); every training id needs one of its image's size.
    dataset.pseudo_label_dir = ""
    dataset.crop_size = 321
    dataset.scale_range = (0.9, 1.0)
    dataset.ratio_range = (3.0 / 4.0, 4.0 / 3.0)
    dataset.flip_prob = 0.5
    dataset.color_jitter = (0.3, 0.3, 0.3, 0.1)
    dataset.image_labels_file = ""
    # Before training, read the header of every listed training and validation file and refuse
    # missing, empty or unreadable files and masks of the wrong size (a few ms per file).
    dataset.check_files = True
    dataset.num_parallel_calls = 0  # 0: tf.data AUTOTUNE
    dataset.prefetch = 0  # 0: tf.data AUTOTUNE
    # synthetic_shapes only
    dataset.num_train = 0
    dataset.num_val = 0
    dataset.image_size = 0
    dataset.synthetic_seed = 0
    dataset.synthetic_clutter_texture_prob = 0.5  # share of clutter in class textures
    return dataset


def _train() -> ml_collections.ConfigDict:
    """Optimiser, schedule, logging and evaluation cadence."""
    train = ml_collections.ConfigDict()
    train.batch_size = 16  # global, over all processes and devices
    train.num_epochs = 30
    train.pretrain_epochs = 5  # seg loss on and cosine lr from epoch pretrain_epochs+1
    train.total_steps = 0  # > 0 overrides num_epochs (epochs scaled to fit)
    train.lr = 5e-4
    train.weight_decay = 5e-4
    train.momentum = 0.9
    train.nesterov = True
    train.lr_multipliers = (1.0, 2.0, 10.0, 20.0)
    train.init_checkpoint = ""  # converted ImageNet backbone (python -m slr_jax.convert)
    train.log_every_steps = 50
    train.image_every_steps = 500  # TensorBoard images (0: never)
    train.eval_every_epochs = 0  # 0: evaluate only at the end
    train.eval_limit = 0  # evaluate on the first N val images (0: all)
    train.max_nonfinite_steps = 0  # non-finite losses tolerated before stopping
    return train


def _pretrain() -> ml_collections.ConfigDict:
    """Backbone classification pretraining on the training split's image labels.

    For data with no ImageNet backbone (slr_jax/pretrain.py); runs when steps > 0 and
    train.init_checkpoint is empty. Not in the reference, which always starts from ImageNet
    weights.
    """
    pretrain = ml_collections.ConfigDict()
    pretrain.steps = 0
    pretrain.lr = 1e-2
    pretrain.weight_decay = 5e-4
    pretrain.momentum = 0.9
    return pretrain


def _checkpoint() -> ml_collections.ConfigDict:
    """Orbax checkpoint cadence and retention."""
    checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = 1000  # also saved at every epoch end
    checkpoint.keep = 3
    checkpoint.async_save = True
    return checkpoint


def _test() -> ml_collections.ConfigDict:
    """Evaluation and inference (the reference's test settings)."""
    test = ml_collections.ConfigDict()
    test.scales = VOC_TEST_SCALES
    test.flip = True
    test.num_iters = 1
    test.fp_cut = 0.3
    test.top_k = 6
    test.bg_pow = 3.0
    test.use_crf = False
    test.use_image_labels = False
    test.resize = "pil_bicubic"
    test.mode = "test"
    # Exact padding (SLRNet, mode 'test'): an image whose longer side fits in a size B of this
    # list is predicted as if padded to B x B, with the reference's numbers (the padding enters
    # nothing): one compiled program per (B, scale). () = every image size compiles its own.
    test.bucket_sizes = (64, 128, 256, 512, 1024, 2048)
    # > 0: the approximate buckets instead (any network, e.g. stage 2's DeepLab): views padded
    # to k * bucket_step + 1 px and the network sees the padding (docs/inference.md section 7).
    test.bucket_step = 0
    test.bucket_pad = "constant"  # constant (ImageNet mean) | edge | reflect | symmetric
    test.resume = True  # skip images whose outputs this run's settings already wrote
    test.save_overlays = False  # overlay/STEM.png: prediction (| ground truth) blends
    # Dense CRF (utils/dcrf.py of the reference).
    test.crf = ml_collections.ConfigDict(
        dict(n_iters=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80,
             bilateral_srgb=13, bilateral_compat=10)
    )  # fmt: skip
    test.class_pows = ml_collections.ConfigDict()  # {class id: power}, Python configs only
    return test


def _stage1() -> ml_collections.ConfigDict:
    """Two-stage training: the first stage whose exported predictions are the pseudo labels.

    With ``config`` set, a training run whose pseudo labels (``dataset.pseudo_label_dir``, or
    ``WORKDIR_1/pseudo_labels/crf`` (``pred`` without CRF) when that is '') are missing first
    trains ``config`` in ``workdir`` (resuming it; a finished one is reused), then exports its
    predictions on the training split there (slr_jax/stage2.py).
    """
    stage1 = ml_collections.ConfigDict()
    stage1.config = ""  # first-stage config file (e.g. configs/demo.py); '' = no first stage
    stage1.workdir = ""  # its workdir ('' = WORKDIR/stage1)
    stage1.use_image_labels = True  # export with class presence from the image labels
    return stage1


def get_config() -> ml_collections.ConfigDict:
    """Every default of every key; each setting's file changes only what differs."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache, so that a second run compiles nothing: '' = a
    # compile_cache/ folder in the workdir (training) or the output folder (evaluate/infer);
    # a path = that folder (e.g. one shared by every run); 'none' = off.
    config.compile_cache_dir = ""
    config.model = _model()
    config.loss = _loss()
    config.dataset = _dataset()
    config.train = _train()
    config.pretrain = _pretrain()
    config.checkpoint = _checkpoint()
    config.test = _test()
    config.stage1 = _stage1()
    return config


def semi_setting(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The reference's semi-supervised setting on ``config`` (its experiments/*semi*.yaml):
    the pixel-labelled ``train`` list, inference background power 1, and for ``semi`` loss
    coefficients 0.5/2/2/0.5 with the labelled list oversampled 3x; for ``semi_wo_cls`` cutoffs
    0.8/0.6, background scale 0.9, background cubed before PAMR, oversampled 7x."""
    config.model.variant = variant
    config.dataset.labeled_split = "train"
    config.test.bg_pow = 1.0
    if variant == "semi":
        config.loss.loss_coeff = (0.5, 2.0, 2.0, 0.5)
        config.dataset.oversample_rate = 3
    elif variant == "semi_wo_cls":
        config.loss.update(cutoff_top=0.8, cutoff_low=0.6, bg_scale=0.9, pamr_bg_pow=3.0)
        config.dataset.oversample_rate = 7
    else:
        raise ValueError(f"not a semi-supervised variant: {variant!r}")
    return config


def finalise(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks ``config`` so unknown keys cannot be added (by code or by flags)."""
    config.lock()
    return config
