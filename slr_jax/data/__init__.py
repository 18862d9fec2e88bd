"""Data: the synthetic shapes set, the VOC (+SBD) reader, transforms and tf.data pipelines.

Entry points: ``pipeline.train_dataset(config)`` and ``pipeline.eval_dataset(config)``; the
batch layout is documented in ``slr_jax/data/pipeline.py``.
"""

from slr_jax.data import builders  # noqa: F401  (registers voc_sbd, coco_seg, synthetic_shapes)
from slr_jax.data.pipeline import eval_dataset, eval_examples, num_train_examples, train_dataset
from slr_jax.data.synthetic import make_synthetic_examples, write_synthetic_voc
from slr_jax.errors import DataError

__all__ = [
    "DataError",
    "eval_dataset",
    "eval_examples",
    "make_synthetic_examples",
    "num_train_examples",
    "train_dataset",
    "write_synthetic_voc",
]
