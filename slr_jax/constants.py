"""Constants shared by more than one part of slr_jax (one home for each).

Values a user may want to change are config keys (``configs/common.py``); what lives here is
fixed by the method, the reference code or the datasets.
"""

from __future__ import annotations

# Model settings of the reference, one per trainer / model file of DesertsP/SLRNet.
VARIANTS = ("wsss", "semi", "semi_wo_cls", "coco")
SEMI_VARIANTS = ("semi", "semi_wo_cls")

# Label value of pixels that carry no label (VOC boundaries, unassigned pseudo labels).
IGNORE_LABEL = 255

# ImageNet normalisation of the backbone's inputs (RGB, images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Backbone blocks the reference never trains (WideResNet38's ``fixed_layers``).
FROZEN_BACKBONE_BLOCKS = ("conv1a", "b2", "b2_1", "b2_2")

# SLRNet predicts its class maps at stride 4 (conv3) and upsamples them to the input size;
# with symmetric convolution padding, grid cell i sits on input pixel 4 * i.
MASK_STRIDE = 4

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of ``num_classes`` classes (background first): VOC's or COCO's when the count
    matches, else ``class_<i>``."""
    for names in (VOC_CLASSES, COCO_CLASSES):
        if num_classes == len(names):
            return names
    return tuple(f"class_{c}" for c in range(num_classes))


def voc_palette() -> list[int]:
    """The 256-entry VOC colour palette, flat ``[r0, g0, b0, r1, ...]`` (768 ints); index 255
    (the ignore label) is VOC's light boundary colour."""
    palette = []
    for index in range(256):
        colour, value = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette.extend(colour)
    return palette


# ``config.model.dtype`` values: the computation dtype (parameters stay float32). float64 needs
# 64-bit JAX (``JAX_ENABLE_X64=1``) and serves exact comparisons with the reference.
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")

# ``config.test.resize`` (how inference scales a photograph) and ``config.test.bucket_pad``.
RESIZE_METHODS = ("pil_bicubic", "align_corners")
BUCKET_PAD_MODES = ("constant", "edge", "reflect", "symmetric")
