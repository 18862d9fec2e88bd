"""tf.data input pipelines: training batches and full-size evaluation images as NumPy dicts.

Training batch (per process: its rows of the global ``config.train.batch_size`` batch)::

    image       (B, h, w, 3) float32  ImageNet-normalised, (h, w) = crop size
    raw_image   (B, h, w, 3) float32  the same pixels in [0, 1] (after colour jitter)
    labels      (B, C-1)     float32  multi-hot foreground classes
    mask        (B, h, w)    int32    class indices, 255 = ignore; all 255 if not pixel-labelled
    is_labeled  (B,)         bool

Evaluation batch: one full-size image (B = 1, no crop) with the keys above at its own (H, W),
plus ``name`` (1,) str, ``size`` (1, 2) int32 (H, W) and ``is_valid`` (1,) bool (False only
for the padding that gives every process the same number of batches).

Training: the sequence of global batches is a function of the seed alone (one shuffled order of
the examples per epoch, augmentation seeded by the position in the stream); each process reads
its rows of every global batch, so any topology sees the same batches. Evaluation: each process
reads its own shard of the list (``jax.process_index()`` of ``jax.process_count()``).
Decoding and augmentation run in PIL inside ``tf.numpy_function`` (see ``voc.py`` and
``transforms.py`` for why); tf.data supplies shuffling, parallel mapping, batching and
prefetching. TensorFlow is kept off the GPU so it cannot take accelerator memory.

Config keys read (``config.dataset`` unless noted): ``name`` ('voc' | 'synthetic' | 'coco'),
``source``, ``tfds_name``, ``manual_dir``, ``data_dir``, ``train_split``, ``val_split``,
``labeled_split``, ``oversample_rate``, ``num_labeled``, ``labeled_only``,
``pseudo_label_dir``, ``crop_size``, ``scale_range``, ``ratio_range``,
``flip_prob``, ``color_jitter``, ``image_labels_file``, ``num_parallel_calls``, ``prefetch``,
and for 'synthetic' ``num_train``, ``num_val``, ``image_size``; plus ``config.seed``,
``config.model.num_classes`` and ``config.train.batch_size``.

``source`` 'folder' (the default for 'voc' and 'synthetic') reads the VOC-layout folder;
'tfds' (the default for 'coco', which has no folder reader) reads splits of the tfds builder
``tfds_name`` (default 'voc_sbd', 'synthetic_shapes' or 'coco_seg' after ``name``; a config
such as 'synthetic_shapes/tiny' may be named) from ``data_dir``, preparing it from
``manual_dir`` first if needed. It must be stored as array_record: examples are read by index
through ``as_data_source``, so shuffling, sharding, oversampling and augmentation are the
folder path's, and images are decoded with PIL as there. Labels are the stored ``labels``.
On several hosts, prepare the data once beforehand (``python -m slr_jax.data.build voc_sbd
--manual_dir ... --data_dir ...``) rather than on every host.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import re
import shutil
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from slr_jax.constants import IGNORE_LABEL
from slr_jax.data import builders, transforms, voc
from slr_jax.data.build import prepare
from slr_jax.data.synthetic import (
    INFO_FILE,
    LEGACY_INFO_FILES,
    write_synthetic_voc,
)
from slr_jax.data.voc import DataError, VocExample

Batch = dict[str, np.ndarray]
TRAIN_KEYS = ("image", "raw_image", "mask", "labels", "is_labeled")


@functools.cache
def _tf():
    """TensorFlow, imported lazily and hidden from GPUs (it must not grab accelerator memory)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF was initialised elsewhere first; its device list can no longer change.
    atexit.register(_close_live_iterators)  # registered after TF's own, so it runs first
    return tf


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    return int(process_index), int(process_count)


# ----------------------------------------------------------------------------- example lists


def _synthetic_root(cfg: Any) -> Path:
    """Writes the synthetic dataset once (atomically) and returns its VOC-layout folder."""
    dataset = cfg.dataset
    folder = dataset.manual_dir or os.path.join(
        dataset.data_dir or os.path.expanduser("~/slr_jax_data"),
        "synthetic_shapes",
    )
    root = Path(folder).expanduser()
    kwargs = dict(
        num_train=int(dataset.num_train),
        num_val=int(dataset.num_val),
        size=dataset.image_size,
        num_classes=int(cfg.model.num_classes),
        seed=int(dataset.synthetic_seed),
        clutter_texture_prob=float(dataset.synthetic_clutter_texture_prob),
    )
    if isinstance(kwargs["size"], Sequence):
        kwargs["size"] = [int(s) for s in kwargs["size"]]
    info = {**kwargs}
    info_path = root / INFO_FILE
    if info_path.is_file() and json.loads(info_path.read_text() or "null") == info:
        return root
    # Our own folder: this generator's info file, or an earlier generator's (rewritten).
    ours = info_path.is_file() or any((root / name).is_file() for name in LEGACY_INFO_FILES)
    if root.exists() and any(root.iterdir()) and not ours:
        raise DataError(
            f"{root} is not empty and is not a synthetic dataset folder; point "
            "config.dataset.manual_dir at an empty or new folder for the synthetic data."
        )
    # Write next to the target and rename, so concurrent processes never see half a dataset.
    staging = root.parent / f".{root.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_synthetic_voc(staging, **kwargs)
    if ours:
        shutil.rmtree(root)  # Our own folder written with other arguments or generator.
    try:
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # Another process won the race.
    return root


def dataset_root(cfg: Any) -> Path:
    """The VOC-layout folder of ``config.dataset`` (writing the synthetic one when needed)."""
    name = cfg.dataset.name
    if name == "synthetic":
        return _synthetic_root(cfg)
    if name == "voc":
        return voc.resolve_voc_root(cfg.dataset.manual_dir)
    raise ValueError(f"Unknown config.dataset.name {name!r}; expected 'voc' or 'synthetic'.")


def _image_labels(cfg: Any) -> dict[str, list[int]] | None:
    path = cfg.dataset.image_labels_file
    if not path:
        return None
    try:
        with open(path) as handle:
            return {str(k): [int(c) for c in v] for k, v in json.load(handle).items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise DataError(
            f"config.dataset.image_labels_file {path}: expected a JSON object "
            f"{{image_id: [class ids 1..C-1]}} ({error})."
        ) from None


def train_examples(cfg: Any) -> list[VocExample] | list[TfdsExample]:
    """The training list of ``config`` (semi-supervised marking and oversampling applied)."""
    if _uses_tfds(cfg):
        return _tfds_train_examples(cfg)
    root = dataset_root(cfg)
    examples = voc.training_examples(
        root,
        cfg.dataset.train_split,
        labeled_split=cfg.dataset.labeled_split,
        oversample_rate=int(cfg.dataset.oversample_rate),
        num_labeled=int(cfg.dataset.num_labeled),
    )
    if cfg.dataset.pseudo_label_dir:
        examples = voc.with_pseudo_labels(examples, cfg.dataset.pseudo_label_dir)
    voc.check_files(examples, headers=bool(cfg.dataset.check_files))
    return _labeled_only(cfg, examples)


def _labeled_only(cfg: Any, examples: list) -> list:
    """The pixel-labelled examples alone with ``dataset.labeled_only``, else ``examples``."""
    if not cfg.dataset.labeled_only:
        return examples
    kept = [e for e in examples if e.is_labeled]
    if not kept:
        raise DataError(
            "config.dataset.labeled_only is set but no training example is pixel-labelled; "
            "check dataset.labeled_split and dataset.num_labeled."
        )
    return kept


def eval_examples(
    cfg: Any, split: str | None = None, check_files: bool = False
) -> list[VocExample] | list[TfdsExample]:
    """The evaluation list (``config.dataset.val_split`` unless ``split`` is given).

    With ``check_files`` (training does it before it starts) a missing or unreadable file is a
    DataError (``voc.check_files``); without, evaluation reports and skips such examples.
    """
    if _uses_tfds(cfg):
        split = split or cfg.dataset.val_split
        return [TfdsExample(split, index) for index in range(len(_tfds_source(cfg, split)))]
    root = dataset_root(cfg)
    examples = voc.read_split(root, split or cfg.dataset.val_split)
    if check_files:
        voc.check_files(examples, headers=bool(cfg.dataset.check_files))
    return examples


def example_loader(cfg: Any) -> Callable[..., dict[str, Any]]:
    """``load(example, num_classes, image_labels)`` decoding one example of ``config``'s source.

    Returns ``voc.load_example``'s dict; the tfds loader adds ``name``.
    """
    return _tfds_loader(cfg) if _uses_tfds(cfg) else voc.load_example


# ----------------------------------------------------------------------------- tfds source

TFDS_BUILDERS = {"voc": "voc_sbd", "synthetic": "synthetic_shapes", "coco": "coco_seg"}


@dataclasses.dataclass(frozen=True)
class TfdsExample:
    """Record ``index`` of the prepared tfds ``split`` (its name is read with the record)."""

    split: str
    index: int
    is_labeled: bool = True


def _uses_tfds(cfg: Any) -> bool:
    name = cfg.dataset.name
    source = cfg.dataset.source or ("tfds" if name == "coco" else "folder")
    if source not in ("folder", "tfds"):
        raise ValueError(f"Unknown config.dataset.source {source!r}; expected 'folder' or 'tfds'.")
    return source == "tfds"


def _tfds_key(cfg: Any) -> tuple[str, str, str]:
    """(builder name, data_dir, manual_dir) of ``config``."""
    dataset = cfg.dataset
    name = dataset.tfds_name
    if not name:
        dataset_name = dataset.name
        if dataset_name not in TFDS_BUILDERS:
            raise ValueError(
                f"No tfds builder for config.dataset.name {dataset_name!r}; set "
                f"config.dataset.tfds_name or use a name in {sorted(TFDS_BUILDERS)}."
            )
        name = TFDS_BUILDERS[dataset_name]
    data_dir = os.path.expanduser(str(dataset.data_dir or ""))
    return name, data_dir, str(dataset.manual_dir or "")


@functools.cache
def _prepared_builder(name: str, data_dir: str, manual_dir: str):
    return prepare(name, data_dir, manual_dir)


@functools.cache
def _cached_source(name: str, data_dir: str, manual_dir: str, split: str):
    import tensorflow_datasets as tfds

    builder = _prepared_builder(name, data_dir, manual_dir)
    skip = {key: tfds.decode.SkipDecoding() for key in builders.ENCODED_FEATURES}
    try:
        return builder.as_data_source(split, decoders=skip)
    except NotImplementedError:
        raise DataError(
            f"tfds dataset {name} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, but the pipeline reads examples by index and "
            "needs array_record: build it into another data_dir with "
            "`python -m slr_jax.data.build NAME --data_dir NEW_DIR --manual_dir ...`, "
            "which writes array_record."
        ) from None


def _tfds_source(cfg: Any, split: str):
    """The array_record data source of ``split`` (image and mask left encoded)."""
    return _cached_source(*_tfds_key(cfg), split)


def _tfds_names(source) -> list[str]:
    names = []
    for index in range(len(source)):
        name = source[index]["name"]
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


def _tfds_train_examples(cfg: Any) -> list[TfdsExample]:
    """The tfds training list, marked and oversampled as ``voc.training_examples`` does."""
    split = cfg.dataset.train_split
    source = _tfds_source(cfg, split)
    examples = [TfdsExample(split, index) for index in range(len(source))]
    labeled_split = cfg.dataset.labeled_split
    if cfg.dataset.pseudo_label_dir:
        raise DataError(
            "config.dataset.pseudo_label_dir is read with the folder source only; set "
            "config.dataset.source='folder'."
        )
    if not labeled_split and not cfg.dataset.num_labeled:
        return _labeled_only(cfg, examples)
    if str(labeled_split).lower() in voc.NO_PIXEL_LABELS:
        return _labeled_only(cfg, [dataclasses.replace(e, is_labeled=False) for e in examples])
    oversample_rate = cfg.dataset.oversample_rate
    if int(oversample_rate) < 1:
        raise DataError(f"oversample_rate must be an integer >= 1, got {oversample_rate}.")
    names = _tfds_names(source)
    listed = _tfds_names(_tfds_source(cfg, labeled_split)) if labeled_split else names
    labeled = set(voc.first_labeled(listed, int(cfg.dataset.num_labeled)))
    absent = sorted(labeled - set(names))
    if absent:
        raise DataError(
            f"{len(absent)} pixel-labelled id(s) of split {labeled_split!r} are not in the "
            f"training split {split!r}, e.g. {absent[:5]}; the labelled split must be a subset "
            "of the training split."
        )
    marked = [TfdsExample(split, i, name in labeled) for i, name in enumerate(names)]
    repeats = [e for e in marked if e.is_labeled] * (int(oversample_rate) - 1)
    return _labeled_only(cfg, marked + repeats)


def _tfds_loader(cfg: Any) -> Callable[..., dict[str, Any]]:
    key = _tfds_key(cfg)

    def load(example: TfdsExample, num_classes: int, image_labels=None) -> dict[str, Any]:
        record = builders.decode_record(_cached_source(*key, example.split)[example.index])
        labels = record["labels"]
        if labels.shape != (num_classes - 1,):
            raise DataError(
                f"tfds dataset {key[0]} has {labels.shape[0] + 1} classes but "
                f"config.model.num_classes is {num_classes}."
            )
        if image_labels is not None and record["name"] in image_labels:
            labels = voc.labels_from_class_ids(image_labels[record["name"]], num_classes)
        mask = record["mask"]
        if not example.is_labeled:
            mask = np.full(mask.shape, voc.IGNORE_LABEL, np.uint8)
        return {
            "image": record["image"],
            "mask": mask,
            "labels": labels,
            "is_labeled": bool(example.is_labeled),
            "name": record["name"],
        }

    return load


# ----------------------------------------------------------------------------- tf.data


def _data_error_from(error: Exception) -> Exception:
    """The DataError raised inside ``tf.numpy_function``, recovered from TF's wrapper error."""
    match = re.search(r"DataError: (.*)", getattr(error, "message", str(error)))
    if match:
        return DataError(match.group(1).strip())
    return error


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _close_live_iterators() -> None:
    # A tf.data iterator whose map calls back into Python must be released while the
    # interpreter is still whole: left to interpreter shutdown, it can deadlock on the GIL.
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


class NumpyIterator:
    """Iterates a tf.data dataset as NumPy dicts, turning decode failures into DataError."""

    def __init__(self, dataset, finalise: Callable[[Batch], Batch] | None = None):
        self._iterator = dataset.as_numpy_iterator()
        self._finalise = finalise
        self._errors = _tf().errors.OpError
        _LIVE_ITERATORS.add(self)

    def __iter__(self) -> NumpyIterator:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.close()
            raise
        except self._errors as error:
            self.close()
            raise _data_error_from(error) from None
        return self._finalise(batch) if self._finalise else batch

    def close(self) -> None:
        """Stops the background work of the pipeline; the iterator is then exhausted."""
        self._iterator = None


def _with_options(dataset):
    """Deterministic order; tf.data's autotuning model off.

    With the model on, deleting an iterator waits for the model's optimisation thread, which
    sleeps up to a minute between rounds and is not woken by the cancellation: closing the
    demo's training iterator took 33-46 s in three of seven runs and 9-23 s in 4 of 22 probes (0 s
    in 20 of 20 with it off, at the same throughput; docs/data.md). With it off, ``AUTOTUNE``
    parallelism stays at its initial value (``autotune.initial_parallelism``, 16, capped at the
    schedulable cores; the ``tf.numpy_function`` maps mostly hold the GIL anyway).
    """
    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return dataset.with_options(options)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled order of the examples in ``epoch`` (the same on every process)."""
    return np.random.default_rng([seed, 0, epoch]).permutation(num_examples)


def example_at(position: int, num_examples: int, seed: int) -> int:
    """Index of the example at ``position`` of the global training stream: the stream visits
    every example once per epoch, in an order drawn from (seed, epoch)."""
    epoch, offset = divmod(int(position), num_examples)
    return int(_epoch_order(seed, epoch, num_examples)[offset])


def local_positions(start: int, global_batch: int, process_index: int, process_count: int):
    """tf.data stream of the global stream positions this process reads: global batch b holds
    positions ``start + b * global_batch + [0, global_batch)``, of which this process reads
    rows ``[p * L, (p + 1) * L)`` with L = global_batch / processes."""
    tf = _tf()
    local = global_batch // process_count
    offset = start + process_index * local

    def position(i):
        return (i // local) * global_batch + offset + i % local

    return tf.data.Dataset.range(0, np.iinfo(np.int64).max).map(position)


# Training examples that failed to decode (logged once each).
_UNREADABLE: set[str] = set()
_SUBSTITUTES = 16


def _load_or_substitute(load_example, examples, index, num_classes, image_labels) -> dict:
    """``load_example`` of ``examples[index]``; when that file cannot be decoded (corrupt past
    its header, which ``voc.check_files`` reads), the next decodable example takes its place
    and the file is logged once, so one bad file does not end a training run."""
    last = ""
    for offset in range(_SUBSTITUTES):
        example = examples[(index + offset) % len(examples)]
        try:
            return load_example(example, num_classes, image_labels)
        except DataError as error:
            last = str(error)
            key = str(getattr(example, "image_path", example))
            if key not in _UNREADABLE:
                _UNREADABLE.add(key)
                logging.warning("skipping an unreadable training example: %s", error)
    raise DataError(
        f"{_SUBSTITUTES} training examples in a row cannot be read (the last: {last}); check "
        "the dataset folder."
    )


def build_train_dataset(
    examples: Sequence[VocExample],
    *,
    num_classes: int,
    global_batch: int,
    crop_size: int | Sequence[int],
    seed: int,
    augment: Mapping[str, Any],
    image_labels: Mapping[str, Sequence[int]] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_parallel_calls: int | None = None,
    prefetch: int | None = None,
    start_position: int = 0,
    load_example: Callable[..., dict[str, Any]] = voc.load_example,
):
    """Endless tf.data dataset of this process's rows of every global training batch.

    The global stream depends on the seed alone, not on the number of processes or devices:
    position q holds the example :func:`example_at` (q), augmented with random draws seeded by
    (seed, q); global batch b is positions ``[b * global_batch, (b + 1) * global_batch)`` and
    process p reads its rows ``p * L ..`` (L = global_batch / process_count), so a run on many
    hosts sees the batches of the same run on one host. ``start_position`` (examples of the
    global stream already consumed, any number: a resumed run may use another batch size)
    continues the same stream at that example.
    ``augment``: ``scale``, ``ratio``, ``flip_prob``, ``jitter`` of
    ``transforms.train_transform``. ``load_example(example, num_classes, image_labels)``
    decodes one element of ``examples``.
    """
    tf = _tf()
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"the global batch {global_batch} must be >= 1 and divisible by the "
            f"{process_count} processes."
        )
    if not examples:
        raise DataError("The training list is empty.")
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    examples = list(examples)

    def load_and_augment(position):
        index = example_at(position, len(examples), seed)
        decoded = _load_or_substitute(load_example, examples, index, num_classes, image_labels)
        rng = np.random.default_rng([seed, 1, int(position)])
        out = transforms.train_transform(
            decoded["image"], decoded["mask"], rng, crop_size=crop, **augment
        )
        labels, is_labeled = decoded["labels"], np.bool_(decoded["is_labeled"])
        return out["image"], out["raw_image"], out["mask"], labels, is_labeled

    @tf.autograph.experimental.do_not_convert  # plain Python: nothing to convert
    def map_fn(position):
        values = tf.numpy_function(
            load_and_augment,
            [position],
            [tf.float32, tf.float32, tf.int32, tf.float32, tf.bool],
            stateful=False,
        )
        shapes = [(*crop, 3), (*crop, 3), crop, (num_classes - 1,), ()]
        for value, shape in zip(values, shapes):
            value.set_shape(shape)
        return dict(zip(TRAIN_KEYS, values))

    autotune = tf.data.AUTOTUNE
    dataset = local_positions(int(start_position), global_batch, process_index, process_count)
    dataset = dataset.map(map_fn, num_parallel_calls=num_parallel_calls or autotune)
    dataset = dataset.batch(global_batch // process_count, drop_remainder=True)
    dataset = dataset.prefetch(prefetch or autotune)
    return _with_options(dataset)


def _unreadable_eval_example(example: Any, num_classes: int, why: str) -> tuple:
    """The placeholder of an evaluation example that cannot be read (see build_eval_dataset)."""
    name = getattr(example, "name", None) or f"{getattr(example, 'split', '')}#{example.index}"
    return (
        np.zeros((1, 1, 3), np.float32),
        np.zeros((1, 1, 3), np.float32),
        np.full((1, 1), IGNORE_LABEL, np.int32),
        np.zeros((num_classes - 1,), np.float32),
        np.bool_(False),
        np.bytes_(str(name).encode()),
        np.zeros((2,), np.int32),
        np.bytes_(why.encode()),
    )


def build_eval_dataset(
    examples: Sequence[VocExample],
    *,
    num_classes: int,
    image_labels: Mapping[str, Sequence[int]] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_parallel_calls: int | None = None,
    load_example: Callable[..., dict[str, Any]] = voc.load_example,
):
    """Finite tf.data dataset of full-size examples, one per batch, for this process.

    Every process gets ``ceil(N / process_count)`` batches; the missing ones of short shards
    repeat the shard's last example with ``is_valid`` False. ``load_example`` as in
    ``build_train_dataset``; the name is its ``name`` entry when it has one. An example that
    cannot be read (a corrupt file, a mask of another size) does not stop the evaluation: it
    comes as a 1x1 placeholder whose ``error`` says why (empty for every readable example), and
    ``slr_jax.infer.run_inference`` lists it instead of scoring it.
    """
    tf = _tf()
    examples = list(examples)
    if not examples:
        raise DataError("The evaluation list is empty.")
    indices = list(range(process_index, len(examples), process_count))
    per_process = -(-len(examples) // process_count)
    fallback = indices[-1] if indices else 0
    valid = [True] * len(indices) + [False] * (per_process - len(indices))
    indices += [fallback] * (per_process - len(indices))

    def load(index):
        example = examples[int(index)]
        try:
            decoded = load_example(example, num_classes, image_labels)
        except DataError as error:
            return _unreadable_eval_example(example, num_classes, str(error))
        name = decoded["name"] if "name" in decoded else example.name
        out = transforms.eval_transform(decoded["image"], decoded["mask"])
        height, width = decoded["mask"].shape
        return (
            out["image"],
            out["raw_image"],
            out["mask"],
            decoded["labels"],
            np.bool_(decoded["is_labeled"]),
            np.bytes_(name.encode()),
            np.asarray((height, width), np.int32),
            np.bytes_(b""),
        )

    @tf.autograph.experimental.do_not_convert  # plain Python: nothing to convert
    def map_fn(index, is_valid):
        values = tf.numpy_function(
            load,
            [index],
            [tf.float32, tf.float32, tf.int32, tf.float32, tf.bool, tf.string, tf.int32, tf.string],
            stateful=False,
        )
        shapes = [(None, None, 3), (None, None, 3), (None, None), (num_classes - 1,), (), (), (2,)]
        for value, shape in zip(values, [*shapes, ()]):
            value.set_shape(shape)
        keys = (*TRAIN_KEYS, "name", "size", "error")
        return {**dict(zip(keys, values)), "is_valid": is_valid}

    dataset = tf.data.Dataset.from_tensor_slices(
        (np.asarray(indices, np.int64), np.asarray(valid, bool))
    )
    dataset = dataset.map(map_fn, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE)
    dataset = dataset.batch(1).prefetch(tf.data.AUTOTUNE)
    return _with_options(dataset)


def _decode_names(batch: Batch) -> Batch:
    batch["name"] = np.asarray([name.decode() for name in batch["name"]])
    batch["error"] = np.asarray([error.decode() for error in batch["error"]])
    return batch


# ----------------------------------------------------------------------------- config entry points


def train_dataset(
    cfg: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_position: int = 0,
) -> NumpyIterator:
    """Endless iterator of this process's rows of the global training batches (NumPy dicts,
    see module doc), ``start_position`` examples into the global stream
    (:func:`build_train_dataset`)."""
    process_index, process_count = _process_slot(process_index, process_count)
    global_batch = int(cfg.train.batch_size)
    if global_batch % process_count:
        raise ValueError(
            f"config.train.batch_size {global_batch} is not divisible by the {process_count} "
            "processes; use a multiple of jax.process_count()."
        )
    dataset = cfg.dataset
    jitter = dataset.color_jitter
    augment = dict(
        scale=tuple(dataset.scale_range),
        ratio=tuple(dataset.ratio_range),
        flip_prob=float(dataset.flip_prob),
        jitter=tuple(jitter) if jitter else None,
    )
    dataset_tf = build_train_dataset(
        train_examples(cfg),
        num_classes=int(cfg.model.num_classes),
        global_batch=global_batch,
        crop_size=dataset.crop_size,
        seed=int(cfg.seed),
        augment=augment,
        image_labels=_image_labels(cfg),
        process_index=process_index,
        process_count=process_count,
        num_parallel_calls=dataset.num_parallel_calls,
        prefetch=dataset.prefetch,
        start_position=start_position,
        load_example=example_loader(cfg),
    )
    return NumpyIterator(dataset_tf)


def eval_dataset(
    cfg: Any,
    *,
    split: str | None = None,
    limit: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> NumpyIterator:
    """Iterator of full-size evaluation examples, one per batch (see module doc).

    ``split`` defaults to ``config.dataset.val_split``; ``limit`` keeps the first examples.
    """
    process_index, process_count = _process_slot(process_index, process_count)
    examples = eval_examples(cfg, split)
    if limit is not None:
        examples = examples[: int(limit)]
    dataset_tf = build_eval_dataset(
        examples,
        num_classes=int(cfg.model.num_classes),
        image_labels=_image_labels(cfg),
        process_index=process_index,
        process_count=process_count,
        num_parallel_calls=cfg.dataset.num_parallel_calls,
        load_example=example_loader(cfg),
    )
    return NumpyIterator(dataset_tf, _decode_names)


def num_train_examples(cfg: Any) -> int:
    """Examples in one training epoch over all processes (oversampled repeats included)."""
    return len(train_examples(cfg))
