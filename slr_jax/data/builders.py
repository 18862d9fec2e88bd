"""TensorFlow Datasets builders: ``voc_sbd``, ``coco_seg`` and ``synthetic_shapes``.

Importing ``slr_jax.data`` registers them, so ``tfds.load('voc_sbd', data_dir=...,
download_and_prepare_kwargs={'download_config': tfds.download.DownloadConfig(manual_dir=...)})``
or ``python -m slr_jax.data.build voc_sbd --manual_dir ... --data_dir ...`` builds them. Nothing is
downloaded: VOC, SBD and COCO are read from ``manual_dir`` as the original archives (extracted
by tfds into ``<data_dir>/downloads/extracted`` once) or as folders extracted by the user.

Features, the same names in every builder::

    image   Image (H, W, 3) uint8   the original JPEG bytes when the file is an RGB or grey
                                    JPEG (no re-encoding); any other file is stored as PNG
    mask    Image (H, W, 1) uint8   class indices as a grey PNG, 0 background, 255 ignore;
                                    all 255 where a split has no pixel labels (VOC test)
    labels  Tensor (C-1,) float32   multi-hot foreground classes (class c -> index c-1)
    name    Text                    file stem, e.g. '2007_000032'

``mask`` is an ``Image`` feature with one channel rather than a ``Tensor`` because PNG stores a
label map in a few kB; squeeze the last axis for the (H, W) mask. Palette PNGs (as VOC ships
them) are re-encoded as grey PNGs, since TensorFlow's PNG decoder would map palette indices to
colours. ``decode_record`` decodes a record read with ``SKIP_DECODING`` with PIL, the decoder
the reference uses (TensorFlow's JPEG decoder can differ from it by a few grey levels).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

from slr_jax.constants import COCO_CLASSES, IGNORE_LABEL, VOC_CLASSES
from slr_jax.data.synthetic import make_synthetic_examples
from slr_jax.data.voc import DataError, labels_from_mask

logger = logging.getLogger(__name__)

# NO_DOWNLOADS: the builders set ``url_infos = None`` (no checksums file), which is true, and
# which spares tfds 4.9.10 looking for one next to the module: that lookup imports the
# ``importlib_resources`` backport, only a dependency of tfds on Python < 3.9.

# Keys of a record whose bytes are left encoded when reading for the training pipeline.
ENCODED_FEATURES = ("image", "mask")

VOC_TRAINVAL_ARCHIVE = "VOCtrainval_11-May-2012.tar"
VOC_TEST_ARCHIVE = "VOC2012test.tar"
SBD_ARCHIVE = "benchmark.tgz"
VOC_SPLIT_SIZES = {"train_aug": 10582, "train": 1464, "val": 1449, "test": 1456}
# Where an extracted VOC 2012 (or SBD) folder may sit, relative to manual_dir or to the folder
# tfds extracted the archive into.
VOC_FOLDERS = ("VOCdevkit/VOC2012", "VOC2012", "VOCtrainval_11-May-2012/VOCdevkit/VOC2012", "")
VOC_TEST_FOLDERS = ("VOC2012test/VOCdevkit/VOC2012", "VOC2012test", "VOCdevkit/VOC2012", "")
SBD_FOLDERS = ("benchmark_RELEASE/dataset", "SBD/benchmark_RELEASE/dataset", "SBD/dataset", "SBD")

COCO_SPLIT_SIZES = {"train": 82783, "val": 40504}
COCO_ANNOTATIONS_ARCHIVE = "annotations_trainval2014.zip"
# The 80 object category ids of COCO 2014 (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are
# unused); class k (1..80) is the k-th id in this sorted order.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
COCO_CLASS_OF_CATEGORY = {cat: index + 1 for index, cat in enumerate(COCO_CATEGORY_IDS)}


# ----------------------------------------------------------------------------- features


def segmentation_features(num_classes: int, image_format: str) -> tfds.features.FeaturesDict:
    """The features of every builder; ``num_classes`` counts the background."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "labels": tfds.features.Tensor(shape=(num_classes - 1,), dtype=np.float32),
            "name": tfds.features.Text(),
        }
    )


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class-index mask -> grey PNG bytes for the ``mask`` feature."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"Expected an (H, W) uint8 mask, got {mask.shape} {mask.dtype}.")
    return _png_bytes(mask)


def encode_image_file(path: str | epath.Path) -> tuple[bytes, tuple[int, int]]:
    """Bytes for the ``image`` feature and the (H, W) of the image file at ``path``.

    The file is decoded once to catch corrupt files at build time. RGB and grey JPEGs are kept
    byte for byte; other files (CMYK JPEG, PNG, ...) are converted to RGB and stored as PNG.
    """
    path = epath.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Image file not found: {path}.") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = (image.height, image.width)
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data, size
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"Cannot decode image {path} ({type(error).__name__}: {error}); the file is "
            "corrupt or not an image."
        ) from None
    return _png_bytes(rgb), size


def _checked_mask(mask: np.ndarray, num_classes: int, source: object) -> np.ndarray:
    """``mask`` as uint8 after checking it holds only 0..num_classes-1 and 255."""
    values = np.unique(mask)
    bad = values[(values != IGNORE_LABEL) & ((values < 0) | (values >= num_classes))]
    if bad.size:
        raise DataError(
            f"Mask {source} holds value(s) {bad[:5].tolist()}; expected class indices "
            f"0..{num_classes - 1} and {IGNORE_LABEL} (ignore)."
        )
    return mask.astype(np.uint8)


def load_png_mask(path: str | epath.Path, num_classes: int) -> np.ndarray:
    """(H, W) uint8 class indices of a palette or grey PNG (VOC ``SegmentationClass``)."""
    path = epath.Path(path)
    try:
        with path.open("rb") as handle, Image.open(handle) as mask:
            if mask.mode not in ("P", "L"):
                raise DataError(
                    f"Mask {path} has mode {mask.mode!r}; expected a palette ('P') or grey "
                    "('L') PNG of class indices."
                )
            array = np.asarray(mask)
    except FileNotFoundError:
        raise DataError(f"Mask file not found: {path}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"Cannot decode mask {path} ({type(error).__name__}: {error}).") from None
    return _checked_mask(array, num_classes, path)


def load_sbd_mask(path: str | epath.Path, num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """(H, W) uint8 class indices from an SBD ``cls/<id>.mat`` file (``GTcls.Segmentation``)."""
    import scipy.io

    path = epath.Path(path)
    try:
        with path.open("rb") as handle:
            contents = scipy.io.loadmat(handle)
        segmentation = contents["GTcls"]["Segmentation"][0][0]
    except FileNotFoundError:
        raise DataError(f"SBD mask file not found: {path}.") from None
    except (KeyError, IndexError, ValueError, TypeError, OSError) as error:
        raise DataError(
            f"Cannot read GTcls.Segmentation from {path} ({type(error).__name__}: {error}); "
            "expected an SBD cls/*.mat file."
        ) from None
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2:
        raise DataError(f"{path}: GTcls.Segmentation is {segmentation.shape}, expected (H, W).")
    return _checked_mask(segmentation, num_classes, path)


def decode_record(record: Mapping[str, object]) -> dict[str, object]:
    """Decodes a record read with ``image`` and ``mask`` left encoded (see ENCODED_FEATURES).

    Returns {'image': (H, W, 3) uint8 (PIL decode, RGB), 'mask': (H, W) uint8,
    'labels': (C-1,) float32, 'name': str}.
    """
    name = record["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    try:
        with Image.open(io.BytesIO(record["image"])) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        with Image.open(io.BytesIO(record["mask"])) as mask:
            labels_map = np.asarray(mask, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"Cannot decode the stored image or mask of example {name!r}: {error}."
        ) from None
    if labels_map.ndim == 3:
        labels_map = labels_map[..., 0]
    return {
        "image": rgb,
        "mask": labels_map,
        "labels": np.asarray(record["labels"], np.float32),
        "name": name,
    }


# ----------------------------------------------------------------------------- manual_dir lookup


@dataclasses.dataclass(frozen=True)
class SourceExample:
    """Where one example of a real-data split lives; ``mask`` None: no pixel labels."""

    name: str
    image: str
    mask: str | None


def _first_with(bases: Iterable[epath.Path], folders: Sequence[str], marker: str):
    for base in bases:
        for folder in folders:
            candidate = base / folder if folder else base
            if (candidate / marker).exists():
                return candidate
    return None


def locate(dl_manager, *, archive: str, folders: Sequence[str], marker: str):
    """The folder holding ``marker`` in manual_dir, else inside ``archive`` (extracted by tfds).

    Returns None when neither the folder nor the archive is in manual_dir.
    """
    manual_dir = epath.Path(dl_manager.manual_dir)
    found = _first_with([manual_dir], folders, marker)
    if found is not None:
        return found
    archive_path = manual_dir / archive
    if not archive_path.is_file():
        return None
    logger.info("Extracting %s (once; tfds keeps the extracted copy).", archive_path)
    extracted = epath.Path(dl_manager.extract(archive_path))
    found = _first_with([extracted], folders, marker)
    if found is None:
        inside = " or ".join(f"{f}/{marker}" if f else marker for f in folders)
        raise DataError(f"Archive {archive_path} holds no {inside}; is it the right file?")
    return found


def read_id_list(path: epath.Path) -> list[str]:
    """Ids of a list file (first token of each non-empty line)."""
    if not path.is_file():
        raise DataError(f"List file not found: {path}.")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_sources(splits: Mapping[str, Sequence[SourceExample]], max_report: int = 5) -> None:
    """DataError naming the empty splits, or the listed files that do not exist (stat calls
    only)."""
    empty = sorted(split for split, examples in splits.items() if not examples)
    if empty:
        raise DataError(
            f"split(s) {empty} have no examples: their list files (or annotation files) are "
            "empty; restore them from the original archives."
        )
    missing = []
    for split, examples in splits.items():
        for example in examples:
            for path in (example.image, example.mask):
                if path is not None and not epath.Path(path).is_file():
                    missing.append(f"{path} (split {split!r})")
    if missing:
        shown = ", ".join(dict.fromkeys(missing[:max_report]))
        raise DataError(
            f"{len(missing)} listed file(s) do not exist, e.g. {shown}. Check that the list "
            "files match the folder contents (a partial copy needs trimmed lists)."
        )


def warn_on_split_sizes(dataset: str, sizes: Mapping[str, int], known: Mapping[str, int]):
    """logging.warning for every split whose size differs from the full dataset's."""
    for split, size in sizes.items():
        if split in known and size != known[split]:
            logger.warning(
                "%s split %r has %d examples but the full dataset has %d; building from a "
                "partial or modified copy.",
                dataset,
                split,
                size,
                known[split],
            )


# ----------------------------------------------------------------------------- voc_sbd


class VocSbd(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 segmentation with the SBD augmentation (``train_aug``)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (see NO_DOWNLOADS)
    RELEASE_NOTES = {"1.0.0": "VOC 2012 + SBD: train_aug, train, val, optional test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Put into manual_dir either the archives or their extracted folders:
      {VOC_TRAINVAL_ARCHIVE}  or  VOCdevkit/VOC2012/ (JPEGImages, SegmentationClass,
                                   ImageSets/Segmentation/{{train,val}}.txt)
      {SBD_ARCHIVE}               or  benchmark_RELEASE/dataset/ (cls/*.mat, img/, train.txt,
                                   val.txt)
      optional {VOC_TEST_ARCHIVE} or its VOCdevkit/VOC2012 (ImageSets/Segmentation/test.txt)
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "PASCAL VOC 2012 semantic segmentation (21 classes incl. background, 255 = "
                "ignore) with SBD masks for train_aug = VOC train + SBD train + SBD val minus "
                "VOC val. VOC's own mask is used for images VOC annotates (train), SBD's "
                "GTcls.Segmentation for the others. labels: unique mask values minus 0 and "
                "255. test has no masks (all 255) and zero labels."
            ),
            features=segmentation_features(len(VOC_CLASSES), "jpeg"),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            metadata=tfds.core.MetadataDict(class_names=list(VOC_CLASSES)),
        )

    def _split_generators(self, dl_manager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        voc_root = locate(
            dl_manager,
            archive=VOC_TRAINVAL_ARCHIVE,
            folders=VOC_FOLDERS,
            marker="ImageSets/Segmentation/train.txt",
        )
        if voc_root is None:
            raise DataError(
                f"VOC 2012 not found in {manual_dir}: expected {VOC_TRAINVAL_ARCHIVE} or an "
                "extracted VOCdevkit/VOC2012/ holding JPEGImages/, SegmentationClass/ and "
                "ImageSets/Segmentation/train.txt."
            )
        sbd_root = locate(dl_manager, archive=SBD_ARCHIVE, folders=SBD_FOLDERS, marker="cls")
        if sbd_root is None:
            raise DataError(
                f"SBD not found in {manual_dir}: expected {SBD_ARCHIVE} or an extracted "
                "benchmark_RELEASE/dataset/ holding cls/*.mat, train.txt and val.txt "
                "(train_aug needs it)."
            )
        test_root = locate(
            dl_manager,
            archive=VOC_TEST_ARCHIVE,
            folders=VOC_TEST_FOLDERS,
            marker="ImageSets/Segmentation/test.txt",
        )
        splits = voc_sbd_sources(voc_root, sbd_root, test_root)
        check_sources(splits)
        warn_on_split_sizes(self.name, {k: len(v) for k, v in splits.items()}, VOC_SPLIT_SIZES)
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples: Sequence[SourceExample]):
        num_classes = len(VOC_CLASSES)
        for example in examples:
            image, (height, width) = encode_image_file(example.image)
            if example.mask is None:
                mask = np.full((height, width), IGNORE_LABEL, np.uint8)
                labels = np.zeros((num_classes - 1,), np.float32)
            else:
                if example.mask.endswith(".mat"):
                    mask = load_sbd_mask(example.mask, num_classes)
                else:
                    mask = load_png_mask(example.mask, num_classes)
                if mask.shape != (height, width):
                    raise DataError(
                        f"Mask {example.mask} is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"{example.image} is {width}x{height}."
                    )
                labels = labels_from_mask(mask, num_classes)
            yield (
                example.name,
                {"image": image, "mask": encode_mask(mask), "labels": labels, "name": example.name},
            )


def voc_sbd_sources(
    voc_root: epath.Path, sbd_root: epath.Path, test_root: epath.Path | None = None
) -> dict[str, list[SourceExample]]:
    """The examples of every voc_sbd split (ids sorted for train_aug, list order otherwise).

    train_aug = (VOC train | SBD train | SBD val) - VOC val. Images come from VOC's
    JPEGImages (SBD's img/ when VOC lacks one); masks from VOC's SegmentationClass for ids
    VOC annotates, else SBD's cls/<id>.mat.
    """
    lists = voc_root / "ImageSets" / "Segmentation"
    voc_train = read_id_list(lists / "train.txt")
    voc_val = read_id_list(lists / "val.txt")
    sbd_ids = read_id_list(sbd_root / "train.txt") + read_id_list(sbd_root / "val.txt")

    def image(root: epath.Path, name: str) -> str:
        path = root / "JPEGImages" / f"{name}.jpg"
        if not path.is_file() and (sbd_root / "img" / f"{name}.jpg").is_file():
            return str(sbd_root / "img" / f"{name}.jpg")
        return str(path)

    def voc_example(name: str) -> SourceExample:
        mask = voc_root / "SegmentationClass" / f"{name}.png"
        return SourceExample(name, image(voc_root, name), str(mask))

    voc_annotated = set(voc_train)
    train_aug = []
    for name in sorted((set(voc_train) | set(sbd_ids)) - set(voc_val)):
        if name in voc_annotated:
            train_aug.append(voc_example(name))
        else:
            train_aug.append(
                SourceExample(name, image(voc_root, name), str(sbd_root / "cls" / f"{name}.mat"))
            )
    splits = {
        "train_aug": train_aug,
        "train": [voc_example(name) for name in voc_train],
        "val": [voc_example(name) for name in voc_val],
    }
    if test_root is not None:
        test_ids = read_id_list(test_root / "ImageSets" / "Segmentation" / "test.txt")
        splits["test"] = [SourceExample(n, image(test_root, n), None) for n in test_ids]
    return splits


# ----------------------------------------------------------------------------- coco_seg


def _instance_region(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool region of a COCO ``segmentation`` (polygons, RLE or compressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # drop degenerate polygons
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        rle = {
            "size": segmentation["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    else:
        raise DataError(f"Unknown COCO segmentation format: {type(segmentation).__name__}.")
    region = mask_utils.decode(rle)
    if region.shape != (height, width):
        raise DataError(
            f"A COCO segmentation decodes to {region.shape}, expected {(height, width)}."
        )
    return region.astype(bool)


def coco_semantic_mask(
    annotations: Sequence[Mapping], height: int, width: int, *, reference_order: bool = False
) -> np.ndarray:
    """(H, W) uint8 mask of classes 1..80 (0 background) from one image's instances.

    Default: crowd regions are 255, then instances are painted largest first so that a smaller
    instance wins where instances overlap (ties keep annotation order), also over crowd
    regions. ``reference_order``: as the SLRNet reference, the first annotation in file order
    wins each pixel and crowd regions get their class.
    """
    mask = np.zeros((height, width), np.uint8)
    regions = []
    for annotation in annotations:
        class_id = coco_class(annotation["category_id"])
        regions.append(
            (
                class_id,
                bool(annotation.get("iscrowd", 0)),
                _instance_region(annotation["segmentation"], height, width),
            )
        )
    if reference_order:
        for class_id, _, region in regions:
            mask[region & (mask == 0)] = class_id
        return mask
    for _, crowd, region in regions:
        if crowd:
            mask[region] = IGNORE_LABEL
    things = [(c, r) for c, crowd, r in regions if not crowd]
    for class_id, region in sorted(things, key=lambda item: -int(item[1].sum())):
        mask[region] = class_id
    return mask


def coco_class(category_id: int) -> int:
    """Class 1..80 of a COCO category id; DataError for ids outside the 80 used ones."""
    if category_id not in COCO_CLASS_OF_CATEGORY:
        raise DataError(
            f"COCO category id {category_id} is not one of the 80 object categories of COCO "
            "2014; is this an instances_*2014.json annotation file?"
        )
    return COCO_CLASS_OF_CATEGORY[category_id]


def coco_labels(annotations: Iterable[Mapping]) -> np.ndarray:
    """(80,) float32 multi-hot of the categories of all annotations (crowd ones included)."""
    labels = np.zeros((len(COCO_CATEGORY_IDS),), np.float32)
    for annotation in annotations:
        labels[coco_class(annotation["category_id"]) - 1] = 1.0
    return labels


@dataclasses.dataclass(eq=False)
class CocoSegConfig(tfds.core.BuilderConfig):
    """``reference_order``: masks as the SLRNet reference builds them (see coco_semantic_mask)."""

    reference_order: bool = False


class CocoSeg(tfds.core.GeneratorBasedBuilder):
    """COCO 2014 train/val as 81-class semantic masks built from the instance annotations."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (see NO_DOWNLOADS)
    RELEASE_NOTES = {"1.0.0": "COCO 2014 semantic masks from instances."}
    BUILDER_CONFIGS = [
        CocoSegConfig(
            name="2014",
            description="Crowd regions 255; smaller instances drawn over larger ones.",
        ),
        CocoSegConfig(
            name="2014_reference",
            description="As the SLRNet reference: first annotation wins, crowd keeps its class.",
            reference_order=True,
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Put into manual_dir either the archives or their extracted folders:
      {COCO_ANNOTATIONS_ARCHIVE} or annotations/instances_{{train,val}}2014.json
      train2014.zip              or train2014/*.jpg
      val2014.zip                or val2014/*.jpg
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "COCO 2014 semantic segmentation derived from the instance annotations: the 80 "
                "category ids map to classes 1..80 in sorted id order, 0 is background. labels: "
                "every annotated category of the image, crowd annotations included. All images "
                "of the annotation file, sorted by id; name = file stem."
            ),
            features=segmentation_features(len(COCO_CLASSES), "jpeg"),
            homepage="https://cocodataset.org/",
            metadata=tfds.core.MetadataDict(
                class_names=list(COCO_CLASSES), category_ids=list(COCO_CATEGORY_IDS)
            ),
        )

    def _split_generators(self, dl_manager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        annotations = locate(
            dl_manager,
            archive=COCO_ANNOTATIONS_ARCHIVE,
            folders=("annotations", ""),
            marker="instances_val2014.json",
        )
        if annotations is None:
            raise DataError(
                f"COCO annotations not found in {manual_dir}: expected "
                f"{COCO_ANNOTATIONS_ARCHIVE} or annotations/instances_{{train,val}}2014.json."
            )
        splits = {}
        for split in ("train", "val"):
            folder = f"{split}2014"
            images = locate(dl_manager, archive=f"{folder}.zip", folders=("",), marker=folder)
            if images is None:
                raise DataError(
                    f"COCO {folder} images not found in {manual_dir}: expected {folder}.zip or "
                    f"{folder}/."
                )
            splits[split] = (annotations / f"instances_{folder}.json", images / folder)
        examples = {split: coco_sources(*paths) for split, paths in splits.items()}
        check_sources(
            {
                split: [SourceExample(i["name"], i["path"], None) for i in items]
                for split, items in examples.items()
            }
        )
        warn_on_split_sizes(self.name, {k: len(v) for k, v in examples.items()}, COCO_SPLIT_SIZES)
        return {split: self._generate_examples(items) for split, items in examples.items()}

    def _generate_examples(self, items: Sequence[Mapping]):
        reference_order = self.builder_config.reference_order
        for item in items:
            image, size = encode_image_file(item["path"])
            if size != (item["height"], item["width"]):
                raise DataError(
                    f"Image {item['path']} is {size[1]}x{size[0]} but the annotation file says "
                    f"{item['width']}x{item['height']}."
                )
            mask = coco_semantic_mask(item["annotations"], *size, reference_order=reference_order)
            record = {
                "image": image,
                "mask": encode_mask(mask),
                "labels": coco_labels(item["annotations"]),
                "name": item["name"],
            }
            yield item["name"], record


def coco_sources(annotation_file: epath.Path, image_folder: epath.Path) -> list[dict]:
    """One dict per image of ``annotation_file`` (sorted by image id): name, path, height,
    width and its annotations in file order."""
    if not annotation_file.is_file():
        raise DataError(f"COCO annotation file not found: {annotation_file}.")
    try:
        contents = json.loads(annotation_file.read_text())
        images, annotations = contents["images"], contents.get("annotations", [])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{annotation_file} is not a COCO instances file ({error}).") from None
    for category in contents.get("categories", []):
        coco_class(category["id"])
    by_image: dict[int, list] = {}
    for annotation in annotations:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    known = {image["id"] for image in images}
    orphans = set(by_image) - known
    if orphans:
        raise DataError(
            f"{annotation_file}: annotations refer to {len(orphans)} image id(s) missing from "
            f"its image list, e.g. {sorted(orphans)[:5]}."
        )
    return [
        {
            "name": epath.Path(image["file_name"]).stem,
            "path": str(image_folder / image["file_name"]),
            "height": int(image["height"]),
            "width": int(image["width"]),
            "annotations": by_image.get(image["id"], []),
        }
        for image in sorted(images, key=lambda image: image["id"])
    ]


# ----------------------------------------------------------------------------- synthetic_shapes


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Sizes of the synthetic set; train uses ``seed`` and val ``seed + 1`` (as on disk)."""

    num_train: int = 64
    num_val: int = 16
    image_size: int | tuple[int, int] = 64
    num_classes: int = len(VOC_CLASSES)
    seed: int = 0


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Deterministic shapes on noise (``slr_jax.data.synthetic``); train_aug repeats train."""

    VERSION = tfds.core.Version("2.0.0")
    url_infos = None  # nothing to download (see NO_DOWNLOADS)
    RELEASE_NOTES = {
        "1.0.0": "Shapes from make_synthetic_examples, one colour per class.",
        "2.0.0": "Classes differ by shape and texture, colours random, cluttered background.",
    }
    BUILDER_CONFIGS = [
        SyntheticShapesConfig(name="small", description="64 train / 16 val, 64x64, 21 classes."),
        SyntheticShapesConfig(
            name="tiny",
            description="8 train / 4 val, 32x32, 5 classes (tests).",
            num_train=8,
            num_val=4,
            image_size=32,
            num_classes=5,
        ),
        SyntheticShapesConfig(
            name="medium",
            description="2048 train / 256 val, 128x128, 21 classes.",
            num_train=2048,
            num_val=256,
            image_size=128,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = self.builder_config.num_classes
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Shapes on cluttered backgrounds; each class is one (shape, texture) pair, "
                "colours are random for every class; outlines 255; train_aug holds the same "
                "examples as train."
            ),
            features=segmentation_features(num_classes, "png"),
            metadata=tfds.core.MetadataDict(
                class_names=["background"] + [f"shape{c}" for c in range(1, num_classes)]
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to read
        cfg = self.builder_config
        return {
            "train": self._generate_examples(cfg.num_train, cfg.seed),
            "train_aug": self._generate_examples(cfg.num_train, cfg.seed),
            "val": self._generate_examples(cfg.num_val, cfg.seed + 1),
        }

    def _generate_examples(self, num_examples: int, seed: int) -> Iterator:
        cfg = self.builder_config
        size = cfg.image_size if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        for example in make_synthetic_examples(num_examples, size, cfg.num_classes, seed):
            yield (
                example["name"],
                {
                    "image": _png_bytes(example["image"]),
                    "mask": encode_mask(example["mask"]),
                    "labels": labels_from_mask(example["mask"], cfg.num_classes),
                    "name": example["name"],
                },
            )
