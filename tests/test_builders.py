"""slr_jax.data.builders: the voc_sbd, coco_seg and synthetic_shapes tfds builders.

Every builder is built from tiny fake manual_dir folders (or archives) written here, then read
back with tfds (TensorFlow decoding) and through the tfds path of the training pipeline.
"""

import itertools
import json
import logging
import tarfile

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from configs import common
from slr_jax import constants
from slr_jax.constants import IGNORE_LABEL
from slr_jax.data import builders, pipeline, transforms, voc
from slr_jax.data.synthetic import make_synthetic_examples
from slr_jax.errors import DataError

# A VOC 2012 + SBD copy in miniature. 2007_000002 is in VOC train and SBD: VOC's mask must win.
# 2007_000003 is VOC val and SBD train: it must stay out of train_aug. 2008_000006 has its image
# only in SBD's img/ folder.
VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003", "2007_000004"]
SBD_TRAIN = ["2007_000002", "2008_000005", "2007_000003"]
SBD_VAL = ["2008_000006"]
SBD_ONLY_IMAGE = "2008_000006"
TEST_IDS = ["2008_000007"]
TRAIN_AUG = ["2007_000001", "2007_000002", "2008_000005", "2008_000006"]
ALL_IDS = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL + TEST_IDS))
SKIP = {key: tfds.decode.SkipDecoding() for key in builders.ENCODED_FEATURES}


def fake_image(index: int) -> np.ndarray:
    height, width = 20 + 2 * index, 24 + index
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def fake_mask(index: int, num_classes: int = 21, shift: int = 0) -> np.ndarray:
    """Two rectangles of classes depending on (index, shift), outlined with 255."""
    height, width = fake_image(index).shape[:2]
    mask = np.zeros((height, width), np.uint8)
    first = 1 + (3 * index + shift) % (num_classes - 1)
    second = 1 + (7 * index + 5 + shift) % (num_classes - 1)
    mask[2:10, 3:12] = first
    mask[12:18, 14:22] = second
    mask[1, 2:13] = IGNORE_LABEL
    return mask


def save_jpeg(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def write_fake_voc_sbd(manual_dir, *, with_test=True):
    """VOCdevkit/VOC2012 (+ test ids) and benchmark_RELEASE/dataset under ``manual_dir``."""
    voc_root = manual_dir / "VOCdevkit" / "VOC2012"
    sbd_root = manual_dir / "benchmark_RELEASE" / "dataset"
    lists = voc_root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (voc_root / "SegmentationClass").mkdir()
    (sbd_root / "cls").mkdir(parents=True)
    for name in ALL_IDS:
        index = ALL_IDS.index(name)
        folder = sbd_root / "img" if name == SBD_ONLY_IMAGE else voc_root / "JPEGImages"
        save_jpeg(folder / f"{name}.jpg", fake_image(index))
        if name in VOC_TRAIN + VOC_VAL:
            png = Image.fromarray(fake_mask(index))
            png.putpalette(constants.voc_palette())
            png.save(voc_root / "SegmentationClass" / f"{name}.png")
        if name in SBD_TRAIN + SBD_VAL:  # SBD masks have no 255 outline; shift differs from VOC
            mask = np.where(fake_mask(index, shift=1) == IGNORE_LABEL, 0, fake_mask(index, shift=1))
            scipy.io.savemat(
                sbd_root / "cls" / f"{name}.mat",
                {"GTcls": {"Segmentation": mask.astype(np.uint8), "CategoriesPresent": [1]}},
            )
    for file, ids in (("train.txt", VOC_TRAIN), ("val.txt", VOC_VAL)):
        (lists / file).write_text("".join(f"{n}\n" for n in ids))
    if with_test:
        (lists / "test.txt").write_text("".join(f"{n}\n" for n in TEST_IDS))
    for file, ids in (("train.txt", SBD_TRAIN), ("val.txt", SBD_VAL)):
        (sbd_root / file).write_text("".join(f"{n}\n" for n in ids))
    return voc_root, sbd_root


def expected_mask(name: str) -> np.ndarray:
    """The mask voc_sbd must store for ``name`` (VOC's where VOC annotates it, else SBD's)."""
    index = ALL_IDS.index(name)
    if name in VOC_TRAIN + VOC_VAL:
        return fake_mask(index)
    if name in TEST_IDS:
        return np.full(fake_image(index).shape[:2], IGNORE_LABEL, np.uint8)
    shifted = fake_mask(index, shift=1)
    return np.where(shifted == IGNORE_LABEL, 0, shifted)


def build(name, data_dir, manual_dir=None, file_format=None):
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    return builder


def read_split(builder, split, decoders=None):
    dataset = builder.as_dataset(split=split, decoders=decoders)
    return {ex["name"].decode(): ex for ex in tfds.as_numpy(dataset)}


# ----------------------------------------------------------------------------- voc_sbd


@pytest.fixture(scope="module")
def voc_build(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("voc_manual")
    write_fake_voc_sbd(manual_dir)
    data_dir = tmp_path_factory.mktemp("voc_data")
    return manual_dir, data_dir, build("voc_sbd", data_dir, manual_dir)


def test_voc_sbd_splits_follow_the_train_aug_rule(voc_build):
    _, _, builder = voc_build
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert splits == {"train_aug": 4, "train": 2, "val": 2, "test": 1}
    names = {split: sorted(read_split(builder, split, SKIP)) for split in splits}
    assert names["train_aug"] == TRAIN_AUG  # VOC train + SBD train/val - VOC val
    assert names["train"] == sorted(VOC_TRAIN) and names["val"] == sorted(VOC_VAL)
    assert names["test"] == TEST_IDS
    assert not set(names["train_aug"]) & set(VOC_VAL)


def test_voc_sbd_features_masks_and_labels(voc_build):
    manual_dir, _, builder = voc_build
    features = builder.info.features
    assert features["mask"].shape == (None, None, 1) and features["labels"].shape == (20,)
    assert builder.info.metadata["class_names"][0] == "background"
    for split in ("train_aug", "val", "test"):
        decoded = read_split(builder, split)
        encoded = read_split(builder, split, SKIP)
        for name, example in decoded.items():
            index = ALL_IDS.index(name)
            height, width = fake_image(index).shape[:2]
            assert example["image"].shape == (height, width, 3)
            assert example["image"].dtype == np.uint8
            assert example["mask"].shape == (height, width, 1)
            mask = expected_mask(name)
            np.testing.assert_array_equal(example["mask"][..., 0], mask)
            present = set(np.unique(mask).tolist()) - {0, IGNORE_LABEL}
            assert set((np.flatnonzero(example["labels"]) + 1).tolist()) == present
            assert example["labels"].dtype == np.float32
            # JPEGs are stored byte for byte; PIL decodes them as voc.load_image does.
            folder = (
                "benchmark_RELEASE/dataset/img"
                if name == SBD_ONLY_IMAGE
                else "VOCdevkit/VOC2012/JPEGImages"
            )
            path = manual_dir / folder / f"{name}.jpg"
            assert encoded[name]["image"] == path.read_bytes()
            record = builders.decode_record(encoded[name])
            np.testing.assert_array_equal(record["image"], voc.load_image(str(path)))
            np.testing.assert_array_equal(record["mask"], mask)
            # TensorFlow's JPEG decoder may differ from PIL's by a few levels, no more.
            diff = np.abs(example["image"].astype(int) - record["image"].astype(int)).max()
            assert diff <= 8, diff
    assert not read_split(builder, "test")[TEST_IDS[0]]["labels"].any()


def test_voc_sbd_from_archives_matches_folders(voc_build, tmp_path, caplog):
    """The VOC tar, the SBD .tgz and the VOC test tar give the same records as the folders."""
    folders = tmp_path / "folders"
    write_fake_voc_sbd(folders, with_test=False)
    manual_dir = tmp_path / "archives"
    manual_dir.mkdir()
    with tarfile.open(manual_dir / builders.VOC_TRAINVAL_ARCHIVE, "w") as archive:
        archive.add(folders / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(manual_dir / builders.SBD_ARCHIVE, "w:gz") as archive:
        archive.add(folders / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    test_folder = tmp_path / "test" / "VOCdevkit" / "VOC2012"
    (test_folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    (test_folder / "ImageSets" / "Segmentation" / "test.txt").write_text(f"{TEST_IDS[0]}\n")
    save_jpeg(
        test_folder / "JPEGImages" / f"{TEST_IDS[0]}.jpg", fake_image(ALL_IDS.index(TEST_IDS[0]))
    )
    with tarfile.open(manual_dir / builders.VOC_TEST_ARCHIVE, "w") as archive:
        archive.add(tmp_path / "test" / "VOCdevkit", arcname="VOCdevkit")

    with caplog.at_level(logging.WARNING, logger=builders.__name__):
        builder = build("voc_sbd", tmp_path / "data", manual_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "voc_sbd split 'train_aug' has 4 examples but the full dataset has 10582" in " ".join(
        warnings
    )
    assert any("split 'val' has 2 examples but the full dataset has 1449" in w for w in warnings)

    _, _, from_folders = voc_build
    for split in ("train_aug", "train", "val", "test"):
        ours, theirs = read_split(builder, split, SKIP), read_split(from_folders, split, SKIP)
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            for key in ("image", "mask", "labels"):
                np.testing.assert_array_equal(ours[name][key], theirs[name][key])


def test_voc_sbd_missing_listed_file_is_named(tmp_path):
    manual_dir = tmp_path / "manual"
    voc_root, sbd_root = write_fake_voc_sbd(manual_dir)
    (sbd_root / "cls" / "2008_000005.mat").unlink()
    (voc_root / "JPEGImages" / "2007_000004.jpg").unlink()
    with pytest.raises(DataError) as error:
        build("voc_sbd", tmp_path / "data", manual_dir)
    message = str(error.value)
    assert message.startswith("2 listed file(s) do not exist")
    assert f"{sbd_root / 'cls' / '2008_000005.mat'} (split 'train_aug')" in message
    assert f"{voc_root / 'JPEGImages' / '2007_000004.jpg'} (split 'val')" in message


def test_build_command_builds_array_record_and_refuses_bad_input(tmp_path, capsys):
    from slr_jax.data import build as build_cli

    manual_dir = tmp_path / "manual"
    voc_root, _ = write_fake_voc_sbd(manual_dir, with_test=False)
    args = ["voc_sbd", "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path / "data")]
    assert build_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "voc_sbd/1.0.0 in " in out and "train 2, train_aug 4, val 2" in out, out
    builder = tfds.builder("voc_sbd", data_dir=str(tmp_path / "data"))
    assert builder.is_prepared() and builder.info.file_format.value == "array_record"

    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    empty = ["voc_sbd", "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path / "d2")]
    assert build_cli.main(empty) == 1
    assert "split(s) ['val'] have no examples" in capsys.readouterr().err
    assert build_cli.main(["voc_sbd", "--data_dir", str(tmp_path / "d3")]) == 1
    assert "--manual_dir" in capsys.readouterr().err
    missing = ["coco_seg", "--manual_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path)]
    assert build_cli.main(missing) == 1
    assert "does not exist" in capsys.readouterr().err
    assert build_cli.main(["voc"]) == 1
    assert "unknown dataset 'voc'" in capsys.readouterr().err


def test_voc_sbd_needs_sbd_and_reads_only_class_indices(tmp_path):
    manual_dir = tmp_path / "manual"
    voc_root, sbd_root = write_fake_voc_sbd(manual_dir)
    (sbd_root / "cls").rename(sbd_root / "gone")
    with pytest.raises(DataError, match="SBD not found in .*benchmark.tgz"):
        build("voc_sbd", tmp_path / "data", manual_dir)
    bad = np.zeros((4, 4), np.uint8)
    bad[0, 0] = 30
    scipy.io.savemat(tmp_path / "bad.mat", {"GTcls": {"Segmentation": bad}})
    with pytest.raises(DataError, match=r"bad.mat holds value\(s\) \[30\]"):
        builders.load_sbd_mask(tmp_path / "bad.mat")
    scipy.io.savemat(tmp_path / "other.mat", {"GTinst": {"Segmentation": bad}})
    with pytest.raises(DataError, match="Cannot read GTcls.Segmentation from .*other.mat"):
        builders.load_sbd_mask(tmp_path / "other.mat")


# ----------------------------------------------------------------------------- coco_seg

PERSON, DOG, TOOTHBRUSH = 1, 18, 90  # COCO category ids -> classes 1, 17, 80


def rectangle(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def crowd_rle(height, width, rows, cols):
    region = np.zeros((height, width), np.uint8, order="F")
    region[rows, cols] = 1
    # Uncompressed RLE (a list of run lengths, column-major), as COCO stores crowd regions.
    flat = region.flatten(order="F")
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    return {"size": [height, width], "counts": runs}


def write_fake_coco(manual_dir):
    """Two val images (one without annotations) and one train image with a compressed RLE."""
    categories = [{"id": c, "name": str(c)} for c in (PERSON, DOG, TOOTHBRUSH)]
    val_images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 30, "width": 40},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 26, "width": 22},
    ]
    val_annotations = [  # the large person first, the small dog inside it second
        {"id": 1, "image_id": 42, "category_id": PERSON, "iscrowd": 0,
         "segmentation": rectangle(4, 4, 30, 24)},
        {"id": 2, "image_id": 42, "category_id": DOG, "iscrowd": 0,
         "segmentation": rectangle(10, 8, 18, 16)},
        {"id": 3, "image_id": 42, "category_id": TOOTHBRUSH, "iscrowd": 1,
         "segmentation": crowd_rle(30, 40, slice(20, 28), slice(26, 38))},
    ]  # fmt: skip
    region = np.zeros((16, 18), np.uint8, order="F")
    region[3:9, 5:15] = 1
    compressed = mask_utils.encode(region)
    compressed["counts"] = compressed["counts"].decode()
    train_images = [
        {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 16, "width": 18}
    ]
    train_annotations = [
        {"id": 9, "image_id": 3, "category_id": DOG, "iscrowd": 0, "segmentation": compressed}
    ]
    (manual_dir / "annotations").mkdir(parents=True)
    for split, images, annotations in (
        ("train", train_images, train_annotations),
        ("val", val_images, val_annotations),
    ):
        contents = {"images": images, "annotations": annotations, "categories": categories}
        (manual_dir / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps(contents)
        )
        for index, image in enumerate(images):
            rng = np.random.default_rng(index)
            pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
            save_jpeg(manual_dir / f"{split}2014" / image["file_name"], pixels)
    return val_annotations


@pytest.fixture(scope="module")
def coco_build(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("coco_manual")
    annotations = write_fake_coco(manual_dir)
    return annotations, build("coco_seg", tmp_path_factory.mktemp("coco_data"), manual_dir)


def test_coco_seg_masks_labels_and_names(coco_build):
    _, builder = coco_build
    assert builder.info.features["labels"].shape == (80,)
    assert builder.builder_config.name == "2014"
    val = read_split(builder, "val")
    assert sorted(val) == ["COCO_val2014_000000000007", "COCO_val2014_000000000042"]
    mask = val["COCO_val2014_000000000042"]["mask"][..., 0]
    assert mask.shape == (30, 40)
    assert mask[12, 14] == 17, "the smaller dog is drawn over the person"
    assert mask[20, 6] == 1 and mask[2, 2] == 0
    assert mask[25, 34] == IGNORE_LABEL, "crowd regions are ignored"
    assert set(np.unique(mask).tolist()) == {0, 1, 17, IGNORE_LABEL}
    labels = val["COCO_val2014_000000000042"]["labels"]
    assert (np.flatnonzero(labels) + 1).tolist() == [1, 17, 80], "crowd categories count"
    empty = val["COCO_val2014_000000000007"]
    assert not empty["mask"].any() and not empty["labels"].any()
    (train,) = read_split(builder, "train").values()
    expected = np.zeros((16, 18), np.uint8)
    expected[3:9, 5:15] = 17
    np.testing.assert_array_equal(train["mask"][..., 0], expected)


def test_coco_reference_order_and_bad_categories(coco_build):
    annotations, _ = coco_build
    mask = builders.coco_semantic_mask(annotations, 30, 40, reference_order=True)
    assert mask[12, 14] == 1, "reference: the first annotation (person) keeps the pixel"
    assert mask[25, 34] == 80, "reference: crowd regions keep their class"
    assert mask[2, 2] == 0 and IGNORE_LABEL not in mask
    wrong = [{**annotations[0], "category_id": 12}]
    with pytest.raises(DataError, match="category id 12 is not one of the 80"):
        builders.coco_semantic_mask(wrong, 30, 40)
    assert len(builders.COCO_CATEGORY_IDS) == 80 == len(constants.COCO_CLASSES) - 1
    assert builders.coco_class(90) == 80 and builders.coco_class(13) == 12


# ----------------------------------------------------------------------------- synthetic_shapes


@pytest.fixture(scope="module")
def shapes_data_dir(tmp_path_factory):
    """synthetic_shapes/tiny prepared as array_record (what the tfds pipeline path reads)."""
    data_dir = tmp_path_factory.mktemp("shapes_data")
    build("synthetic_shapes/tiny", data_dir, file_format="array_record")
    return data_dir


def test_synthetic_shapes_wraps_make_synthetic_examples(shapes_data_dir):
    builder = tfds.builder("synthetic_shapes/tiny", data_dir=str(shapes_data_dir))
    cfg = builder.builder_config
    assert (cfg.num_train, cfg.num_val, cfg.image_size, cfg.num_classes) == (8, 4, 32, 5)
    assert builder.info.features["labels"].shape == (4,)
    sources = {split: builder.as_data_source(split) for split in ("train", "train_aug", "val")}
    for split, seed, count in (("train", 0, 8), ("train_aug", 0, 8), ("val", 1, 4)):
        originals = {e["name"]: e for e in make_synthetic_examples(count, 32, 5, seed)}
        records = {r["name"].decode(): r for r in sources[split]}
        assert sorted(records) == sorted(originals)
        for name, record in records.items():
            np.testing.assert_array_equal(record["image"], originals[name]["image"])  # PNG
            np.testing.assert_array_equal(record["mask"][..., 0], originals[name]["mask"])
            np.testing.assert_array_equal(
                record["labels"], voc.labels_from_mask(originals[name]["mask"], 5)
            )
    assert [c.name for c in builders.SyntheticShapes.BUILDER_CONFIGS][:2] == ["small", "tiny"]


# ----------------------------------------------------------------------------- pipeline, tfds


def tfds_config(data_dir, tfds_name, num_classes, **overrides):
    dataset = dict(
        name="voc", source="tfds", tfds_name=tfds_name, data_dir=str(data_dir), manual_dir="",
        train_split="train_aug", val_split="val", crop_size=16,
    )  # fmt: skip
    dataset.update(overrides)
    config = common.get_config()
    config.model.num_classes = num_classes
    config.train.batch_size = 4
    config.dataset.update(dataset)
    return config


def test_pipeline_reads_tfds_into_the_same_batches(shapes_data_dir):
    cfg = tfds_config(shapes_data_dir, "synthetic_shapes/tiny", 5)
    assert pipeline.num_train_examples(cfg) == 8
    batches = list(
        itertools.islice(pipeline.train_dataset(cfg, process_index=0, process_count=1), 3)
    )
    again = next(pipeline.train_dataset(cfg, process_index=0, process_count=1))
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], again[key])
    for batch in batches:
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["raw_image"].shape == (4, 16, 16, 3)
        assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == np.int32
        assert batch["labels"].shape == (4, 4) and batch["is_labeled"].all()
        np.testing.assert_allclose(
            batch["image"] * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN,
            batch["raw_image"], atol=1e-5,
        )  # fmt: skip
    originals = {e["name"]: e for e in make_synthetic_examples(4, 32, 5, seed=1)}
    evaluated = list(pipeline.eval_dataset(cfg, process_index=0, process_count=1))
    assert sorted(b["name"][0] for b in evaluated) == sorted(originals)
    for batch in evaluated:
        original = originals[batch["name"][0]]
        np.testing.assert_array_equal(batch["mask"][0], original["mask"])
        np.testing.assert_allclose(batch["raw_image"][0] * 255.0, original["image"], atol=1e-3)
        np.testing.assert_array_equal(batch["labels"][0], voc.labels_from_mask(original["mask"], 5))
        np.testing.assert_array_equal(batch["size"][0], [32, 32])
    cfg.model.num_classes = 21
    with pytest.raises(DataError, match="has 5 classes but config.model.num_classes is 21"):
        next(pipeline.train_dataset(cfg, process_index=0, process_count=1))


def test_pipeline_tfds_semi_supervised_marking(voc_build, tmp_path):
    manual_dir, tfrecord_dir, _ = voc_build
    cfg = tfds_config(tmp_path, "voc_sbd", 21, labeled_split="train", oversample_rate=3)
    cfg.dataset.manual_dir = str(manual_dir)  # prepared here as array_record on first use
    examples = pipeline.train_examples(cfg)
    assert len(examples) == 4 + 2 * 2
    assert sum(e.is_labeled for e in examples) == 6
    cfg.train.batch_size = 8  # one batch = one oversampled epoch
    batch = next(pipeline.train_dataset(cfg, process_index=0, process_count=1))
    assert batch["is_labeled"].sum() == 6
    for is_labeled, mask, labels in zip(batch["is_labeled"], batch["mask"], batch["labels"]):
        assert labels.sum() > 0
        assert (mask == IGNORE_LABEL).all() != bool(is_labeled)

    cfg = tfds_config(tfrecord_dir, "voc_sbd", 21)
    with pytest.raises(DataError, match="stored as tfrecord.*needs array_record"):
        pipeline.train_examples(cfg)
    with pytest.raises(ValueError, match="Unknown config.dataset.source 'web'"):
        pipeline.train_examples(tfds_config(tmp_path, "voc_sbd", 21, source="web"))


def test_importing_slr_jax_data_registers_the_builders():
    for name in ("voc_sbd", "coco_seg", "synthetic_shapes"):
        assert name in tfds.list_builders(with_community_datasets=False)
