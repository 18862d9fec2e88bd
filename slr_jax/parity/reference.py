"""The reference network from the user's checkout of the official PyTorch SLRNet (imported
from there, never vendored): loading its ``Net``, building it with random weights, moving
arrays between our layout (NHWC, NumPy) and PyTorch's (NCHW), and its multi-scale inference."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from slr_jax.parity.settings import (
    CLASSIFIER_BIAS,
    CLASSIFIER_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SETTINGS,
)


def reference_module(repo: str, setting: str):
    """The reference's Python module of ``setting`` (``models.slrnet`` ...) from ``repo``."""
    if not os.path.isfile(os.path.join(repo, "models", "slrnet.py")):
        raise FileNotFoundError(
            f"{repo!r} is not a checkout of DesertsP/SLRNet (no models/slrnet.py); get one with "
            "`git clone https://github.com/DesertsP/SLRNet` and pass its path"
        )
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return importlib.import_module(SETTINGS[setting][0])


def load_reference(repo: str, setting: str):
    """The reference ``Net`` class of ``setting`` from the checkout at ``repo``."""
    return reference_module(repo, setting).Net


def build_reference(repo: str, setting: str, seed: int, num_classes: int):
    import torch

    torch.manual_seed(seed)
    kwargs = dict(SETTINGS[setting][1])
    kwargs.setdefault("num_classes", num_classes)
    if setting == "coco":
        kwargs["class_weights"] = list(np.linspace(0.5, 1.5, num_classes - 1))
    net = load_reference(repo, setting)(pretrained=None, scale_factor=0.5, **kwargs)
    _randomise(net, torch.Generator().manual_seed(seed + 1))
    net.eval()  # the reference's train() override also sets requires_grad of frozen layers
    return net, kwargs


def _randomise(net, gen) -> None:
    """Random BatchNorm statistics and affine parameters (so no layer is an identity), and
    sharper classifiers."""
    import torch

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(
                    0.1 * torch.randn(module.running_mean.shape, generator=gen)
                )
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                if module.weight is not None:
                    module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        # Random classifiers give near-uniform masks and trivial pseudo labels. Sharper ones,
        # as in a trained network, give pseudo labels with structure; a negative bias keeps the
        # constant background logit competitive, so that pseudo labels contain background and
        # the labelled classes and the seg loss is not zeroed by its per-image weight. (The
        # codes stay close to uniform, max ~0.053 for 21 atoms: hence the near-tie handling.)
        for classifier in (net.last_conv[8], net.aux_head[4]):
            classifier.weight.mul_(CLASSIFIER_SCALE)
            classifier.bias.fill_(CLASSIFIER_BIAS)


def _nchw(x):
    """A torch tensor (B, C, H, W) of a NumPy array (B, H, W, C)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t) -> np.ndarray:
    """A NumPy array (B, H, W, C) of a torch tensor (B, C, H, W)."""
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def reference_multiscale_predict(
    net, photo: np.ndarray, scales, flip: bool = True, single_scale: bool = True, device=None
):
    """The reference's multi-scale inference of one photo (tools/infer_voc.py with its
    datasets/pascal_voc_ms_v2.py pre-processing), re-expressed: every scale is a PIL bicubic
    rescale to round(size * scale) of the uint8 photo (H, W, 3), normalised, with its mirror;
    the test forward (``single_scale``, else the two-view one); mirrored masks flipped back and
    summed; resized (align-corners) to (H, W) and averaged. ``net`` must be in ``eval()``;
    ``device``: a torch device to run on. Returns (cls (C-1,), masks (H, W, C)) in NumPy."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    height, width = photo.shape[:2]
    masks_total, cls_total = 0.0, 0.0
    with torch.no_grad():
        for scale in scales:
            size = (int(np.round(width * scale)), int(np.round(height * scale)))
            view = (
                photo
                if scale == 1
                else np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
            )
            view = (view / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            views = np.stack([view, view[:, ::-1]]) if flip else view[None]
            x = _nchw(views.astype(np.float32))
            cls, masks = net(x if device is None else x.to(device), single_scale=single_scale)
            summed = masks[0] + masks[1].flip(-1) if flip else masks[0]
            summed = F.interpolate(summed[None], (height, width), mode="bilinear",
                                   align_corners=True)[0]  # fmt: skip
            masks_total = masks_total + summed
            cls_total = cls_total + cls.mean(0)
    views_per_scale = 2 if flip else 1
    masks = masks_total / (views_per_scale * len(scales))
    cls = (cls_total / len(scales)).cpu().numpy()
    return cls, np.transpose(masks.cpu().numpy(), (1, 2, 0))
