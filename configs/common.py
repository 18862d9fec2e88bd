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
VOC_TEST_SCALES = (1.0, 1.5, 2.0, 0.5, 0.75)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache, so that a second run compiles nothing: '' = a
    # compile_cache/ folder in the workdir (training) or the output folder (evaluate/infer);
    # a path = that folder (e.g. one shared by every run); 'none' = off.
    config.compile_cache_dir = ""

    # ------------------------------------------------------------------ model
    config.model = ml_collections.ConfigDict()
    config.model.variant = "wsss"  # wsss | semi | semi_wo_cls | coco
    config.model.num_classes = 21  # background included
    config.model.width = 1.0  # channel multiplier; 1.0 is the reference WideResNet38
    config.model.num_iters = 1  # low-rank factorisation iterations while training
    config.model.use_low_rank = True  # False: the ablation without the low-rank module
    config.model.temperature = 1.0
    config.model.scale_factor = 0.5  # size of the second view
    config.model.dtype = "float32"  # or bfloat16 (parameters stay float32)
    config.model.remat = False  # rematerialise backbone blocks to save memory

    # ------------------------------------------------------------------- loss
    config.loss = ml_collections.ConfigDict()
    config.loss.loss_coeff = (1.0, 4.0, 4.0, 1.0)  # cls, mask consistency, code consistency, seg
    config.loss.aux_weight = 0.4
    config.loss.pamr_iters = 10
    config.loss.pamr_dilations = (1, 2, 4, 8, 12, 24)
    config.loss.cutoff_top = 0.6
    config.loss.cutoff_low = 0.2
    config.loss.bg_scale = 0.7  # background threshold scale (0.9 for semi_wo_cls)
    config.loss.pamr_bg_pow = 3.0  # semi_wo_cls: background^pow before PAMR
    config.loss.pos_weight = 1.0  # COCO BCE positive weight
    config.loss.class_weights = ()  # COCO per-class BCE weights (empty: all 1)

    # ---------------------------------------------------------------- dataset
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "voc"  # voc | synthetic | coco
    config.dataset.source = ""  # folder | tfds ('' = folder, tfds for coco); see data/pipeline.py
    config.dataset.tfds_name = ""  # tfds builder ('' = voc_sbd / synthetic_shapes / coco_seg)
    config.dataset.manual_dir = ""  # folder holding VOCdevkit/VOC2012 (+ SBD lists)
    config.dataset.data_dir = ""  # where derived data (e.g. the synthetic set) is written
    config.dataset.train_split = "train_aug"
    config.dataset.val_split = "val"
    config.dataset.labeled_split = ""  # semi settings: the pixel-labelled list ('train')
    config.dataset.oversample_rate = 1
    config.dataset.crop_size = 321
    config.dataset.scale_range = (0.9, 1.0)
    config.dataset.ratio_range = (3.0 / 4.0, 4.0 / 3.0)
    config.dataset.flip_prob = 0.5
    config.dataset.color_jitter = (0.3, 0.3, 0.3, 0.1)
    config.dataset.image_labels_file = ""
    # Before training, read the header of every listed training and validation file and refuse
    # missing, empty or unreadable files and masks of the wrong size (a few ms per file).
    config.dataset.check_files = True
    config.dataset.num_parallel_calls = 0  # 0: tf.data AUTOTUNE
    config.dataset.prefetch = 0  # 0: tf.data AUTOTUNE
    # synthetic_shapes only
    config.dataset.num_train = 0
    config.dataset.num_val = 0
    config.dataset.image_size = 0
    config.dataset.synthetic_seed = 0
    config.dataset.synthetic_clutter_texture_prob = 0.5  # share of clutter in class textures

    # ------------------------------------------------------------------ train
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 16  # global, over all processes and devices
    config.train.num_epochs = 30
    config.train.pretrain_epochs = 5  # seg loss on and cosine lr from epoch pretrain_epochs+1
    config.train.total_steps = 0  # > 0 overrides num_epochs (epochs scaled to fit)
    config.train.lr = 5e-4
    config.train.weight_decay = 5e-4
    config.train.momentum = 0.9
    config.train.nesterov = True
    config.train.lr_multipliers = (1.0, 2.0, 10.0, 20.0)
    config.train.init_checkpoint = ""  # converted ImageNet backbone (python -m slr_jax.convert)
    config.train.log_every_steps = 50
    config.train.image_every_steps = 500  # TensorBoard images (0: never)
    config.train.eval_every_epochs = 0  # 0: evaluate only at the end
    config.train.eval_limit = 0  # evaluate on the first N val images (0: all)
    config.train.max_nonfinite_steps = 0  # non-finite losses tolerated before stopping

    # --------------------------------------------------------------- pretrain
    # Backbone classification pretraining on the training split's image labels, for data with
    # no ImageNet backbone (slr_jax/pretrain.py); runs when steps > 0 and train.init_checkpoint
    # is empty. Not in the reference, which always starts from ImageNet weights.
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.steps = 0
    config.pretrain.lr = 1e-2
    config.pretrain.weight_decay = 5e-4
    config.pretrain.momentum = 0.9

    # ------------------------------------------------------------- checkpoint
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000  # also saved at every epoch end
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True

    # ------------------------------------------------------------------- test
    config.test = ml_collections.ConfigDict()
    config.test.scales = VOC_TEST_SCALES
    config.test.flip = True
    config.test.num_iters = 1
    config.test.fp_cut = 0.3
    config.test.top_k = 6
    config.test.bg_pow = 3.0
    config.test.use_crf = False
    config.test.use_image_labels = False
    config.test.resize = "pil_bicubic"
    config.test.mode = "test"
    # 0: the reference's exact computation, one compiled program per view size. > 0: views
    # padded to k * bucket_step + 1 px, one program per size bucket, at a cost in accuracy
    # that docs/inference.md measures.
    config.test.bucket_step = 0
    config.test.bucket_pad = "constant"  # constant (ImageNet mean) | edge | reflect | symmetric
    config.test.resume = True  # skip images whose outputs this run's settings already wrote
    config.test.save_overlays = False  # overlay/STEM.png: prediction (| ground truth) blends
    # Dense CRF (utils/dcrf.py of the reference).
    config.test.crf = ml_collections.ConfigDict(
        dict(n_iters=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80,
             bilateral_srgb=13, bilateral_compat=10)
    )  # fmt: skip
    config.test.class_pows = ml_collections.ConfigDict()  # {class id: power}, Python configs only
    return config


def finalise(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks ``config`` so unknown keys cannot be added (by code or by flags)."""
    config.lock()
    return config
