"""The second stage and the semi-supervised data: pixel-labelled splits (``num_labeled``,
``labeled_only``), the pseudo-label folder reader, the configs, the DeepLabV3+ trainer on a tiny
synthetic set, and the first-stage preparation (``slr_jax/stage2.py``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from test_xla_options import ynn_convolutions

from configs import common
from slr_jax import stage2, train
from slr_jax.config import validate_config
from slr_jax.data import pipeline, voc
from slr_jax.errors import ConfigError, DataError
from slr_jax.models.deeplab import DeepLabV3Plus
from slr_jax.sharding import make_mesh, replicated, shard_batch

NUM_TRAIN, SIZE, CLASSES = 6, 24, 4


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from slr_jax.data import write_synthetic_voc

    root = tmp_path_factory.mktemp("synthetic") / "voc"
    write_synthetic_voc(
        root, num_train=NUM_TRAIN, num_val=2, size=SIZE, num_classes=CLASSES, seed=0
    )
    return root


def data_config(root: Path, **dataset):
    config = common.get_config()
    config.model.num_classes = CLASSES
    config.dataset.name = "synthetic"
    config.dataset.manual_dir = str(root)
    config.dataset.num_train, config.dataset.num_val, config.dataset.image_size = NUM_TRAIN, 2, SIZE
    for key, value in dataset.items():
        config.dataset[key] = value
    return config


def _names(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def test_num_labeled_marks_the_first_ids_and_oversamples_them(synthetic_root):
    config = data_config(synthetic_root, labeled_split="train", num_labeled=2, oversample_rate=3)
    examples = pipeline.train_examples(config)
    names = _names(synthetic_root)
    assert len(examples) == NUM_TRAIN + 2 * 2
    assert [e.name for e in examples if e.is_labeled] == names[:2] * 3
    config.dataset.labeled_only = True
    assert [e.name for e in pipeline.train_examples(config)] == names[:2] * 3
    config.dataset.num_labeled = NUM_TRAIN + 1
    with pytest.raises(DataError, match="num_labeled=7 but the labelled list holds 6"):
        pipeline.train_examples(config)


def _write_labels(folder: Path, names, size) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        label = np.full(size, i % CLASSES, np.uint8)
        Image.fromarray(label, mode="L").save(folder / f"{name}.png")


def test_pseudo_label_folder_replaces_the_masks(synthetic_root, tmp_path):
    names = _names(synthetic_root)
    _write_labels(tmp_path / "labels", names, (SIZE, SIZE))
    config = data_config(synthetic_root, pseudo_label_dir=str(tmp_path / "labels"))
    examples = pipeline.train_examples(config)
    assert all(e.is_labeled and Path(e.mask_path).parent == tmp_path / "labels" for e in examples)
    loaded = voc.load_example(examples[1], CLASSES)
    np.testing.assert_array_equal(loaded["mask"], np.full((SIZE, SIZE), 1, np.uint8))


def test_pseudo_label_reader_refuses_missing_and_mis_sized_files(synthetic_root, tmp_path):
    names = _names(synthetic_root)
    folder = tmp_path / "labels"
    _write_labels(folder, names[2:], (SIZE, SIZE))
    _write_labels(folder, names[1:2], (SIZE - 4, SIZE))  # mis-sized
    config = data_config(synthetic_root, pseudo_label_dir=str(folder))
    with pytest.raises(DataError) as raised:
        pipeline.train_examples(config)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("2 of 6 pseudo-label files")
    assert f"{folder / names[0]}.png (missing)" in message
    assert f"{folder / names[1]}.png ({SIZE}x{SIZE - 4}, its image is {SIZE}x{SIZE})" in message
    config.dataset.pseudo_label_dir = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="pseudo_label_dir .*nowhere is not a folder"):
        pipeline.train_examples(config)


@pytest.mark.parametrize(
    "name",
    ["demo_semi", "demo_semi_wo_cls", "demo_supervised", "demo_stage2", "voc_stage2"],
)
def test_configs_load_and_validate(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config)
    with pytest.raises(AttributeError):
        config.dataset.num_labelled = 1  # locked: a misspelt key is refused


@pytest.mark.parametrize(
    "changes, message",
    [
        ({("model", "arch"): "deeplab"}, "trains with loss.objective='supervised'"),
        ({("loss", "objective"): "dice"}, "loss.objective='dice' not in"),
        ({("dataset", "labeled_only"): True}, "labeled_only=True needs loss.objective"),
        ({("dataset", "num_labeled"): -1}, "dataset.num_labeled=-1 must be an integer >= 0"),
    ],
)
def test_bad_combinations_are_refused(changes, message):
    config = common.get_config()
    for (section, key), value in changes.items():
        config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def tiny_deeplab_config():
    config = importlib.import_module("configs.demo_stage2").get_config()
    config.model.num_classes = CLASSES
    config.model.width = 0.0625
    config.train.batch_size = 4
    config.train.lr = 0.01
    return config


def test_deeplab_trainer_learns_a_tiny_synthetic_set():
    from slr_jax.data import make_synthetic_examples
    from slr_jax.infer import normalise_image

    config = tiny_deeplab_config()
    examples = make_synthetic_examples(4, size=32, num_classes=CLASSES, seed=1)
    batch = {
        "image": np.stack([normalise_image(e["image"]) for e in examples]),
        "raw_image": np.stack([e["image"] / 255.0 for e in examples]).astype(np.float32),
        "labels": np.zeros((4, CLASSES - 1), np.float32),
        "mask": np.stack([e["mask"] for e in examples]).astype(np.int32),
        "is_labeled": np.ones((4,), bool),
    }
    plan = train.StepPlan(steps_per_epoch=8, total_steps=8, pretrain_steps=8, decay_steps=8)
    mesh = make_mesh()
    lr = plan.learning_rate_fn(config.train.lr)
    # The trainer of configs/demo_stage2.py with one block per ResNet stage, so that XLA:CPU
    # compiles the step in seconds (ResNet-50 takes about a minute).
    model = DeepLabV3Plus(num_classes=CLASSES, layers=(1, 1, 1, 1), output_stride=16, width=0.0625)
    state = train.create_train_state(config, model, lr, jax.random.key(0), init_checkpoint="")
    state = jax.device_put(state, replicated(mesh))  # as train_and_evaluate: one compilation
    step = train.compile_train_step(config, plan, lr, mesh, state)
    losses = []
    for _ in range(8):
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["total"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    # The step carries slr_jax's CPU compiler options: no convolution runs on YNNPACK.
    text = step.lower(state, shard_batch(batch, mesh)).compile().as_text()
    assert " convolution(" in text and ynn_convolutions(text) == 0


def test_prepare_uses_complete_labels_and_refuses_a_first_stage_without_weights(
    synthetic_root, tmp_path, monkeypatch
):
    config = data_config(synthetic_root)
    config.stage1.config = "configs/voc.py"  # no initial weights
    with pytest.raises(ConfigError, match="has no initial weights"):
        stage2.prepare(config.copy_and_resolve_references(), str(tmp_path / "run"))
    labels = tmp_path / "run" / "stage1" / stage2.EXPORT_DIR / "pred"
    _write_labels(labels, _names(synthetic_root), (SIZE, SIZE))
    monkeypatch.setattr(stage2, "train_first_stage", lambda *a: pytest.fail("trained again"))
    prepared = stage2.prepare(config, str(tmp_path / "run"))
    assert prepared.dataset.pseudo_label_dir == str(labels)


def test_a_converted_torchvision_resnet_initialises_the_deeplab_backbone(tmp_path):
    from slr_jax import checkpoint
    from slr_jax.models.deeplab import deeplab_variable_shapes
    from slr_jax.models.resnet import resnet_variable_shapes

    layers, width = (1, 1, 1, 1), 0.0625
    model = DeepLabV3Plus(num_classes=CLASSES, layers=layers, width=width)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
    variables = zeros(deeplab_variable_shapes(model))
    resnet = jax.tree_util.tree_map(lambda x: x + 1.0, zeros(resnet_variable_shapes(layers, width)))
    checkpoint.save_variables(tmp_path / "r", resnet, {"source": "imagenet_resnet50"})
    loaded = checkpoint.load_initial_weights(variables, str(tmp_path / "r"))
    for collection in ("params", "batch_stats"):
        for leaf in jax.tree_util.tree_leaves(loaded[collection]["backbone"]):
            assert np.all(np.asarray(leaf) == 1.0)
        for leaf in jax.tree_util.tree_leaves(loaded["params"]["decoder"]):
            assert np.all(np.asarray(leaf) == 0.0)
