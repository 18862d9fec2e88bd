"""PASCAL VOC 2012 (+ SBD ``train_aug``) read from a folder the user names; nothing downloaded.

Expected layout (``manual_dir`` may be this folder or one holding ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          VOC pixel labels (palette PNG, 255 = ignore)
    SegmentationClassAug/<id>.png       VOC + SBD pixel labels (the usual "SegmentationClassAug")
    ImageSets/Segmentation/train.txt    1464 ids (the pixel-labelled set of the semi setting)
    ImageSets/Segmentation/train_aug.txt  10582 ids
    ImageSets/Segmentation/val.txt      1449 ids

A list file holds one id per line, or two paths per line (image, mask) relative to
``manual_dir`` as in the reference's ``data/train_augvoc.txt``; ``split`` may also name such a
``.txt`` file directly.

Paths may be local or ``gs://`` (``etils.epath``). Why not a tfds builder: reading is plain
Python (PIL, as the reference does) that ``pipeline.py`` runs inside ``tf.data`` through
``tf.numpy_function``, so the decoded pixels equal the reference's (TF's JPEG decoder and
resizers differ slightly), an unreadable file is reported by name, and no TFRecord copy of the
20k VOC/SBD files has to be prepared first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from slr_jax.constants import IGNORE_LABEL, VOC_CLASSES
from slr_jax.data.images import decode_rgb, exif_orientation
from slr_jax.errors import DataError

NUM_VOC_CLASSES = len(VOC_CLASSES)

# split name -> (list file under ImageSets/Segmentation, mask folder)
SPLIT_LAYOUT = {
    "train_aug": ("train_aug.txt", "SegmentationClassAug"),
    "train": ("train.txt", "SegmentationClass"),
    "val": ("val.txt", "SegmentationClass"),
    "trainval": ("trainval.txt", "SegmentationClass"),
    "test": ("test.txt", None),
}
# ``labeled_split`` values meaning "no pixel labels at all" (weakly supervised training).
NO_PIXEL_LABELS = ("none",)


@dataclasses.dataclass(frozen=True)
class VocExample:
    """Where one example lives. ``mask_path`` None: no pixel labels on disk (test split)."""

    name: str
    image_path: str
    mask_path: str | None
    is_labeled: bool


def resolve_voc_root(manual_dir: str | os.PathLike) -> epath.Path:
    """The folder holding ``JPEGImages``: ``manual_dir`` or ``manual_dir/VOCdevkit/VOC2012``."""
    if manual_dir is None or str(manual_dir) == "":
        raise DataError(
            "No VOC folder given: set config.dataset.manual_dir to the folder holding "
            "JPEGImages/ (or VOCdevkit/VOC2012/)."
        )
    base = epath.Path(manual_dir).expanduser()
    candidates = (base, base / "VOCdevkit" / "VOC2012")
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    expected = " or ".join(str(c / "JPEGImages") for c in candidates)
    if not base.exists():
        raise DataError(f"VOC folder {base} does not exist; expected {expected}.")
    raise DataError(
        f"VOC folder {base} has no JPEGImages/ folder; expected {expected}. "
        "Point config.dataset.manual_dir at the extracted VOC 2012 folder."
    )


def _list_file(root: epath.Path, manual_dir: epath.Path, split: str) -> epath.Path:
    if split.endswith(".txt"):
        path = epath.Path(split).expanduser()
        return path if path.is_absolute() else manual_dir / path
    if split not in SPLIT_LAYOUT:
        raise DataError(
            f"Unknown VOC split {split!r}; use one of {sorted(SPLIT_LAYOUT)} or a path to a "
            ".txt list file."
        )
    return root / "ImageSets" / "Segmentation" / SPLIT_LAYOUT[split][0]


def read_split(manual_dir: str | os.PathLike, split: str) -> list[VocExample]:
    """Examples of ``split`` (all marked pixel-labelled when a mask path exists), list order."""
    root = resolve_voc_root(manual_dir)
    manual_dir = epath.Path(manual_dir).expanduser()
    list_path = _list_file(root, manual_dir, split)
    if not list_path.is_file():
        hint = ""
        if split == "train_aug":
            hint = (
                " train_aug needs the SBD augmentation inside the VOC folder: "
                "SegmentationClassAug/ (the SBD + VOC masks as palette PNGs) and its list "
                "ImageSets/Segmentation/train_aug.txt (10582 ids)."
            )
        raise DataError(f"List file for split {split!r} not found: expected {list_path}.{hint}")
    mask_folder = SPLIT_LAYOUT.get(split, ("", "SegmentationClass"))[1]
    if mask_folder is not None and not (root / mask_folder).is_dir():
        raise DataError(
            f"Mask folder for split {split!r} not found: expected {root / mask_folder}/."
        )
    examples = []
    for line_number, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            name = fields[0]
            image_path = root / "JPEGImages" / f"{name}.jpg"
            mask_path = None if mask_folder is None else root / mask_folder / f"{name}.png"
        elif len(fields) == 2:
            image_path = manual_dir / fields[0].lstrip("/")
            mask_path = manual_dir / fields[1].lstrip("/")
            name = image_path.stem
        else:
            raise DataError(
                f"{list_path}:{line_number}: expected '<id>' or '<image> <mask>', got {line!r}."
            )
        examples.append(
            VocExample(
                name=name,
                image_path=str(image_path),
                mask_path=None if mask_path is None else str(mask_path),
                is_labeled=mask_path is not None,
            )
        )
    if not examples:
        raise DataError(f"List file {list_path} holds no examples.")
    return examples


def _header_size(path: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W, H) as stored, (W, H) as a viewer shows it) from the file's header alone."""
    if os.path.getsize(path) == 0:
        raise DataError("an empty file")
    try:
        with Image.open(path) as image:
            stored = image.size
            turned = exif_orientation(image) in (5, 6, 7, 8)  # rotated by 90 or 270 degrees
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"not a readable image: {type(error).__name__}") from None
    return stored, (stored[::-1] if turned else stored)


def _example_problem(example: VocExample, headers: bool) -> str | None:
    """Why one example cannot be used, or None."""
    paths = [p for p in (example.image_path, example.mask_path) if p is not None]
    for path in paths:
        if not os.path.isfile(path):
            return f"{path} (missing)"
    if not headers:
        return None
    try:
        image_sizes = _header_size(example.image_path)
    except DataError as error:
        return f"{example.image_path} ({error})"
    if example.mask_path is None:
        return None
    try:
        mask_size = _header_size(example.mask_path)[0]
    except DataError as error:
        return f"{example.mask_path} ({error})"
    if mask_size not in image_sizes:
        width, height = image_sizes[1]
        return f"{example.mask_path} ({mask_size[0]}x{mask_size[1]}, its image is {width}x{height})"
    return None


def check_files(examples: Iterable[VocExample], headers: bool = True, max_report: int = 5) -> None:
    """Raises one DataError naming the listed files that are missing, empty, not images, or
    masks whose size differs from their image's (``headers``: read each file's header, a few
    ms per file; otherwise stat calls only). Remote storage (``gs://``) is not scanned: bad
    files there are named when they are read."""
    examples = list(examples)
    problems = []
    for example in examples:
        if "://" in example.image_path:
            return
        problem = _example_problem(example, headers)
        if problem is not None:
            problems.append(problem)
    if problems:
        shown = "; ".join(problems[:max_report]) + (" ..." if len(problems) > max_report else "")
        raise DataError(
            f"{len(problems)} of {len(examples)} listed examples cannot be used: {shown}. Fix or "
            "replace those files, or remove their ids from the list file "
            "(config.dataset.check_files=False skips this check)."
        )


def semi_supervised_examples(
    examples: Sequence[VocExample],
    labeled_names: Iterable[str],
    oversample_rate: int = 1,
) -> list[VocExample]:
    """Marks ``labeled_names`` pixel-labelled (others not) and repeats them ``oversample_rate``x.

    As in the reference's semi-supervised VOC set, each labelled image appears
    ``oversample_rate`` times per epoch; the repeats are appended after the original list.
    """
    if int(oversample_rate) < 1:
        raise DataError(f"oversample_rate must be an integer >= 1, got {oversample_rate}.")
    labeled = set(labeled_names)
    present = {example.name for example in examples}
    absent = sorted(labeled - present)
    if absent:
        raise DataError(
            f"{len(absent)} pixel-labelled id(s) are not in the training list, e.g. "
            f"{absent[:5]}; the labelled split must be a subset of the training split."
        )
    marked = [
        dataclasses.replace(e, is_labeled=e.name in labeled and e.mask_path is not None)
        for e in examples
    ]
    repeats = [e for e in marked if e.is_labeled] * (int(oversample_rate) - 1)
    return marked + repeats


def training_examples(
    manual_dir: str | os.PathLike,
    split: str,
    *,
    labeled_split: str | None = None,
    oversample_rate: int = 1,
    num_labeled: int = 0,
) -> list[VocExample]:
    """The training list of one setting.

    ``labeled_split`` None or '' (and ``num_labeled`` 0): every example with a mask is
    pixel-labelled. ``'none'``: no example is (weak supervision; labels still come from the
    masks). A split name (e.g. ``'train'``): only its ids are pixel-labelled, oversampled
    ``oversample_rate`` times. ``num_labeled`` > 0 keeps the first ``num_labeled`` ids of the
    labelled list (``labeled_split``, else ``split`` itself) as the pixel-labelled ones.
    """
    examples = read_split(manual_dir, split)
    if not labeled_split and not num_labeled:
        return examples
    if str(labeled_split).lower() in NO_PIXEL_LABELS:
        return [dataclasses.replace(e, is_labeled=False) for e in examples]
    listed = read_split(manual_dir, labeled_split) if labeled_split else examples
    return semi_supervised_examples(
        examples, first_labeled([e.name for e in listed], num_labeled), oversample_rate
    )


def first_labeled(names: Sequence[str], num_labeled: int) -> list[str]:
    """The first ``num_labeled`` of ``names`` (all of them for 0); DataError when too few."""
    num_labeled = int(num_labeled)
    if num_labeled > len(names):
        raise DataError(
            f"config.dataset.num_labeled={num_labeled} but the labelled list holds "
            f"{len(names)} ids; lower it (0 = all)."
        )
    return list(names[:num_labeled] if num_labeled else names)


def with_pseudo_labels(examples: Sequence[VocExample], folder: str) -> list[VocExample]:
    """``examples`` with their masks replaced by ``folder/<id>.png`` (all pixel-labelled).

    Raises one DataError naming the label files that are missing, unreadable, or not of their
    image's size (their headers are read: a few ms per file).
    """
    root = epath.Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(
            f"config.dataset.pseudo_label_dir {root} is not a folder; it must hold one <id>.png "
            "label map per training image (the pred/ or crf/ folder of --mode=infer)."
        )
    replaced, problems, seen = [], [], set()
    for example in examples:
        labelled = dataclasses.replace(
            example, mask_path=str(root / f"{example.name}.png"), is_labeled=True
        )
        replaced.append(labelled)
        if example.name not in seen and "://" not in labelled.mask_path:
            seen.add(example.name)
            problem = _example_problem(labelled, headers=True)
            if problem is not None:
                problems.append(problem)
    if problems:
        shown = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise DataError(
            f"{len(problems)} of {len(seen)} pseudo-label files in {root} cannot be used: "
            f"{shown}. Export them again (python -m slr_jax.main --mode=infer --split=TRAIN "
            "--output=OUT) or point config.dataset.pseudo_label_dir at the right folder."
        )
    return replaced


def load_image(path: str, apply_exif: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB image as a viewer shows it (``images.decode_rgb``: EXIF orientation,
    16-bit grey scaled); DataError naming the file when missing or undecodable."""
    try:
        with epath.Path(path).open("rb") as handle:
            return decode_rgb(handle, apply_exif=apply_exif)
    except FileNotFoundError:
        raise DataError(f"Image file not found: {path}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"Cannot decode image {path} ({type(error).__name__}: {error}); the file is "
            "corrupt or not an image; replace it or remove its id from the list file."
        ) from None


def load_mask(path: str) -> np.ndarray:
    """(H, W) uint8 class-index mask from a palette or grey PNG; DataError naming the file."""
    try:
        with epath.Path(path).open("rb") as handle, Image.open(handle) as mask:
            if mask.mode not in ("P", "L"):
                raise DataError(
                    f"Mask {path} has mode {mask.mode!r}; expected a palette ('P') or grey "
                    "('L') PNG of class indices (VOC SegmentationClass format)."
                )
            return np.asarray(mask, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"Mask file not found: {path}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(
            f"Cannot decode mask {path} ({type(error).__name__}: {error}); the file is corrupt "
            "or not a PNG."
        ) from None


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes - 1,) float32 multi-hot of the foreground classes present in ``mask``.

    0 (background) and 255 (ignore) do not count; other values >= num_classes are an error.
    """
    present = np.unique(mask)
    present = present[(present != 0) & (present != IGNORE_LABEL)]
    if present.size and present.max() >= num_classes:
        raise DataError(
            f"Mask holds class {int(present.max())} but num_classes is {num_classes}; set "
            "config.model.num_classes to the dataset's class count (background included)."
        )
    labels = np.zeros((num_classes - 1,), np.float32)
    labels[present.astype(np.int64) - 1] = 1.0
    return labels


def labels_from_class_ids(class_ids: Iterable[int], num_classes: int) -> np.ndarray:
    """(num_classes - 1,) float32 multi-hot from foreground class ids (1..num_classes-1)."""
    labels = np.zeros((num_classes - 1,), np.float32)
    for class_id in class_ids:
        if not 1 <= int(class_id) < num_classes:
            raise DataError(
                f"Image label {class_id} is outside the foreground classes 1..{num_classes - 1}."
            )
        labels[int(class_id) - 1] = 1.0
    return labels


def load_example(
    example: VocExample,
    num_classes: int,
    image_labels: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Decodes one example.

    Returns {'image': (H, W, 3) uint8, 'mask': (H, W) uint8 (all 255 unless pixel-labelled),
    'labels': (C-1,) float32, 'is_labeled': bool}. Image labels come from ``image_labels``
    when it has the name, else from the mask on disk.
    """
    image = load_image(example.image_path)
    height, width = image.shape[:2]
    mask = None
    if example.mask_path is not None:
        mask = load_mask(example.mask_path)
        if mask.shape != (height, width) and mask.shape == (width, height):
            # The mask was drawn on the stored pixels of a photo with an EXIF rotation.
            image = load_image(example.image_path, apply_exif=False)
            height, width = image.shape[:2]
        if mask.shape != (height, width):
            raise DataError(
                f"Mask {example.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{example.image_path} is {width}x{height}."
            )
    if image_labels is not None and example.name in image_labels:
        labels = labels_from_class_ids(image_labels[example.name], num_classes)
    elif mask is not None:
        labels = labels_from_mask(mask, num_classes)
    else:
        labels = np.zeros((num_classes - 1,), np.float32)
    if mask is None or not example.is_labeled:
        mask = np.full((height, width), IGNORE_LABEL, np.uint8)
    return {
        "image": image,
        "mask": mask,
        "labels": labels,
        "is_labeled": bool(example.is_labeled),
    }
