"""``python -m slr_jax.infer``: ``python -m slr_jax.main --mode=infer`` with the same flags.

    python -m slr_jax.infer --checkpoint=CKPT --images=PHOTOS --output=OUT \
        [--config=configs/voc.py] [--config.test.use_crf=True] [--save_scores]

Without ``--config`` the settings come from the checkpoint: a training workdir's
``config.json``, or the shipped config of a converted checkpoint's setting.
"""

from slr_jax import main

if __name__ == "__main__":
    main.run(default_mode="infer")
