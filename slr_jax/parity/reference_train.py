"""The reference's training forward, its trainer's weighted loss, and gradients by name, in
float32 or float64."""

from __future__ import annotations

import numpy as np

from slr_jax.parity.grads import canonical_name
from slr_jax.parity.reference import _nchw, _nhwc
from slr_jax.parity.settings import LOSS_COEFF

SEMI_SETTINGS = ("semi", "semi_wo_cls")


def weighted_terms(cls_l, seg_l, reg_l, code_l, coeff=LOSS_COEFF) -> tuple[dict, object]:
    """The batch mean of every loss term of the reference's training forward and their total
    weighted by ``coeff`` (cls, mask consistency, code consistency, seg), as
    tools/train_voc_wss.py after pretraining: ``(terms, total)``."""
    c_cls, c_mask, c_code, c_seg = coeff
    terms = {
        "cls": cls_l.mean(),
        "seg": seg_l.mean(),
        "mask_consistency": reg_l.mean(),
        "code_consistency": code_l.mean(),
    }
    total = (c_cls * terms["cls"] + c_mask * terms["mask_consistency"]
             + c_code * terms["code_consistency"] + c_seg * terms["seg"])  # fmt: skip
    return terms, total


def _torch_train(net, setting: str, inputs: dict, num_classes: int) -> dict:
    """The reference's training forward and its trainer's weighted total (seg term on), in the
    dtype of ``net``'s parameters (float32, or float64 after ``net.double()``).

    Returns the loss terms and total (with their graph), the codes of view 1 and of view 2
    resized to view 1 (B, K, h, w, with graph), the dictionary, pseudo labels and per-image seg.
    """
    outputs, indicators, captured = _captured_forward(net, setting, inputs, num_classes)
    cls_l, seg_l, reg_l, code_l, visuals, dictionary = outputs
    # tools/train_voc_wss.py and tools/train_voc_semi.py after pretraining: every term is the
    # batch mean; the semi trainer adds the mean seg loss of pixel-labelled examples.
    terms, total = weighted_terms(cls_l, seg_l, reg_l, code_l)
    if indicators is not None:
        terms["seg_labeled"] = seg_l[indicators].mean()
        total = total + LOSS_COEFF[3] * terms["seg_labeled"]
    terms["total"] = total
    codes, codes2 = _view_codes(captured)
    return {
        "terms": terms,
        "codes": codes,
        "codes2": codes2,
        "dictionary": dictionary.detach().numpy(),
        "pseudo": _nhwc(visuals["pseudo"]),
        "seg_per_image": seg_l.detach().numpy(),
    }


def _captured_forward(net, setting: str, inputs: dict, num_classes: int):
    """The reference's training forward on ``inputs``, with the codes of its factorisation and
    the feature sizes of its two views captured: ``(outputs, indicators, captured)``;
    ``indicators`` are the semi settings' pixel-labelled examples (None otherwise)."""
    import torch

    dtype = next(net.parameters()).dtype
    x, raw = _nchw(inputs["image"]).to(dtype), _nchw(inputs["raw_image"]).to(dtype)
    labels = torch.from_numpy(inputs["labels"]).to(dtype)
    captured = {"sizes": []}
    fr = net.factorization_reconstruction
    fr_forward, backbone_forward = fr.forward, net.backbone_forward

    def capture_codes(*args, **kwargs):
        out = fr_forward(*args, **kwargs)
        captured["codes"] = out[1]  # (B, K, N1 + N2), both views side by side
        return out

    def capture_sizes(*args, **kwargs):
        out = backbone_forward(*args, **kwargs)
        captured["sizes"].append(tuple(out[0].shape[-2:]))
        return out

    # The reference calls ``factorization_reconstruction.forward(...)`` directly, which skips
    # module hooks (``register_forward_hook``); instance attributes shadow the methods instead.
    fr.forward, net.backbone_forward = capture_codes, capture_sizes
    try:
        if setting in SEMI_SETTINGS:
            indicators = torch.from_numpy(inputs["is_labeled"])
            seg_labels = torch.eq(
                torch.from_numpy(inputs["mask"]).long()[:, None],
                torch.arange(num_classes)[None, :, None, None],
            ).to(dtype)
            outputs = net(x, raw, labels, seg_labels, indicators)
        else:
            indicators = None
            outputs = net(x, raw, labels)
    finally:
        del fr.forward, net.backbone_forward
    return outputs, indicators, captured


def _view_codes(captured: dict):
    """The captured codes of view 1 and of view 2 resized to view 1, (B, K, h, w) each."""
    import torch
    import torch.nn.functional as F

    (h, w), (h2, w2) = captured["sizes"][:2]
    codes, codes2 = torch.split(captured["codes"], (h * w, h2 * w2), dim=-1)
    b, k = codes.shape[:2]
    codes = codes.reshape(b, k, h, w)
    codes2 = F.interpolate(
        codes2.reshape(b, k, h2, w2), size=(h, w), mode="bilinear", align_corners=True
    )
    return codes, codes2


def _torch_masked_code_consistency(max_onehot, codes, codes2, keep: np.ndarray):
    """The reference's code-consistency formula (its own ``max_onehot``) over kept pixels
    (``keep`` (B, h, w) bool) only, codes (B, K, h, w)."""
    import torch

    per_pixel = torch.abs(max_onehot(codes) - max_onehot(codes2)).sum(1)
    count = max(1, int(keep.sum()) * codes.shape[1])
    return (per_pixel * torch.from_numpy(keep)).sum() / count


def trainable_parameters(net) -> list:
    """``(name, parameter)`` of the reference's trainable (``requires_grad``) parameters."""
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def _torch_grads(objective, named_params) -> dict[str, np.ndarray]:
    import torch

    grads = torch.autograd.grad(
        objective, [p for _, p in named_params], retain_graph=True, allow_unused=True
    )
    return {
        canonical_name(name): np.zeros(p.shape, np.float32) if g is None else g.numpy()
        for (name, p), g in zip(named_params, grads)
    }


def _torch_backward_grads(net, total, named_params) -> dict[str, np.ndarray]:
    """``.grad`` of every parameter after ``net.zero_grad()`` and ``total.backward()`` (graph
    kept), by canonical name: the trainer's own gradients."""
    net.zero_grad()
    total.backward(retain_graph=True)
    return {
        canonical_name(n): np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
        for n, p in named_params
    }


def _torch_float64_grads(net, setting: str, inputs: dict, num_classes: int, c_code: float):
    """Gradients of the total without the code term, and pseudo labels, of the reference run
    in float64 (``net`` is converted in place: call it last)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the reference creates without a dtype
    try:
        net.double()
        ref = _torch_train(net, setting, inputs, num_classes)
        named = trainable_parameters(net)
        terms = ref["terms"]
        grads = _torch_grads(terms["total"] - c_code * terms["code_consistency"], named)
    finally:
        torch.set_default_dtype(previous)
    return grads, ref["pseudo"]
