"""slr_jax.data: synthetic set, VOC reader, reference transforms and the tf.data pipelines."""

import importlib.util
import itertools
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import common
from slr_jax.constants import IGNORE_LABEL
from slr_jax.data import pipeline, transforms, voc
from slr_jax.data.synthetic import (
    INFO_FILE,
    LEGACY_INFO_FILES,
    MAX_CLASSES,
    SHAPE_KINDS,
    class_signature,
    make_synthetic_examples,
    trivial_baseline_scores,
    write_synthetic_voc,
)
from slr_jax.errors import DataError

NUM_CLASSES = 5
SIZE = (40, 48)
CROP = 32
NUM_TRAIN, NUM_VAL = 10, 3


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """A synthetic dataset written in VOC layout (shared, read-only)."""
    root = tmp_path_factory.mktemp("voc")
    return write_synthetic_voc(
        root, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, num_classes=NUM_CLASSES, seed=3
    )


def make_config(manual_dir, **dataset_overrides):
    dataset = dict(
        name="voc",
        manual_dir=str(manual_dir),
        train_split="train_aug",
        val_split="val",
        crop_size=CROP,
        scale_range=(0.9, 1.0),
    )
    dataset.update(dataset_overrides)
    config = common.get_config()
    config.model.num_classes = NUM_CLASSES
    config.train.batch_size = 4
    config.dataset.update(dataset)
    return config


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def single_process_train(cfg):
    return pipeline.train_dataset(cfg, process_index=0, process_count=1)


def single_process_eval(cfg, **kwargs):
    return list(pipeline.eval_dataset(cfg, process_index=0, process_count=1, **kwargs))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_examples_are_deterministic_and_well_formed():
    first = make_synthetic_examples(4, SIZE, NUM_CLASSES, seed=7)
    again = make_synthetic_examples(6, SIZE, NUM_CLASSES, seed=7)[:4]
    other = make_synthetic_examples(4, SIZE, NUM_CLASSES, seed=8)
    for a, b in zip(first, again):
        assert a["name"] == b["name"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    for example in first:
        assert example["image"].shape == (*SIZE, 3) and example["image"].dtype == np.uint8
        assert example["mask"].shape == SIZE and example["mask"].dtype == np.uint8
        values = set(np.unique(example["mask"]).tolist())
        assert values <= set(range(NUM_CLASSES)) | {IGNORE_LABEL}
        assert values & set(range(1, NUM_CLASSES)), "every image shows a foreground class"
        assert IGNORE_LABEL in values, "shape outlines are marked ignore"


def test_synthetic_class_signatures_are_unique():
    """Every class is a distinct (shape, texture) pair; the first classes differ in both."""
    signatures = [class_signature(c) for c in range(1, MAX_CLASSES)]
    assert len(set(signatures)) == len(signatures) == 254
    first = signatures[: len(SHAPE_KINDS)]
    assert [shape for shape, _ in first] == list(SHAPE_KINDS)
    assert len({texture for _, texture in first}) == len(SHAPE_KINDS)
    assert class_signature(1) == ("ellipse", "stripes0/4")
    for bad in (0, MAX_CLASSES):
        with pytest.raises(ValueError, match="class_id must be a foreground class 1..254"):
            class_signature(bad)


AUTOCORRELATION_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (2, 2), (2, -2))


def object_descriptors(examples):
    """Per object (connected region of one class): (class, shape, texture, mean colour).

    shape: fill of the bounding box, centroid row offset, hole at the box centre (ring).
    texture: luminance autocorrelation inside the object at AUTOCORRELATION_SHIFTS.
    """
    rows = []
    for example in examples:
        luminance = example["image"].astype(np.float64).mean(-1)
        height, width = luminance.shape
        for class_id in range(1, NUM_CLASSES):
            components, count = ndimage.label(example["mask"] == class_id)
            for k in range(1, count + 1):
                region = components == k
                r, c = np.nonzero(region)
                box_h, box_w = np.ptp(r) + 1, np.ptp(c) + 1
                centre = (r.min() + r.max()) // 2, (c.min() + c.max()) // 2
                shape = [r.size / (box_h * box_w), (r.mean() - r.min()) / box_h, not region[centre]]
                x = luminance - luminance[region].mean()
                texture = []
                for dr, dc in AUTOCORRELATION_SHIFTS:
                    a = slice(0, height - dr), slice(max(0, -dc), width - max(0, dc))
                    b = slice(dr, height), slice(max(0, dc), width - max(0, -dc))
                    both = region[a] & region[b]
                    texture.append((x[a][both] * x[b][both]).mean() / (x[region] ** 2).mean())
                colour = example["image"][region].mean(0)
                rows.append((class_id, np.array(shape, float), np.array(texture), colour))
    return rows


def nearest_centroid_accuracy(train, val, feature):
    centroids = {
        c: np.mean([row[feature] for row in train if row[0] == c], 0) for c in {r[0] for r in train}
    }
    hits = [
        min(centroids, key=lambda c: np.linalg.norm(row[feature] - centroids[c])) == row[0]
        for row in val
    ]
    return float(np.mean(hits))


def test_synthetic_classes_differ_by_shape_and_texture_not_colour():
    """Shape alone and texture alone name each object's class; colour does not."""
    train = make_synthetic_examples(40, 48, NUM_CLASSES, seed=0)
    val = make_synthetic_examples(20, 48, NUM_CLASSES, seed=1)
    train_objects, val_objects = object_descriptors(train), object_descriptors(val)
    assert len(val_objects) >= 30 and {row[0] for row in val_objects} == {1, 2, 3, 4}
    assert nearest_centroid_accuracy(train_objects, val_objects, 1) >= 0.95  # shape
    assert nearest_centroid_accuracy(train_objects, val_objects, 2) >= 0.95  # texture
    assert nearest_centroid_accuracy(train_objects, val_objects, 3) <= 0.5  # colour, chance 0.25
    scores = trivial_baseline_scores(train, val, NUM_CLASSES)
    assert scores["nearest_colour"]["miou"] < 0.2
    assert scores["nearest_colour"]["miou"] < scores["all_background"]["miou"]


def test_clutter_texture_share_changes_only_the_clutter():
    """clutter_texture_prob: the same layout, objects and masks; only unlabelled pixels change,
    and with 0 no background pixel carries a class texture (fewer background edges)."""
    textured = make_synthetic_examples(6, 48, NUM_CLASSES, seed=0, clutter_texture_prob=1.0)
    plain = make_synthetic_examples(6, 48, NUM_CLASSES, seed=0, clutter_texture_prob=0.0)
    default = make_synthetic_examples(6, 48, NUM_CLASSES, seed=0)
    edges = {"textured": 0.0, "plain": 0.0}
    for a, b, c in zip(textured, plain, default):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["mask"], c["mask"])
        differs = np.any(a["image"] != b["image"], axis=-1)
        assert differs.any() and not np.any(differs & (a["mask"] > 0) & (a["mask"] != 255))
        background = a["mask"] == 0
        for name, example in (("textured", a), ("plain", b)):
            grey = example["image"].astype(np.float32).mean(-1)
            step = np.abs(np.diff(grey, axis=1))[background[:, 1:] & background[:, :-1]]
            edges[name] += float(np.mean(step > 20))
    assert edges["plain"] < 0.6 * edges["textured"], edges
    with pytest.raises(ValueError, match="clutter_texture_prob must lie in"):
        make_synthetic_examples(1, 32, 3, seed=0, clutter_texture_prob=1.5)


def test_write_synthetic_voc_rewrites_folders_of_other_generator_versions(tmp_path):
    args = dict(num_train=2, num_val=1, size=24, num_classes=3, seed=0)
    root = write_synthetic_voc(tmp_path / "shapes", **args)
    info = (root / INFO_FILE).read_text()
    image = root / "JPEGImages" / "shapes0_000000.jpg"
    original = image.read_bytes()
    image.write_bytes(b"left as it is")
    write_synthetic_voc(root, **args)  # same arguments and version: nothing is written
    assert image.read_bytes() == b"left as it is"
    (root / INFO_FILE).rename(root / LEGACY_INFO_FILES[0])  # as an earlier generator left it
    write_synthetic_voc(root, **args)
    assert image.read_bytes() == original
    assert (root / INFO_FILE).read_text() == info
    assert not (root / LEGACY_INFO_FILES[0]).exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=1), "num_classes counts the background"),
        (dict(size=4), "size must be"),
        (dict(num_examples=-1), "num_examples must be >= 0"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, message):
    args = dict(num_examples=2, size=32, num_classes=3, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        make_synthetic_examples(**args)


# ----------------------------------------------------------------------------- VOC reader


def test_voc_folder_round_trip(voc_root):
    originals = make_synthetic_examples(NUM_TRAIN, SIZE, NUM_CLASSES, seed=3)
    examples = voc.read_split(voc_root, "train_aug")
    assert [e.name for e in examples] == [o["name"] for o in originals]
    assert all(Path(e.mask_path).parent.name == "SegmentationClassAug" for e in examples)
    for example, original in zip(examples, originals):
        loaded = voc.load_example(example, NUM_CLASSES)
        np.testing.assert_array_equal(loaded["mask"], original["mask"])  # PNG is lossless
        error = np.abs(loaded["image"].astype(int) - original["image"].astype(int)).mean()
        assert error < 4.0, f"JPEG round trip too lossy: mean abs error {error}"
        np.testing.assert_array_equal(
            loaded["labels"], voc.labels_from_mask(original["mask"], NUM_CLASSES)
        )
    assert len(voc.read_split(voc_root, "val")) == NUM_VAL
    # A palette PNG keeps the class indices (not colours) as pixel values.
    with Image.open(examples[0].mask_path) as mask:
        assert mask.mode == "P"


def test_voc_root_may_be_the_devkit_parent(voc_root, tmp_path):
    (tmp_path / "VOCdevkit").mkdir()
    (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(voc_root, target_is_directory=True)
    assert voc.resolve_voc_root(tmp_path) == tmp_path / "VOCdevkit" / "VOC2012"


def test_two_column_list_file_like_the_reference(voc_root, tmp_path):
    names = [e.name for e in voc.read_split(voc_root, "val")]
    lines = [f"JPEGImages/{n}.jpg /SegmentationClass/{n}.png" for n in names]
    list_file = tmp_path / "val_voc.txt"
    list_file.write_text("\n".join(lines) + "\n")
    examples = voc.read_split(voc_root, str(list_file))
    assert [e.name for e in examples] == names
    assert examples[0].mask_path == str(voc_root / "SegmentationClass" / f"{names[0]}.png")


def test_labels_from_mask_excludes_background_and_ignore():
    mask = np.array([[0, 3, 255], [3, 1, 0]], np.uint8)
    np.testing.assert_array_equal(voc.labels_from_mask(mask, 5), [1, 0, 1, 0])
    only_ignore = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(voc.labels_from_mask(only_ignore, 5), [0, 0, 0, 0])
    with pytest.raises(DataError, match="Mask holds class 7 but num_classes is 5"):
        voc.labels_from_mask(np.array([[7]], np.uint8), 5)


def test_given_image_labels_override_the_mask(voc_root):
    example = voc.read_split(voc_root, "val")[0]
    loaded = voc.load_example(example, NUM_CLASSES, image_labels={example.name: [2, 4]})
    np.testing.assert_array_equal(loaded["labels"], [0, 1, 0, 1])
    with pytest.raises(DataError, match="outside the foreground classes 1..4"):
        voc.load_example(example, NUM_CLASSES, image_labels={example.name: [5]})


def test_missing_folder_names_the_expected_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"does not exist; expected .*nowhere/JPEGImages"):
        single_process_eval(make_config(missing))
    (missing / "other").mkdir(parents=True)
    with pytest.raises(DataError, match="has no JPEGImages/ folder"):
        voc.resolve_voc_root(missing)


def test_missing_list_file_names_the_expected_path(voc_root, tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DataError) as error:
        pipeline.train_examples(make_config(root))
    message = str(error.value)
    assert "split 'train_aug' not found" in message
    assert str(root / "ImageSets" / "Segmentation" / "train_aug.txt") in message
    assert "SBD" in message
    with pytest.raises(DataError, match="Unknown VOC split 'tran'"):
        voc.read_split(voc_root, "tran")


def test_missing_listed_image_is_reported_before_training(voc_root, tmp_path):
    root = tmp_path / "voc"
    write_synthetic_voc(root, num_train=3, num_val=1, size=24, num_classes=3, seed=0)
    victim = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    message = f"1 of 3 listed examples cannot be used: {victim} .missing."
    with pytest.raises(DataError, match=message):
        pipeline.train_examples(make_config(root))


def test_corrupt_jpeg_is_named_and_never_ends_a_run(tmp_path, caplog):
    """Refused before training (one line naming it); evaluation lists it and goes on; with the
    check off, training replaces it and logs it once."""
    root = tmp_path / "voc"
    write_synthetic_voc(root, num_train=4, num_val=2, size=24, num_classes=3, seed=0)
    victim = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cfg = make_config(root)
    cfg.model.num_classes = 3
    cfg.dataset.crop_size = 16
    cfg.train.batch_size = 2
    with pytest.raises(DataError, match=f"{victim} .not a readable image"):
        pipeline.train_examples(cfg)
    batches = single_process_eval(cfg, split="train")
    errors = [b["error"][0] for b in batches if b["error"][0]]
    assert len(batches) == 4 and len(errors) == 1
    assert f"Cannot decode image {victim}" in errors[0]
    cfg.dataset.check_files = False
    with caplog.at_level("WARNING"):
        for batch in take(single_process_train(cfg), 4):
            assert batch["image"].shape == (2, 16, 16, 3)
    assert f"Cannot decode image {victim}" in caplog.text


def test_rgb_mask_is_rejected(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match="has mode 'RGB'; expected a palette"):
        voc.load_mask(str(path))


# ----------------------------------------------------------------------------- transforms


def test_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = transforms.sample_crop_box(rng, 120, 90, (0.9, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
        assert 0.85 <= h * w / (120 * 90) <= 1.0 + 1e-6
    # A very wide image never fits the ratio range: centre crop clamped to ratio 4/3.
    assert transforms.sample_crop_box(rng, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)


def test_train_transform_flip_and_crop_keep_image_and_mask_aligned():
    example = make_synthetic_examples(1, 40, NUM_CLASSES, seed=1)[0]
    out = transforms.train_transform(
        example["image"], example["mask"], np.random.default_rng(5), crop_size=40,
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0, jitter=None,
    )  # fmt: skip
    np.testing.assert_array_equal(out["mask"], example["mask"][:, ::-1])
    np.testing.assert_allclose(out["raw_image"] * 255.0, example["image"][:, ::-1], atol=1e-3)
    np.testing.assert_allclose(
        out["image"], (out["raw_image"] - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD,
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip


def torchvision_pil_ops(monkeypatch):
    """torchvision's PIL-backend ops (the code the reference's transforms run).

    A torchvision wheel built for another torch fails to import its C ops; the PIL backend
    needs none, so it is then loaded from its source file under stub parent packages.
    """
    try:
        import torchvision.transforms._functional_pil as pil_ops

        return pil_ops
    except Exception:  # absent, or a build that does not match torch
        pass
    try:
        spec = importlib.util.find_spec("torchvision")
    except Exception:
        spec = None
    if spec is None or spec.origin is None:
        pytest.skip("torchvision is not installed")
    base = Path(spec.origin).parent
    for name, folder in (("torchvision", base), ("torchvision.transforms", base / "transforms")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        monkeypatch.setitem(sys.modules, name, package)

    def load(name, path):
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        monkeypatch.setitem(sys.modules, name, module)
        module_spec.loader.exec_module(module)
        return module

    load("torchvision.utils", base / "utils.py")
    return load("torchvision.transforms._functional_pil", base / "transforms/_functional_pil.py")


def test_transforms_match_torchvision(monkeypatch):
    """Same box and jitter draws as torchvision's functional ops -> the same pixels."""
    pil_ops = torchvision_pil_ops(monkeypatch)
    image = Image.fromarray(make_synthetic_examples(1, (50, 60), NUM_CLASSES, seed=2)[0]["image"])
    top, left, height, width = box = (3, 5, 44, 51)
    ours = transforms.resized_crop(image, box, (32, 29), Image.Resampling.BICUBIC)
    theirs = pil_ops.resize(pil_ops.crop(image, top, left, height, width), [32, 29], Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    mask = Image.fromarray(make_synthetic_examples(1, (50, 60), NUM_CLASSES, seed=2)[0]["mask"])
    ours = transforms.resized_crop(mask, box, (32, 29), Image.Resampling.NEAREST)
    theirs = pil_ops.resize(pil_ops.crop(mask, top, left, height, width), [32, 29], Image.NEAREST)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    adjust = (
        pil_ops.adjust_brightness, pil_ops.adjust_contrast, pil_ops.adjust_saturation,
        pil_ops.adjust_hue,
    )  # fmt: skip
    for order, factors, hue in [
        ((2, 0, 3, 1), (1.2, 0.8, 1.25), -0.07),
        ((3, 1, 0, 2), (0.75, 1.3, 0.7), 0.093),
    ]:
        ours = transforms.apply_colour_jitter(image, order, factors, hue)
        theirs = image
        for op in order:
            theirs = adjust[op](theirs, (*factors, hue)[op])
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


# ----------------------------------------------------------------------------- pipelines


def check_train_batch(batch, batch_size):
    assert set(batch) == {"image", "raw_image", "labels", "mask", "is_labeled"}
    assert batch["image"].shape == (batch_size, CROP, CROP, 3)
    assert batch["image"].dtype == np.float32
    assert batch["raw_image"].shape == (batch_size, CROP, CROP, 3)
    assert batch["raw_image"].dtype == np.float32
    assert batch["labels"].shape == (batch_size, NUM_CLASSES - 1)
    assert batch["labels"].dtype == np.float32
    assert batch["mask"].shape == (batch_size, CROP, CROP) and batch["mask"].dtype == np.int32
    assert batch["is_labeled"].shape == (batch_size,) and batch["is_labeled"].dtype == bool
    raw = batch["raw_image"]
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    np.testing.assert_allclose(
        batch["image"] * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN, raw, atol=1e-5
    )
    assert set(np.unique(batch["labels"]).tolist()) <= {0.0, 1.0}
    assert set(np.unique(batch["mask"]).tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_LABEL}


def test_train_pipeline_batches(voc_root):
    batches = take(single_process_train(make_config(voc_root)), 6)  # > 2 epochs of 10
    for batch in batches:
        check_train_batch(batch, 4)
        assert batch["is_labeled"].all()
        for mask, labels in zip(batch["mask"], batch["labels"]):
            present = set(np.unique(mask).tolist()) - {0, IGNORE_LABEL}
            # The crop keeps >= 90% of the image, so classes in the crop are in the labels.
            assert present <= {c + 1 for c in np.flatnonzero(labels)}
            assert present, "a >= 90% crop keeps some foreground"
        assert (batch["mask"] == IGNORE_LABEL).any(), "object outlines stay ignore"
    # The colour jitter runs on every example: the crops are not plain resizes of the input.
    assert np.std([b["raw_image"].mean() for b in batches]) > 0


def test_train_pipeline_is_seeded(voc_root):
    cfg = make_config(voc_root)
    first = take(single_process_train(cfg), 3)
    again = take(single_process_train(cfg), 3)
    cfg.seed = 1
    other = take(single_process_train(cfg), 3)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_global_batches_do_not_depend_on_the_number_of_processes(voc_root):
    """The global batch sequence is a function of the seed alone: the rows 1, 2 or 4 processes
    read, put side by side, are the one-process batches, across an epoch boundary and from a
    resumed position alike."""
    cfg = make_config(voc_root)  # global batch 4, 10 examples: 5 batches span two epochs
    steps = 5
    single = take(pipeline.train_dataset(cfg, process_index=0, process_count=1), steps)
    for count in (2, 4):
        shards = [
            take(pipeline.train_dataset(cfg, process_index=i, process_count=count), steps)
            for i in range(count)
        ]
        for shard in shards[0]:
            check_train_batch(shard, 4 // count)
        for step in range(steps):
            for key in single[step]:
                joined = np.concatenate([shard[step][key] for shard in shards])
                np.testing.assert_array_equal(joined, single[step][key], err_msg=f"{count} {key}")
    resumed = take(pipeline.train_dataset(cfg, start_position=3 * 4, process_count=1,
                                          process_index=0), 2)  # fmt: skip
    for key in single[3]:
        np.testing.assert_array_equal(resumed[0][key], single[3][key])
        np.testing.assert_array_equal(resumed[1][key], single[4][key])
    # Every example once per epoch (drawn again, in another order, the next epoch).
    orders = [[pipeline.example_at(q, 8, 0) for q in range(e * 8, e * 8 + 8)] for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(8)) and orders[0] != orders[1]
    cfg.train.batch_size = 3
    with pytest.raises(ValueError, match="batch_size 3 is not divisible by the 2 processes"):
        pipeline.train_dataset(cfg, process_index=0, process_count=2)


def test_semi_supervised_mixing_and_oversampling(voc_root, tmp_path):
    names = [e.name for e in voc.read_split(voc_root, "train_aug")]
    labelled = names[-3:]
    list_file = tmp_path / "labelled.txt"
    list_file.write_text("\n".join(labelled) + "\n")
    cfg = make_config(voc_root, labeled_split=str(list_file), oversample_rate=4)

    examples = pipeline.train_examples(cfg)
    assert len(examples) == NUM_TRAIN + 3 * 3
    counts = {n: sum(e.name == n for e in examples) for n in names}
    assert all(counts[n] == (4 if n in labelled else 1) for n in names)
    assert all(e.is_labeled == (e.name in labelled) for e in examples)

    cfg.train.batch_size = 19  # one batch = one oversampled epoch
    batch = take(single_process_train(cfg), 1)[0]
    check_train_batch(batch, 19)
    assert batch["is_labeled"].sum() == 12
    for is_labeled, mask, labels in zip(batch["is_labeled"], batch["mask"], batch["labels"]):
        if is_labeled:
            assert set(np.unique(mask).tolist()) - {0, IGNORE_LABEL}
        else:
            assert (mask == IGNORE_LABEL).all(), "unlabelled examples carry no pixel labels"
            assert labels.sum() > 0, "they keep their image labels"


def test_weak_setting_has_no_pixel_labels(voc_root):
    cfg = make_config(voc_root, labeled_split="none")
    batch = take(single_process_train(cfg), 1)[0]
    check_train_batch(batch, 4)
    assert not batch["is_labeled"].any() and (batch["mask"] == IGNORE_LABEL).all()
    assert batch["labels"].sum(axis=1).min() > 0


def test_semi_labelled_ids_must_belong_to_the_training_list(voc_root):
    examples = voc.read_split(voc_root, "train_aug")
    with pytest.raises(DataError, match="1 pixel-labelled id.* not in the training list"):
        voc.semi_supervised_examples(examples, ["not_an_id"], 2)
    with pytest.raises(DataError, match="oversample_rate must be an integer >= 1"):
        voc.semi_supervised_examples(examples, [], 0)


def test_pipelines_are_deterministic_without_the_autotune_model(voc_root):
    # The autotune model's thread makes closing an iterator wait up to a minute (see
    # pipeline._with_options); both pipelines must keep it off and their order fixed.
    cfg = make_config(voc_root)
    examples = voc.training_examples(cfg.dataset.manual_dir, "train_aug")
    dataset = cfg.dataset
    augment = dict(
        scale=dataset.scale_range, ratio=dataset.ratio_range, flip_prob=dataset.flip_prob,
        jitter=dataset.color_jitter,
    )  # fmt: skip
    train = pipeline.build_train_dataset(
        examples, num_classes=NUM_CLASSES, global_batch=2, crop_size=16, seed=0, augment=augment
    )
    evaluation = pipeline.build_eval_dataset(examples, num_classes=NUM_CLASSES)
    for dataset in (train, evaluation):
        options = dataset.options()
        assert options.autotune.enabled is False
        assert options.deterministic is True


def test_eval_pipeline_full_size_with_names(voc_root):
    cfg = make_config(voc_root)
    batches = single_process_eval(cfg)
    originals = make_synthetic_examples(NUM_VAL, SIZE, NUM_CLASSES, seed=4)
    assert [b["name"][0] for b in batches] == [o["name"] for o in originals]
    for batch, original in zip(batches, originals):
        assert batch["image"].shape == (1, *SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["raw_image"].shape == (1, *SIZE, 3)
        np.testing.assert_array_equal(batch["size"], [SIZE])
        np.testing.assert_array_equal(batch["mask"][0], original["mask"])
        assert batch["mask"].dtype == np.int32
        np.testing.assert_array_equal(
            batch["labels"][0], voc.labels_from_mask(original["mask"], NUM_CLASSES)
        )
        assert batch["is_labeled"].all() and batch["is_valid"].all()


def test_eval_pipeline_pads_short_shards(voc_root):
    cfg = make_config(voc_root)
    shards = [list(pipeline.eval_dataset(cfg, process_index=i, process_count=2)) for i in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]  # 3 images over 2 processes, padded
    valid = [b["name"][0] for s in shards for b in s if b["is_valid"][0]]
    assert sorted(valid) == sorted(e.name for e in voc.read_split(voc_root, "val"))
    assert [b["is_valid"][0] for b in shards[1]] == [True, False]


def test_synthetic_config_writes_and_reads_its_folder(tmp_path):
    cfg = make_config(tmp_path / "shapes", name="synthetic", num_train=5, num_val=2, image_size=36)
    batch = take(single_process_train(cfg), 1)[0]
    check_train_batch(batch, 4)
    assert (tmp_path / "shapes" / "JPEGImages").is_dir()
    assert [b["size"][0].tolist() for b in single_process_eval(cfg)] == [[36, 36]] * 2
    cfg.dataset.num_val = 3  # other arguments: the folder is written again
    assert len(single_process_eval(cfg)) == 3
    with pytest.raises(DataError, match="is not empty and is not a synthetic dataset folder"):
        pipeline.dataset_root(make_config(tmp_path / "shapes" / "JPEGImages", name="synthetic"))
    # A folder of the earlier generator (its info file name) is ours: rewritten, not refused.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "synthetic_info.json").write_text("{}")
    (legacy / "stale.txt").write_text("old")
    cfg = make_config(legacy, name="synthetic", num_train=5, num_val=2, image_size=36)
    assert pipeline.dataset_root(cfg) == legacy
    assert not (legacy / "stale.txt").exists() and not (legacy / "synthetic_info.json").exists()
    assert len(single_process_eval(cfg)) == 2


def test_process_exits_with_a_live_train_iterator(voc_root):
    """An unfinished pipeline must not hang interpreter shutdown (py callbacks vs the GIL)."""
    script = f"""
import ml_collections
from slr_jax.data import pipeline
cfg = ml_collections.ConfigDict({make_config(voc_root).to_dict()!r})
iterator = pipeline.train_dataset(cfg, process_index=0, process_count=1)
next(iterator)
print("ok")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- trivial baselines


def test_trivial_baselines_on_hand_made_examples():
    grey, red, blue, green = (100, 100, 100), (200, 0, 0), (0, 0, 200), (0, 220, 0)
    train_image = np.array([[grey, grey, red], [blue, blue, green]], np.uint8)
    train_mask = np.array([[0, 0, 1], [2, 2, 255]], np.uint8)
    # Val pixel (1, 1) is class 2 but red: nearest colour calls it 1. (1, 2) is ignored.
    val_image = np.array([[grey, red, red], [blue, red, green]], np.uint8)
    val_mask = np.array([[0, 1, 1], [2, 2, 255]], np.uint8)
    train = [{"name": "t", "image": train_image, "mask": train_mask}]
    val = [{"name": "v", "image": val_image, "mask": val_mask}]
    scores = trivial_baseline_scores(train, val, num_classes=4)  # class 3 appears nowhere
    np.testing.assert_array_equal(scores["class_colours"][:3], [grey, red, blue])
    assert np.isnan(scores["class_colours"][3]).all()
    # All background: IoU(bg) = 1 labelled bg pixel / 5 labelled pixels, classes 1, 2 score 0.
    background = scores["all_background"]
    np.testing.assert_allclose(background["iou"][:3], [1 / 5, 0, 0])
    assert np.isnan(background["iou"][3])
    assert background["miou"] == pytest.approx((1 / 5) / 3)
    nearest = scores["nearest_colour"]
    np.testing.assert_allclose(nearest["iou"][:3], [1, 2 / 3, 1 / 2])
    assert nearest["miou"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="needs at least one train example"):
        trivial_baseline_scores([], val, 4)
    with pytest.raises(ValueError, match=r"holds class\(es\) \[3\] but num_classes is 3"):
        trivial_baseline_scores(train, [{"image": val_image, "mask": val_mask + 1}], 3)
    with pytest.raises(ValueError, match="expected 'image' \\(H, W, 3\\)"):
        trivial_baseline_scores(train, [{"image": val_image[:1], "mask": val_mask}], 4)


def test_all_background_baseline_on_synthetic_shapes():
    train = make_synthetic_examples(4, 24, NUM_CLASSES, seed=0)
    val = make_synthetic_examples(3, 24, NUM_CLASSES, seed=1)
    scores = trivial_baseline_scores(train, val, NUM_CLASSES)
    masks = np.stack([e["mask"] for e in val])
    labelled = masks[masks != IGNORE_LABEL]
    present = np.unique(labelled[labelled > 0]).size
    # Background IoU is the background share of labelled pixels; present shapes score 0.
    expected = float(np.mean(labelled == 0)) / (1 + present)
    assert scores["all_background"]["miou"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- reading images


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation applied; 16-bit grey scaled to 8 bits (not clipped to white); palette
    and alpha images as RGB."""
    from slr_jax.data import images

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    shown = images.decode_rgb(tmp_path / "turned.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the band is now on top
    assert images.decode_rgb(tmp_path / "turned.jpg", apply_exif=False).shape == (20, 40, 3)

    grey16 = (np.arange(30 * 16).reshape(16, 30) * 136).astype(np.uint16)  # up to 65144
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    rgb = images.decode_rgb(tmp_path / "deep.png")
    expected = np.round(grey16 * (255.0 / 65535.0)).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.max() < 255 and len(np.unique(rgb)) > 50

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 128
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(images.decode_rgb(tmp_path / "alpha.png")[0, 0], [0, 200, 0])


def test_exif_rotated_photo_keeps_a_mask_drawn_on_its_stored_pixels(tmp_path):
    """A mask the size of the stored (unrotated) pixels: the image is read unrotated too, so
    image and mask still line up."""
    from slr_jax.data import images

    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    Image.fromarray(np.full((20, 40, 3), 90, np.uint8)).save(
        tmp_path / "JPEGImages" / "a.jpg", exif=exif
    )
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :5] = 1
    Image.fromarray(mask, "L").save(tmp_path / "SegmentationClass" / "a.png")
    example = voc.VocExample(
        "a", str(tmp_path / "JPEGImages" / "a.jpg"),
        str(tmp_path / "SegmentationClass" / "a.png"), True,
    )  # fmt: skip
    decoded = voc.load_example(example, NUM_CLASSES)
    assert decoded["image"].shape == (20, 40, 3) and decoded["mask"].shape == (20, 40)


def test_listed_files_are_checked_before_training(voc_root, tmp_path):
    """Empty, non-image and wrong-size files are refused up front in one line naming them;
    the evaluation list is checked the same way when training asks for it."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    cfg = make_config(root)
    names = [e.name for e in voc.read_split(root, "val")]
    (root / "JPEGImages" / f"{names[0]}.jpg").write_bytes(b"")
    small = Image.fromarray(np.zeros((5, 7), np.uint8), "L")
    small.save(root / "SegmentationClass" / f"{names[1]}.png")
    with pytest.raises(DataError) as error:
        pipeline.eval_examples(cfg, check_files=True)
    message = str(error.value)
    assert "2 of 3 listed examples cannot be used" in message and "\n" not in message
    assert "(an empty file)" in message and "(7x5, its image is 48x40)" in message
    assert len(pipeline.eval_examples(cfg)) == 3  # evaluation itself reports and skips
    batches = list(pipeline.eval_dataset(cfg, process_index=0, process_count=1))
    errors = {b["name"][0]: b["error"][0] for b in batches}
    assert "Cannot decode image" in errors[names[0]] and "is 7x5" in errors[names[1]]
    assert errors[names[2]] == ""


def test_an_unreadable_training_example_is_replaced_not_fatal(caplog):
    calls = []

    def load(example, num_classes, image_labels):
        calls.append(example)
        if example == "bad":
            raise DataError("Cannot decode image bad.jpg")
        return {"image": example}

    with caplog.at_level("WARNING"):
        out = pipeline._load_or_substitute(load, ["ok0", "bad", "ok2"], 1, 5, None)
    assert out == {"image": "ok2"} and "bad.jpg" in caplog.text
    with pytest.raises(DataError, match="training examples in a row cannot be read"):
        pipeline._load_or_substitute(load, ["bad"], 0, 5, None)
