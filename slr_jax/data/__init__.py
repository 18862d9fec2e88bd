"""Data: the synthetic shapes set, the VOC (+SBD) reader, transforms and tf.data pipelines.

Entry points: ``pipeline.train_dataset(config)`` and ``pipeline.eval_dataset(config)``; the
batch layout is documented in ``slr_jax/data/pipeline.py``.
"""

from slr_jax.data import builders  # noqa: F401  (registers voc_sbd, coco_seg, synthetic_shapes)
from slr_jax.data.pipeline import eval_dataset, num_train_examples, train_dataset
from slr_jax.data.synthetic import make_synthetic_examples, write_synthetic_voc
from slr_jax.data.voc import IGNORE_LABEL, VOC_CLASSES, DataError

__all__ = [
    "IGNORE_LABEL",
    "VOC_CLASSES",
    "DataError",
    "eval_dataset",
    "make_synthetic_examples",
    "num_train_examples",
    "train_dataset",
    "write_synthetic_voc",
]
